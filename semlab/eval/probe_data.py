"""Data for the linear probe: a deterministic held-out split, an infinite sampler, the loaders.

The probe trains on ``train \\ holdout`` with the train-time augmentation (RandomResizedCrop +
flip), picks its best classifier on ``holdout`` (a stratified ``val_fraction`` of the train
set, fixed by ``seed``) with the eval transform (Resize + CenterCrop), and reports that
classifier on the val dataset (eval transform).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset


def holdout_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..N-1`` into ``(train, holdout)``, stratified by label, deterministic in ``seed``.

    Each class with ``n_c`` samples gives ``round(fraction * n_c)`` of them to the holdout (at
    least one when ``n_c >= 2`` and ``fraction > 0``, never all of them). Both index arrays are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"linear.val_fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    n = labels.shape[0]
    if fraction == 0.0 or n == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    holdout: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        k = int(round(fraction * members.size))
        if members.size >= 2:
            k = min(max(k, 1), members.size - 1)
        else:
            k = 0
        holdout.append(rng.permutation(members)[:k])
    held = np.sort(np.concatenate(holdout)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held


class InfiniteSampler(Sampler[int]):
    """Yields the given indices forever, reshuffled each pass (``seed``, pass number) when ``shuffle``."""

    def __init__(self, indices: Sequence[int] | np.ndarray, shuffle: bool = True, seed: int = 0) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size == 0:
            raise ValueError("cannot sample from an empty set of indices (the probe's train split is empty)")
        self.shuffle = shuffle
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while True:
            order = self.indices
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(self.indices)
            yield from (int(i) for i in order)
            epoch += 1


def dataset_labels(dataset: Any) -> np.ndarray:
    """Labels of a semlab dataset (its ``labels`` array; else read from items, slowly)."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def num_classes_of(*datasets: Any) -> int:
    """Number of classes: ``len(class_names)`` of the first dataset that has them, else max label + 1."""
    for ds in datasets:
        names = getattr(ds, "class_names", None)
        if names:
            return len(names)
    return int(max(int(dataset_labels(ds).max()) for ds in datasets if len(ds))) + 1


@dataclasses.dataclass
class ProbeData:
    """Probe loaders: ``train`` infinite (augmented); ``holdout`` (None when empty) and ``val`` finite."""

    train: DataLoader
    holdout: DataLoader | None
    val: DataLoader
    num_classes: int
    sizes: dict[str, int]


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler: Sampler | None = None,
                drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0 and sampler is not None,
    )


def make_probe_data(
    train_dataset: str,
    val_dataset: str,
    batch_size: int,
    num_workers: int,
    resize_size: int,
    crop_size: int,
    val_fraction: float,
    seed: int = 0,
    train_crop_scale: tuple[float, float] = (0.08, 1.0),
) -> ProbeData:
    """Build the three loaders from dataset strings (any ``make_dataset`` string, Parquet shards too)."""
    from semlab.data import make_dataset
    from semlab.data.pipeline.augment import make_eval_transform, make_probe_train_transform

    train_tf = make_probe_train_transform(crop_size, scale=train_crop_scale)
    train_aug = make_dataset(train_dataset, transform=train_tf)
    eval_tf = make_eval_transform(resize_size, crop_size)
    val = make_dataset(val_dataset, transform=eval_tf)
    if len(train_aug) == 0:
        raise ValueError(f"the probe's train dataset '{train_dataset}' is empty")
    if len(val) == 0:
        raise ValueError(f"the probe's val dataset '{val_dataset}' is empty")
    train_idx, held_idx = holdout_split(dataset_labels(train_aug), val_fraction, seed)
    holdout_loader = None
    if held_idx.size:
        train_eval = make_dataset(train_dataset, transform=eval_tf)
        holdout_loader = make_loader(Subset(train_eval, held_idx.tolist()), batch_size, num_workers)
    train_loader = make_loader(
        train_aug, batch_size, num_workers, sampler=InfiniteSampler(train_idx, seed=seed), drop_last=True
    )
    return ProbeData(
        train=train_loader,
        holdout=holdout_loader,
        val=make_loader(val, batch_size, num_workers),
        num_classes=num_classes_of(train_aug, val),
        sizes={"train": int(train_idx.size), "holdout": int(held_idx.size), "val": len(val)},
    )
