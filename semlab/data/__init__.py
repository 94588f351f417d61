"""Data: dataset strings and datasets (ImageNet ``extra`` layout, ImageFolder, the embedded demo, Parquet
shards), the DINOv2 multi-crop augmentation, iBOT block masking, collate, and the local data iterator.

torch/PIL only; the Ray Data pipeline lives in ``semlab.data.ray_pipeline`` and imports Ray lazily.
"""

from semlab.data.augment import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DataAugmentationDINO,
    make_augmentation,
    make_eval_transform,
    make_probe_train_transform,
)
from semlab.data.collate import collate_data_and_cast
from semlab.data.dataset_str import DATASET_NAMES, make_dataset, parse_dataset_str
from semlab.data.demo import DEMO_CLASSES, DemoDataset, default_demo_root, ensure_demo_split
from semlab.data.image_folder import CorruptImageError, DatasetError, ImageFolder
from semlab.data.imagenet import ImageNet, dump_imagenet_extra
from semlab.data.loaders import make_local_data_iterator
from semlab.data.masking import MaskingGenerator

__all__ = [
    "DATASET_NAMES",
    "DEMO_CLASSES",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "CorruptImageError",
    "DataAugmentationDINO",
    "DatasetError",
    "DemoDataset",
    "ImageFolder",
    "ImageNet",
    "MaskingGenerator",
    "collate_data_and_cast",
    "default_demo_root",
    "dump_imagenet_extra",
    "ensure_demo_split",
    "make_augmentation",
    "make_dataset",
    "make_eval_transform",
    "make_local_data_iterator",
    "make_probe_train_transform",
    "parse_dataset_str",
]
