"""The local (no Ray) training data iterator: torch DataLoader + multi-crop augmentation + iBOT collate.

Sample order. All ranks read one global stream of dataset indices: epoch ``e`` is the permutation
``perm_e = default_rng([seed, e]).permutation(N)`` and global position ``g`` holds ``perm_{g // N}[g % N]``.
Rank ``r`` of ``W`` takes the positions ``g = k W + r`` (``k = 0, 1, ...``), so ranks are disjoint, every
epoch is reshuffled deterministically, and batch ``t`` of a rank is its positions
``k in [t B, (t + 1) B)``. Resuming at iteration ``start_iter`` starts at ``k = start_iter * B``: the
sample sequence after resume equals the uninterrupted one.

Randomness. The crops of sample ``index`` in epoch ``e`` use ``default_rng([seed, e, index])`` (as the Ray
Data pipeline does) and the masks of a batch ``default_rng([seed, MASK_STREAM, g_first])`` (``g_first`` the
global position of its first sample), so batches are reproducible whatever the number of workers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from semlab.data.datasets.factory import make_dataset
from semlab.data.datasets.image_folder import CorruptImageError
from semlab.data.pipeline.augment import DataAugmentationDINO, make_augmentation
from semlab.data.pipeline.collate import collate_data_and_cast
from semlab.data.pipeline.masking import MaskingGenerator

SampleKey = tuple[int, int, int]  # (dataset index, epoch, global position)
logger = logging.getLogger(__name__)
MASK_STREAM = 0x6D61736B  # tags the mask generators' seeds apart from the (seed, epoch, index) crop seeds


class EpochShuffleSampler(Sampler[SampleKey]):
    """Infinite sampler of ``(index, epoch, global position)`` keys for one rank (module docstring)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        self.seed, self.start = int(seed), int(start)
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The dataset order of ``epoch``."""
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return self._perm

    def key(self, k: int) -> SampleKey:
        """The key of this rank's ``k``-th sample."""
        g = k * self.world_size + self.rank
        epoch, offset = divmod(g, self.size)
        return int(self.permutation(epoch)[offset]), epoch, g

    def __iter__(self) -> Iterator[SampleKey]:
        k = self.start
        while True:
            yield self.key(k)
            k += 1


