"""The end-of-run evaluation follows the training data: its labelled splits, or a plain skip."""

from __future__ import annotations

import pytest
from PIL import Image

from semlab.config import load_config
from semlab.data import make_dataset
from semlab.data.datasets.image_folder import DatasetError, in_val_split
from semlab.eval.eval_datasets import derive_eval_datasets, resolve_eval_datasets


def image_folder(root, classes=("a", "b"), n=40):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / c / f"{i}.png")
    return root


def test_named_splits_swap_train_for_val_and_keep_the_other_keys():
    assert derive_eval_datasets("ImageNet:split=TRAIN:root=/d:extra=/e") == (
        "ImageNet:split=TRAIN:root=/d:extra=/e", "ImageNet:split=VAL:root=/d:extra=/e")
    assert derive_eval_datasets("Parquet:path=s3://b/x") == (
        "Parquet:path=s3://b/x:split=TRAIN", "Parquet:path=s3://b/x:split=VAL")


def test_image_folder_gets_a_fixed_disjoint_held_out_split(tmp_path):
    root = image_folder(tmp_path / "imgs")
    train_str, val_str = derive_eval_datasets(f"ImageFolder:root={root}")
    train, val = make_dataset(train_str), make_dataset(val_str)
    every = make_dataset(f"ImageFolder:root={root}")
    names = lambda ds: {ds.relpath(i) for i in range(len(ds))}  # noqa: E731
    assert names(train).isdisjoint(names(val)) and names(train) | names(val) == names(every)
    assert 0 < len(val) < len(every) / 4 and set(val.labels) == {0, 1}
    assert all(in_val_split(p, 0.1) for p in names(val))
    assert names(make_dataset(val_str)) == names(val)  # the same split every time
    bigger = make_dataset(f"ImageFolder:root={root}:split=VAL:val_fraction=0.5")
    assert names(val) <= names(bigger)  # an image never changes side as the fraction grows
    with pytest.raises(DatasetError, match="TRAIN or VAL"):
        make_dataset(f"ImageFolder:root={root}:split=TEST")
    with pytest.raises(DatasetError, match="val_fraction"):
        make_dataset(f"ImageFolder:root={root}:split=VAL:val_fraction=1.5")


def test_resolution_follows_the_training_data(tmp_path):
    root = image_folder(tmp_path / "imgs")
    cfg = load_config("train/demo_tiny", [f"train.dataset_path=ImageFolder:root={root}"])
    line = resolve_eval_datasets(cfg)
    assert cfg.evaluation.knn_dataset_val == f"ImageFolder:root={root}:split=VAL"
    assert cfg.evaluation.knn_dataset_train == f"ImageFolder:root={root}:split=TRAIN"
    assert line.startswith(f"evaluation on ImageFolder:root={root}:split=VAL") and "following" in line
    demo = load_config("train/demo_tiny")
    resolve_eval_datasets(demo)
    assert (demo.evaluation.knn_dataset_train, demo.evaluation.knn_dataset_val) == (
        "Demo:split=TRAIN", "Demo:split=VAL")


def test_explicit_sets_win_none_switches_off_and_unlabelled_data_is_skipped_plainly(tmp_path):
    explicit = load_config("train/demo_tiny", ["evaluation.knn_dataset_train=Demo:split=VAL",
                                               "evaluation.knn_dataset_val=Demo:split=TRAIN"])
    assert "as configured" in resolve_eval_datasets(explicit)
    assert explicit.evaluation.knn_dataset_val == "Demo:split=TRAIN"
    off = load_config("train/demo_tiny", ["evaluation.knn_dataset_train=none"])
    assert "switched off" in resolve_eval_datasets(off) and off.evaluation.knn_dataset_train == ""
    one_class = image_folder(tmp_path / "one", classes=("only",))
    cfg = load_config("train/demo_tiny", [f"train.dataset_path=ImageFolder:root={one_class}"])
    line = resolve_eval_datasets(cfg)
    assert "single class" in line and "skipped" in line and "evaluation.knn_dataset_train" in line
    assert (cfg.evaluation.knn_dataset_train, cfg.evaluation.knn_dataset_val) == ("", "")
    missing = load_config("train/demo_tiny", [f"train.dataset_path=ImageFolder:root={tmp_path / 'nope'}"])
    assert "cannot be opened" in resolve_eval_datasets(missing)
