"""Analytic FLOPs of one SSL training step per image (matrix products only; 1 multiply-add = 2 FLOPs).

Per crop of ``N = 1 + R + (S/p)^2`` tokens through a ViT of width ``D``, depth ``L_b``, MLP ratio ``r``:

    blocks   = L_b * N * (2 * (4 + 2 r) D^2 + 4 N D)      qkv + proj + MLP, then q k^T and attn v
    patches  = (S/p)^2 * 2 * (3 p^2) D
    SEM      = 2 * ((1 + R) D * L V + L V * D)             sem_embed and sem_out, once per crop
    head     = rows * 2 * (D h + h h + h b + b K)          DINO head (3 layers + prototypes)

The student runs forward + backward (3x the forward) on 2 global + n local crops and on its head rows
(n + 2 CLS rows and the masked patches); the teacher runs forward only on the 2 global crops and its
head rows (2 CLS + masked patches). Masked patches per image: half the global crops, at a mean ratio of
``(r_min + r_max) / 2`` of the patch grid. For the seed recipe this gives 2.17 TFLOP per image against the
2.197 the reference profiler counted (shared/reference/README.md), so MFU figures for other
architectures use this estimate and say so.
"""

from __future__ import annotations

from typing import Any

# embed_dim, depth, mlp_ratio (ViT-g's SwiGLU: 3 matrices of 2/3 the width = the MLP's FLOPs at ratio 4)
ARCH_SHAPES = {
    "vit_tiny": (192, 12, 4.0),
    "vit_small": (384, 12, 4.0),
    "vit_base": (768, 12, 4.0),
    "vit_large": (1024, 24, 4.0),
    "vit_giant2": (1536, 40, 4.0),
}


def _crop_flops(size: int, patch: int, d: int, depth: int, mlp: float, regs: int, sem_lv: int) -> float:
    grid = (size // patch) ** 2
    n = 1 + regs + grid
    blocks = depth * n * (2 * (4 + 2 * mlp) * d * d + 4 * n * d)
    patches = grid * 2 * 3 * patch * patch * d
    sem = 2 * ((1 + regs) * d * sem_lv + sem_lv * d) if sem_lv else 0.0
    return blocks + patches + sem


def tflop_per_image(cfg: Any) -> float:
    """Estimated TFLOP of one training step per image for the config ``cfg`` (module docstring)."""
    s = cfg.student
    arch = str(s.arch).removesuffix("_sem")
    d0, depth0, mlp = ARCH_SHAPES[arch]
    d = int(s.embed_dim) if s.embed_dim is not None else d0
    depth = int(s.depth) if s.depth is not None else depth0
    regs, patch = int(s.num_register_tokens), int(s.patch_size)
    sem_lv = int(s.L) * int(s.V) if int(s.L) > 0 else 0
    gs, ls = int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size)
    n_loc = int(cfg.crops.local_crops_number)
    glob = _crop_flops(gs, patch, d, depth, mlp, regs, sem_lv)
    loc = _crop_flops(ls, patch, d, depth, mlp, regs, sem_lv)
    dino = cfg.dino
    h, b, k = int(dino.head_hidden_dim), int(dino.head_bottleneck_dim), int(dino.head_n_prototypes)
    head_row = 2 * (d * h + h * h + h * b + b * k)
    r_min, r_max = (float(x) for x in cfg.ibot.mask_ratio_min_max)
    masked = 2 * float(cfg.ibot.mask_sample_probability) * (r_min + r_max) / 2 * (gs // patch) ** 2
    student = 3 * (2 * glob + n_loc * loc + (2 + n_loc + masked) * head_row)
    teacher = 2 * glob + (2 + masked) * head_row
    return (student + teacher) / 1e12
