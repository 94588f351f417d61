"""Frozen-feature extraction for k-NN and probes.

Images go through the classification eval transform (resize the short side to ``resize_size``
with bicubic interpolation, center-crop ``crop_size``, ImageNet mean/std), then through the
backbone in eval mode (bf16 autocast on CUDA). Feature kinds, one (D,) vector per image:

- ``cls``:     ``x_norm_clstoken`` (for SEM backbones the SEM vector after the final norm);
- ``sem``:     the raw L*V simplex output at temperature ``sem_temp`` (SEM backbones only);
- ``avgpool``: the mean of ``x_norm_patchtokens``;
- ``pixels``:  no model: the normalised image average-pooled to ``pixel_size`` x ``pixel_size``
               and flattened (a raw-pixel baseline).

Features are returned as float32 on the CPU; the k-NN L2-normalises them.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

FEATURE_KINDS = ("cls", "sem", "avgpool", "pixels")


def make_eval_transform(resize_size: int = 256, crop_size: int = 224) -> Any:
    """The classification eval transform of ``semlab.data`` (resize bicubic, center crop, ImageNet norm)."""
    from semlab.data import make_eval_transform as data_eval_transform

    if crop_size > resize_size:
        raise ValueError(f"crop_size ({crop_size}) must be <= resize_size ({resize_size})")
    return data_eval_transform(resize_size, crop_size)


def _features(model: nn.Module | None, x: Tensor, kind: str, sem_temp: float, pixel_size: int) -> Tensor:
    if kind == "pixels":
        return F.adaptive_avg_pool2d(x.float(), pixel_size).flatten(1)
    assert model is not None
    if kind == "sem":
        return model.sem_raw(x, temp=sem_temp)
    out = model.forward_features(x)
    if kind == "cls":
        return out["x_norm_clstoken"]
    return out["x_norm_patchtokens"].mean(dim=1)


@torch.no_grad()
def extract_features(
    model: nn.Module | None,
    dataset: str | Dataset,
    kind: str = "cls",
    sem_temp: float = 1e-5,
    batch_size: int = 256,
    num_workers: int = 0,
    resize_size: int = 256,
    crop_size: int = 224,
    transform: Any = None,
    device: torch.device | str | None = None,
    pixel_size: int = 16,
    desc: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(features (N, D) float32 CPU, labels (N,) long) for every image of ``dataset``.

    ``dataset`` is a dataset string (``semlab.data.make_dataset``; it gets the eval transform
    unless ``transform`` is given) or a ready ``Dataset`` whose items are ``(image tensor, label)``.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind '{kind}'; expected one of {FEATURE_KINDS}")
    if kind != "pixels" and model is None:
        raise ValueError(f"feature kind '{kind}' needs a model")
    if kind == "sem" and not getattr(model, "has_sem", False):
        raise ValueError("feature kind 'sem' needs a SEM backbone (student.L > 0); use 'cls' for a plain ViT")
    if isinstance(dataset, str):
        from semlab.data import make_dataset

        name = dataset
        dataset = make_dataset(dataset, transform=transform or make_eval_transform(resize_size, crop_size))
    else:
        name = type(dataset).__name__
    if device is None:
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and kind != "pixels"
        else contextlib.nullcontext()
    )
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    show = sys.stderr.isatty()
    try:
        for images, targets in tqdm(loader, desc=desc or f"features[{kind}] {name}", disable=not show):
            images = images.to(device, non_blocking=True)
            with amp:
                f = _features(model, images, kind, sem_temp, pixel_size)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
    finally:
        if model is not None:
            model.train(was_training)
    if not feats:
        raise ValueError(f"dataset {name} is empty: no features to extract")
    return torch.cat(feats), torch.cat(labels)
