"""Synthetic SSL batches in the training step's format, shared by the training tests."""

import torch

from semlab.losses.ibot import masked_patch_weights


def synthetic_batch(cfg, seed=0, b=4, mask=True):
    """A deterministic batch dict (see docs/architecture.md) of random crops for ``cfg``'s crop sizes.

    With ``mask``, half of the global crops (the first ``b`` rows) get 1 or 2 masked patches.
    """
    g = torch.Generator().manual_seed(seed)
    gs, ls, n_loc = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    n_patches = (gs // cfg.student.patch_size) ** 2
    masks = torch.zeros(2 * b, n_patches, dtype=torch.bool)
    if mask:
        for i in range(b):  # half of the global crops masked, as the collate does
            masks[i, torch.randperm(n_patches, generator=g)[: 1 + i % 2]] = True
    idx = masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": torch.randn(2 * b, 3, gs, gs, generator=g),
        "collated_local_crops": torch.randn(n_loc * b, 3, ls, ls, generator=g),
        "collated_masks": masks,
        "mask_indices_list": idx,
        "masks_weight": masked_patch_weights(masks),
        "n_masked_patches": torch.tensor([idx.numel()]),
        "upperbound": int(idx.numel()),
        "labels": torch.zeros(b, dtype=torch.long),
        "indices": torch.arange(b),
    }
