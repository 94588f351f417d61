"""Data: dataset strings and datasets (ImageNet ``extra`` layout, ImageFolder, the embedded demo, Parquet
shards), the DINOv2 multi-crop augmentation, iBOT block masking, collate, and the local data iterator.

Two rooms: ``semlab.data.datasets`` (dataset strings and the datasets they name) and
``semlab.data.pipeline`` (augment, masking, collate, loaders; the Ray Data stream in
``semlab.data.pipeline.ray_pipeline``, which imports Ray lazily). torch/PIL only here.
"""

from semlab.data.datasets.dataset_str import DATASET_NAMES, parse_dataset_str
from semlab.data.datasets.demo import DEMO_CLASSES, DemoDataset, default_demo_root, ensure_demo_split
from semlab.data.datasets.factory import make_dataset
from semlab.data.datasets.image_folder import CorruptImageError, DatasetError, ImageFolder
from semlab.data.datasets.imagenet import ImageNet, dump_imagenet_extra
from semlab.data.pipeline.augment import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DataAugmentationDINO,
    make_augmentation,
    make_eval_transform,
    make_probe_train_transform,
)
from semlab.data.pipeline.collate import collate_data_and_cast
from semlab.data.pipeline.loaders import make_local_data_iterator
from semlab.data.pipeline.masking import MaskingGenerator

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
