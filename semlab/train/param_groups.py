"""Optimizer parameter groups of the DINOv2 recipe (layer-wise lr decay, no decay on norms).

For a backbone of ``n`` blocks, a parameter's layer id is

    pos_embed, patch_embed, mask_token, cls_token, register_tokens     -> 0
    blocks.<i>.*  (or chunked blocks.<c>.<i>.*, i the global index)    -> i + 1
    everything else (final norm, SEM, heads)                           -> n + 1

and its lr multiplier is ``layerwise_decay ** (n + 1 - layer_id)`` (times
``patch_embed_lr_mult`` for ``patch_embed``). Weight decay is off (``wd_multiplier = 0``) for
biases, any 1-D parameter, names containing ``norm`` (incl. ``sem_norm``) and LayerScale
``gamma``. Parameters of ``last_layer`` get ``is_last_layer = True`` (their lr follows the
last-layer schedule, 0 while frozen). Groups are fused by
``(lr_multiplier, wd_multiplier, is_last_layer)``.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

LAYER0_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
FUSE_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer")


def _strip_wrappers(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(wrapper, "")
    return name


def vit_layer_id(name: str, num_layers: int, chunked_blocks: bool = False) -> int:
    """Layer id of a backbone parameter name (relative to the backbone), see module doc."""
    parts = name.split(".")
    if parts[0] in LAYER0_NAMES:
        return 0
    if parts[0] == "blocks" and len(parts) > 2:
        # chunked: blocks.<chunk>.<global i>.<...>; plain: blocks.<i>.<...>
        if chunked_blocks and parts[2].isdigit():
            return int(parts[2]) + 1
        if parts[1].isdigit():
            return int(parts[1]) + 1
    return num_layers + 1


def _backbone_depth(backbone: nn.Module) -> tuple[int, bool]:
    """(number of blocks, chunked?) of a DINOv2-style backbone."""
    if hasattr(backbone, "n_blocks"):
        return int(backbone.n_blocks), bool(getattr(backbone, "chunked_blocks", False))
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        return 0, False
    chunked = bool(getattr(backbone, "chunked_blocks", False))
    if chunked:
        n = sum(1 for chunk in blocks for b in chunk if not isinstance(b, nn.Identity))
        return n, True
    return len(blocks), False


def param_groups_for_module(
    module: nn.Module,
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    is_backbone: bool | None = None,
    prefix: str = "",
) -> list[dict[str, Any]]:
    """One dict per trainable parameter: params, name, lr_multiplier, wd_multiplier, is_last_layer.

    ``is_backbone`` (default: the module has ``blocks``) switches the layer-wise decay on; a head
    has layer id ``n + 1`` for all its parameters, i.e. multiplier 1.
    """
    n_blocks, chunked = _backbone_depth(module)
    if is_backbone is None:
        is_backbone = n_blocks > 0
    groups = []
    for raw_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        name = _strip_wrappers(raw_name)
        if is_backbone:
            layer_id = vit_layer_id(name, n_blocks, chunked)
            lr_mult = float(lr_decay_rate ** (n_blocks + 1 - layer_id))
        else:
            lr_mult = 1.0
        leaf = name.rsplit(".", 1)[-1]
        no_decay = name.endswith(".bias") or param.ndim <= 1 or "norm" in name or "gamma" in leaf
        if "patch_embed" in name:
            lr_mult *= float(patch_embed_lr_mult)
        groups.append(
            {
                "params": param,
                "name": prefix + name,
                "lr_multiplier": lr_mult,
                "wd_multiplier": 0.0 if no_decay else 1.0,
                "is_last_layer": "last_layer" in name,
            }
        )
    return groups


def fuse_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge per-parameter dicts sharing (lr_multiplier, wd_multiplier, is_last_layer)."""
    fused: dict[tuple, dict[str, Any]] = {}
    for g in groups:
        key = tuple(g[k] for k in FUSE_KEYS)
        entry = fused.setdefault(key, {**{k: g[k] for k in FUSE_KEYS}, "params": [], "names": []})
        entry["params"].append(g["params"])
        entry["names"].append(g["name"])
    return list(fused.values())


def get_param_groups(student: nn.ModuleDict, cfg: DictConfig) -> list[dict[str, Any]]:
    """Fused parameter groups of all student submodules (backbone with layer-wise decay, heads flat)."""
    groups: list[dict[str, Any]] = []
    for key, module in student.items():
        groups += param_groups_for_module(
            module,
            lr_decay_rate=float(cfg.optim.layerwise_decay),
            patch_embed_lr_mult=float(cfg.optim.patch_embed_lr_mult),
            is_backbone=(key == "backbone"),
            prefix=f"{key}.",
        )
    return fuse_param_groups(groups)


def build_optimizer(param_groups: list[dict[str, Any]], cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over the groups; lr and weight decay are set every step by ``apply_optim_schedule``.

    ``optim.fused``: AdamW's fused kernel (one kernel for all parameters of a device and dtype, CUDA or
    CPU) instead of torch's default multi-tensor ``foreach`` one; same update rule."""
    torch_groups = [{"params": g["params"], **{k: g[k] for k in FUSE_KEYS}} for g in param_groups]
    betas = (float(cfg.optim.adamw_beta1), float(cfg.optim.adamw_beta2))
    fused = True if bool(cfg.optim.fused) else None  # None: torch's default choice (today's behaviour)
    return torch.optim.AdamW(torch_groups, lr=0.0, weight_decay=0.0, betas=betas, fused=fused)


def apply_optim_schedule(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float
) -> None:
    """Per group: ``lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier``,
    ``weight_decay = wd * wd_multiplier``."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
