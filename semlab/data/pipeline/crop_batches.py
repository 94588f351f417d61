"""Augmented rows -> the training step's batch dict, in three stages that can run on different threads.

The Ray Data path (:mod:`semlab.data.pipeline.ray_pipeline`) splits the collation of
:func:`~semlab.data.pipeline.collate.collate_data_and_cast` so that none of it runs on the training thread:

1. :func:`rows_to_crop_tensors` -- a numpy batch of ``b`` augmented rows (``global_crops``
   (b, 2, 3, G, G), ``local_crops`` (b, n, 3, l, l), ``label``, ``index``) to crop-major tensors
   ``global_crops`` (2b, 3, G, G), ``local_crops`` (nb, 3, l, l) (all samples' crop 0, then crop 1,
   ...), normalised to float32 ``x * scale + shift`` unless the crops stay uint8 for the device.
   Ray Data runs it as the ``collate_fn`` of ``iter_torch_batches``, in its own threads, and pins the result.
2. :func:`recut` -- batches of exactly ``B`` rows from batches of any size: an epoch of ``N`` rows ends
   in a batch of ``N mod B``, which is completed from the next epoch, as the reference's infinite sampler
   does. A batch that already has ``B`` rows passes through untouched; otherwise the rows are copied once
   into a new (pinned, when asked) batch.
3. :func:`with_masks` -- the iBOT masks of :func:`~semlab.data.pipeline.collate.draw_ibot_masks`
   (one generator across batches: :func:`make_mask_drawer`), drawn per batch of ``B`` (their number,
   ``int(2B p)``, depends on ``B``, so they are drawn after the recut).

Stages 2 and 3 run on one background thread (:func:`exact_batches_with_masks`), in batch order, so a
seeded mask generator gives the same masks as the one-call collation on the same rows
(``tests/test_crop_batches.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from semlab.data.pipeline.collate import draw_ibot_masks
from semlab.data.pipeline.loaders import make_masking
from semlab.data.pipeline.normalize import normalize_uint8
from semlab.data.pipeline.prefetch import prefetch_in_thread

CROPS = ("global_crops", "local_crops")


def crop_major(x: np.ndarray, normalise: bool) -> Tensor:
    """(b, n, 3, H, W) crops -> (n b, 3, H, W), crop-major; uint8 normalised to float32 when ``normalise``.

    The result owns its memory: the arrays Ray Data hands over may be read-only views of its blocks.
    """
    t = _read_only_view(x).transpose(0, 1).clone(memory_format=torch.contiguous_format).flatten(0, 1)
    if t.dtype == torch.uint8:
        return normalize_uint8(t) if normalise else t
    if not normalise:
        raise ValueError(
            f"crops left for the device to normalise (data.normalize_on_device) must be uint8, "
            f"got {t.dtype}: build the Ray dataset with emit_uint8=True (the default)"
        )
    return t.to(torch.float32)


def _read_only_view(x: np.ndarray) -> Tensor:
    """``torch.from_numpy`` without its warning for read-only arrays: the caller copies before any write."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(x))


def rows_to_crop_tensors(batch: dict[str, np.ndarray], normalise: bool) -> dict[str, Tensor]:
    """Stage 1: a numpy batch of augmented rows -> crop-major tensors plus ``labels`` and ``indices``."""
    return {
        "global_crops": crop_major(batch["global_crops"], normalise),
        "local_crops": crop_major(batch["local_crops"], normalise),
        "labels": torch.tensor(np.asarray(batch["label"], dtype=np.int64)),
        "indices": torch.tensor(np.asarray(batch["index"], dtype=np.int64)),
    }


def _by_row(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Views with the row (sample) axis at dim 1 for crops ((n, b, 3, H, W)) and dim 0 otherwise."""
    b = int(batch["labels"].shape[0])
    out = {}
    for key, value in batch.items():
        out[key] = value.unflatten(0, (value.shape[0] // b, b)) if key in CROPS else value
    return out


def _row_dim(key: str) -> int:
    return 1 if key in CROPS else 0


def _join(pieces: list[dict[str, Tensor]], pin: bool) -> dict[str, Tensor]:
    """One batch from row-views ``pieces``: each field copied once into a fresh (pinned) tensor."""
    out = {}
    for key in pieces[0]:
        dim = _row_dim(key)
        parts = [p[key] for p in pieces]
        shape = list(parts[0].shape)
        shape[dim] = sum(int(p.shape[dim]) for p in parts)
        buffer = torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin and key in CROPS)
        torch.cat(parts, dim=dim, out=buffer)
        out[key] = buffer.flatten(0, 1) if key in CROPS else buffer
    return out


def recut(
    batches: Iterator[dict[str, Tensor]], batch_size: int, pin: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Stage 2: batches of exactly ``batch_size`` rows, in order, carrying the rest of a batch over.

    ``pin``: new crop tensors (those of a joined batch) go to pinned memory; a batch passed through keeps
    its own memory (Ray Data pins it).
    """
    pending: list[dict[str, Tensor]] = []
    count = 0
    for batch in batches:
        n = int(batch["labels"].shape[0])
        if n == 0:
            continue
        if not pending and n == batch_size:
            yield batch
            continue
        rows = _by_row(batch)
        start = 0
        while start < n:
            take = min(batch_size - count, n - start)
            pending.append({k: v.narrow(_row_dim(k), start, take) for k, v in rows.items()})
            count += take
            start += take
            if count == batch_size:
                yield _join(pending, pin)
                pending, count = [], 0


def with_masks(batch: dict[str, Tensor], draw_masks: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Stage 3: the training step's batch dict (keys of :mod:`semlab.data.pipeline.collate`);
    ``draw_masks(n_global_crops)`` gives the iBOT mask entries."""
    return {
        "collated_global_crops": batch["global_crops"],
        "collated_local_crops": batch["local_crops"],
        **draw_masks(int(batch["global_crops"].shape[0])),
        "labels": batch["labels"],
        "indices": batch["indices"],
    }


def make_mask_drawer(cfg: Any, seed: int) -> Any:
    """``draw(n_global_crops) -> iBOT mask entries`` from one generator seeded with ``seed`` (DINOv2
    settings: a ``(G/p) x (G/p)`` grid, at most half of it per block mask, ratios ``ibot.mask_ratio_min_max``
    on ``ibot.mask_sample_probability`` of the global crops); the stream of masks continues across calls."""
    mask_generator, n_tokens = make_masking(cfg)
    ratios = tuple(float(r) for r in cfg.ibot.mask_ratio_min_max)
    probability = float(cfg.ibot.mask_sample_probability)
    rng = np.random.default_rng(seed)

    def draw(n_crops: int) -> dict[str, Any]:
        return draw_ibot_masks(n_crops, mask_generator, n_tokens, ratios, probability, rng)

    return draw


def exact_batches_with_masks(
    tensor_batches: Iterator[dict[str, Tensor]], cfg: Any, seed: int, pin: bool, depth: int, name: str
) -> Iterator[dict[str, Any]]:
    """Stages 2 and 3 on one background thread (:func:`~semlab.data.pipeline.prefetch.prefetch_in_thread`,
    ``depth`` batches ahead; 0: on the caller's thread): batches of exactly ``train.batch_size_per_gpu``
    rows with iBOT masks drawn from a generator seeded with ``seed``."""
    draw_masks = make_mask_drawer(cfg, seed)
    exact = recut(tensor_batches, int(cfg.train.batch_size_per_gpu), pin=pin)
    return prefetch_in_thread((with_masks(batch, draw_masks) for batch in exact), depth, name=name)