class AugmentedSamples(Dataset):
    """``dataset[key] -> (augmented crops dict, label, index, global position)`` from the encoded bytes.

    An unreadable image (missing, empty, truncated, not an image, over ``max_image_pixels``) is logged
    with its file name, counted and replaced by the next readable sample (``index + 1``, ``+ 2``...; the
    same replacement on every run, so resume stays exact). When more than ``max_bad_fraction`` of the
    dataset turned out unreadable in this process, a ``DatasetError`` stops the run, naming the files.
    """

    def __init__(self, dataset: Any, augmentation: DataAugmentationDINO, seed: int,
                 max_bad_fraction: float = 0.0, max_image_pixels: int | None = None) -> None:
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = int(seed)
        self.max_bad_fraction = float(max_bad_fraction)
        self.max_image_pixels = max_image_pixels
        self.bad: dict[int, str] = {}  # index -> error, in this process

    def __len__(self) -> int:
        return len(self.dataset)

    def _where(self, index: int) -> str:
        path = getattr(self.dataset, "path", None)
        return str(path(index)) if callable(path) else f"sample {index} of {self.dataset!r}"

    def _crops(self, index: int, epoch: int) -> tuple[dict[str, list[torch.Tensor]], int]:
        data, label = self.dataset.get_encoded(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        with warnings.catch_warnings():  # between 1x and 2x the pixel limit PIL only warns: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return self.augmentation(data, rng=rng), int(label)

    def _note_bad(self, index: int, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if index not in self.bad:
            self.bad[index] = reason
            logger.warning("skipping unreadable image %s (sample %d): %s", self._where(index), index, reason)
        allowed = self.max_bad_fraction * len(self.dataset)
        if len(self.bad) > allowed:
            names = "; ".join(f"{self._where(i)} ({e})" for i, e in list(self.bad.items())[:5])
            raise CorruptImageError(
                f"{len(self.bad)} of {len(self.dataset)} images are unreadable, more than "
                f"data.max_bad_image_fraction={self.max_bad_fraction:g} allows: {names}. Replace or remove "
                "them (or raise data.max_bad_image_fraction)."
            ) from exc

    def __getitem__(self, key: SampleKey) -> tuple[dict[str, list[torch.Tensor]], int, int, int]:
        index, epoch, position = key
        if self.max_image_pixels is not None:  # per process: DataLoader workers may be spawned
            Image.MAX_IMAGE_PIXELS = int(self.max_image_pixels) or None
        n = len(self.dataset)
        for step in range(n):
            candidate = (index + step) % n
            try:
                crops, label = self._crops(candidate, epoch)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as exc:
                self._note_bad(candidate, exc)  # raises once too many are bad
                continue
            return crops, label, int(index), int(position)
        raise CorruptImageError(f"no readable image in {self.dataset!r}")


class MaskedCollate:
    """Picklable collate function: :func:`collate_data_and_cast` with per-batch deterministic masks."""

    def __init__(
        self,
        mask_ratio_tuple: tuple[float, float],
        mask_probability: float,
        n_tokens: int,
        mask_generator: MaskingGenerator,
        seed: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.mask_ratio_tuple = mask_ratio_tuple
        self.mask_probability = mask_probability
        self.n_tokens = n_tokens
        self.mask_generator = mask_generator
        self.seed = int(seed)
        self.dtype = dtype

    def __call__(self, samples: list[tuple[Any, int, int, int]]) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, MASK_STREAM, samples[0][3]])
        return collate_data_and_cast(
            [(crops, label, index) for crops, label, index, _ in samples],
            mask_ratio_tuple=self.mask_ratio_tuple,
            mask_probability=self.mask_probability,
            dtype=self.dtype,
            n_tokens=self.n_tokens,
            mask_generator=self.mask_generator,
            random=rng,
        )


class LocalDataIterator:
    """Infinite iterator of batch dicts; ``iteration`` is the index of the next batch."""

    def __init__(self, loader: DataLoader, start_iter: int) -> None:
        self.loader = loader
        self.dataset = loader.dataset.dataset  # type: ignore[attr-defined]
        self.sampler: EpochShuffleSampler = loader.sampler  # type: ignore[assignment]
        self.iteration = start_iter
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> LocalDataIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.iteration += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (they also stop when the iterator is garbage collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def make_masking(cfg: Any) -> tuple[MaskingGenerator, int]:
    """The iBOT mask generator for the global crop grid and its number of patch tokens (DINOv2: at most
    half the patches per crop)."""
    grid = int(cfg.crops.global_crops_size) // int(cfg.student.patch_size)
    n_tokens = grid * grid
    return MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * n_tokens), n_tokens


def make_local_data_iterator(
    cfg: Any,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LocalDataIterator:
    """Infinite iterator of batch dicts (see :mod:`semlab.data.pipeline.collate`) over
    ``cfg.train.dataset_path`` for
    ``rank`` of ``world_size``, starting at batch ``start_iter`` (exact resume). ``seed`` defaults to
    ``cfg.train.seed``. Batch ``cfg.train.batch_size_per_gpu``, ``cfg.train.num_workers`` workers (0: in
    this process); crops from ``cfg.crops``; masks from ``cfg.ibot.mask_ratio_min_max`` and
    ``cfg.ibot.mask_sample_probability`` on the ``global_crops_size // student.patch_size`` grid.
    """
    if seed is None:
        seed = int(cfg.train.get("seed", 0)) if hasattr(cfg.train, "get") else int(cfg.train.seed)
    batch_size = int(cfg.train.batch_size_per_gpu)
    if batch_size <= 0:
        raise ValueError(f"train.batch_size_per_gpu must be positive, got {batch_size}")
    num_workers = int(cfg.train.num_workers)
    if num_workers < 0:
        raise ValueError(f"train.num_workers must be >= 0, got {num_workers}")
    if start_iter < 0:
        raise ValueError(f"start_iter must be >= 0, got {start_iter}")
    dataset = make_dataset(cfg.train.dataset_path)
    data_cfg = cfg.get("data", None) or {}
    samples = AugmentedSamples(
        dataset, make_augmentation(cfg), seed,
        max_bad_fraction=float(data_cfg.get("max_bad_image_fraction", 0.0)),  # absent: stop at the first
        max_image_pixels=data_cfg.get("max_image_pixels", None),
    )
    mask_generator, n_tokens = make_masking(cfg)
    ratio = tuple(float(v) for v in cfg.ibot.mask_ratio_min_max)
    collate = MaskedCollate(
        (ratio[0], ratio[1]), float(cfg.ibot.mask_sample_probability), n_tokens, mask_generator, seed, dtype
    )
    sampler = EpochShuffleSampler(len(dataset), rank, world_size, seed, start=start_iter * batch_size)
    loader = DataLoader(
        samples,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    return LocalDataIterator(loader, start_iter)
