"""Synthetic SSL batches in the training step's format, shared by the training tests."""

import torch

from semlab.losses.ibot import masked_patch_weights

# A tiny SSL model and crop geometry on top of train/demo_tiny, shared by the meta-arch and loop tests
TINY_SSL = [
    "student.embed_dim=24",
    "student.depth=2",
    "student.num_heads=2",
    "student.img_size=28",
    "student.patch_size=14",
    "student.num_register_tokens=2",
    "student.L=4",
    "student.V=4",
    "crops.global_crops_size=28",
    "crops.local_crops_size=14",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=32",
    "dino.head_bottleneck_dim=8",
    "dino.head_hidden_dim=16",
    "ibot.head_n_prototypes=32",
    "ibot.head_bottleneck_dim=8",
    "ibot.head_hidden_dim=16",
    "train.batch_size_per_gpu=4",
]
# A 48-d, 3-head tiny SSL model and crops: the one the parallel, Ray Train, job and benchmark tests train
TINY_SSL_48 = [
    "student.embed_dim=48",
    "student.depth=2",
    "student.num_heads=3",
    "student.img_size=28",
    "student.L=4",
    "student.V=4",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "crops.global_crops_size=28",
    "crops.local_crops_size=14",
    "crops.local_crops_number=2",
]


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
