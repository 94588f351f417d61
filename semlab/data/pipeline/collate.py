"""Collate multi-crop samples into the batch dict of the training step, with iBOT masks.

For B samples with 2 global and n local crops:

- ``collated_global_crops`` (2B, 3, G, G) and ``collated_local_crops`` (nB, 3, l, l), crop-major
  (all samples' crop 0, then all samples' crop 1, ...), float crops cast to ``dtype``, uint8 crops
  (``data.normalize_on_device``) kept as they are;
- masks: of the ``2B`` global crops, ``M = int(2B * mask_probability)`` are masked; with
  ``p = linspace(r_min, r_max, M + 1)``, masked crop ``i`` asks for ``int(N * U[p_i, p_{i+1}])`` of its
  ``N = n_tokens`` patches (block masking), the others get an empty mask; the list is shuffled.
  ``collated_masks`` (2B, N) bool; ``mask_indices_list`` the flat indices of masked patches;
  ``masks_weight`` ``1 / (masked patches of its crop)`` per masked patch (so it sums to 1 per masked crop);
  ``n_masked_patches`` (1,) long; ``upperbound`` = ``sum_i int(N p_{i+1})`` (a bound on the masked count);
- ``labels`` (B,) and ``indices`` (B,) long (``-1`` when samples carry no index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from semlab.data.pipeline.masking import MaskingGenerator, UniformSource


def collate_data_and_cast(
    samples_list: Sequence[tuple[Any, ...]],
    mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    random: Any = None,
) -> dict[str, Any]:
    """The batch dict of ``samples_list`` (items ``(aug_dict, label)`` or ``(aug_dict, label, index)``).

    ``random``: ``random.Random``, numpy Generator or seed for the mask ratios, blocks and shuffle
    (None: the global ``random`` module, as the reference).
    """
    if not samples_list:
        raise ValueError("collate_data_and_cast got an empty batch")
    if mask_generator is None:
        raise ValueError("collate_data_and_cast needs a mask_generator (semlab.data.MaskingGenerator)")
    rng = UniformSource(random)
    n_global = len(samples_list[0][0]["global_crops"])
    n_local = len(samples_list[0][0]["local_crops"])
    global_crops = torch.stack([s[0]["global_crops"][i] for i in range(n_global) for s in samples_list])
    if n_local:
        local_crops = torch.stack([s[0]["local_crops"][i] for i in range(n_local) for s in samples_list])
    else:
        local_crops = torch.empty(0, *global_crops.shape[1:2], 0, 0)

    masks = draw_ibot_masks(
        len(global_crops), mask_generator, n_tokens, mask_ratio_tuple, mask_probability, rng
    )
    labels = torch.as_tensor([int(s[1]) for s in samples_list], dtype=torch.long)
    indices = torch.as_tensor([int(s[2]) if len(s) > 2 else -1 for s in samples_list], dtype=torch.long)
    return {  # uint8 crops (normalised later, on the device) stay uint8
        "collated_global_crops": global_crops.to(dtype) if global_crops.is_floating_point() else global_crops,
        "collated_local_crops": local_crops.to(dtype) if local_crops.is_floating_point() else local_crops,
        **masks,
        "labels": labels,
        "indices": indices,
    }


def draw_ibot_masks(
    n_crops: int,
    mask_generator: MaskingGenerator,
    n_tokens: int | None = None,
    mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    random: Any = None,
) -> dict[str, Any]:
    """The iBOT mask entries of a batch dict for ``n_crops`` global crops (module docstring).

    ``M = int(n_crops * mask_probability)`` crops get a block mask of ``int(N * U[p_i, p_{i+1}])``
    patches (``p = linspace(r_min, r_max, M + 1)``), the others an empty one, in a shuffled order.
    ``random``: as in :func:`collate_data_and_cast`; pass one generator (or :class:`UniformSource`) to keep
    one stream across batches. Returns ``collated_masks``, ``mask_indices_list``,
    ``masks_weight``, ``upperbound`` and ``n_masked_patches``.
    """
    rng = UniformSource(random)
    n_patches = int(n_tokens) if n_tokens is not None else mask_generator.num_patches
    n_masked_crops = int(n_crops * mask_probability)
    probs = np.linspace(float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]), n_masked_crops + 1)
    upperbound = 0
    masks: list[torch.Tensor] = []
    for i in range(n_masked_crops):
        lo, hi = float(probs[i]), float(probs[i + 1])
        masks.append(torch.from_numpy(mask_generator(int(n_patches * rng.uniform(lo, hi)), rng=rng)))
        upperbound += int(n_patches * hi)
    for _ in range(n_masked_crops, n_crops):
        masks.append(torch.from_numpy(mask_generator(0, rng=rng)))
    rng.shuffle(masks)

    collated_masks = torch.stack(masks).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop = collated_masks.sum(-1).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / per_crop).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
