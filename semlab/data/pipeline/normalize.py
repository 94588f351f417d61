"""Crops as uint8 pixels on the way to the device, normalised there.

The multi-crop augmentation's pixels are integers in [0, 255] right before its last step, the ImageNet
normalisation ``x_norm = x * scale + shift`` with ``scale = 1 / (255 std)`` and ``shift = -mean / std``
per channel. With ``data.normalize_on_device: true`` the augmentation stops before that step and the
crops travel as uint8 (a quarter of float32's bytes through collation, pinned host memory and the
host-to-device copy); :func:`to_device_normalized` copies them (asynchronously from pinned memory) and
applies the same two float32 operations on the device, so the result equals the CPU path's
(``tests/test_normalize_on_device.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from semlab.data.pipeline.augment import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

CROP_KEYS = ("collated_global_crops", "collated_local_crops")


@functools.lru_cache(maxsize=8)
def norm_constants(device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(scale, shift) of shape (3, 1, 1) in float32 on ``device``: ``x_norm = x * scale + shift``."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (1.0 / (255.0 * std)).to(device), (-mean / std).to(device)


def normalize_uint8(x: Tensor) -> Tensor:
    """uint8 crops (..., 3, H, W) -> float32 ``x * scale + shift`` on ``x``'s device."""
    scale, shift = norm_constants(x.device)
    return x.to(torch.float32).mul_(scale).add_(shift)


def to_device_normalized(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of ``batch`` moved to ``device`` (non-blocking); uint8 crops are normalised there,
    float crops (normalised on the CPU already) are moved as they are."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value.to(device, non_blocking=True)
            if key in CROP_KEYS and value.dtype == torch.uint8:
                value = normalize_uint8(value)
        out[key] = value
    return out
