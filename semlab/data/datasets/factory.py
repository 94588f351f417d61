"""``make_dataset``: the dataset a dataset string names (see :mod:`semlab.data.datasets.dataset_str`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from semlab.data.datasets.dataset_str import parse_dataset_str
from semlab.data.datasets.image_folder import DEFAULT_VAL_FRACTION, DatasetError


def make_dataset(
    dataset_str: str,
    transform: Callable[[Any], Any] | None = None,
    target_transform: Callable[[int], Any] | None = None,
) -> Any:
    """The dataset a dataset string names; items are ``(transform(PIL RGB image), target_transform(label))``
    and every dataset has ``get_encoded(i)``, ``labels``, ``class_ids``, ``class_names``."""
    name, kwargs = parse_dataset_str(dataset_str)
    if name == "ImageNet":
        from semlab.data.datasets.imagenet import ImageNet

        return ImageNet(transform=transform, target_transform=target_transform, **kwargs)
    if name == "ImageFolder":
        from semlab.data.datasets.image_folder import ImageFolder

        return ImageFolder(
            kwargs["root"],
            transform=transform,
            target_transform=target_transform,
            split=kwargs.get("split"),
            val_fraction=kwargs.get("val_fraction", DEFAULT_VAL_FRACTION),
        )
    if name == "Demo":
        from semlab.data.datasets.demo import DemoDataset

        n = kwargs.get("n_per_class")
        if n is not None and not (n.isdigit() and int(n) > 0):
            raise DatasetError(f"Demo n_per_class must be a positive integer, got {n!r} in {dataset_str!r}")
        return DemoDataset(
            split=kwargs["split"],
            root=kwargs.get("root"),
            n_per_class=int(n) if n is not None else None,
            transform=transform,
            target_transform=target_transform,
        )
    from semlab.data.datasets.parquet import ParquetDataset  # lazily: pyarrow only when asked for

    return ParquetDataset(transform=transform, target_transform=target_transform, **kwargs)
