"""Speed options, applied to an :class:`SSLMetaArch` from the outside (the model files know nothing of them).

Each option leaves the function computed unchanged (tests/test_speed_options.py checks each against the
eager step on CPU; benchmarks/train_step.py checks and times them on a GPU):

- ``train.activation_checkpointing``: per transformer block of the student backbone,
  ``full`` keeps only the block's input and recomputes the whole block in the backward;
  ``selective`` keeps the outputs of the matrix products and attention (the expensive ops) and
  recomputes the pointwise ones (LayerNorm, GELU, LayerScale, residual adds), which hold most of a
  block's activation bytes per FLOP. Recomputation replays the RNG state, so drop path draws the same
  samples. ``none`` = no recomputation.
- ``train.compile``: regional ``torch.compile``: every transformer block's forward (student and teacher)
  is compiled on its own with ``fullgraph=True`` (a graph break is an error, not a silent fallback) and
  static shapes. All blocks share one code object, so the graph is compiled once per input signature
  (student crop list, teacher tensor, grad mode) and reused by every block.

Both replace the block's bound ``forward`` by a wrapped one, so parameter names, state dicts and
FSDP2's per-block hooks (which run around ``forward``) are unchanged. Apply them before
:func:`semlab.train.parallel.parallelize` shards the model, as :func:`apply_speed_options` does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

logger = logging.getLogger(__name__)

AC_MODES = ("none", "selective", "full")
_aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps (everything else is recomputed in the backward).
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


class SpeedOptionError(ValueError):
    """A speed option has a value semlab does not know; the message lists the valid ones."""


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable[..., Any], mode: str) -> Callable[..., Any]:
    context_fn = None
    if mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # teacher, evaluation: nothing to save or recompute
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return checkpointed_forward


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    return list(backbone.iter_blocks()) if hasattr(backbone, "iter_blocks") else []


def apply_activation_checkpointing(backbone: nn.Module, mode: str) -> int:
    """Wrap each block's forward of ``backbone`` with checkpointing ``mode``; returns the number wrapped."""
    if mode not in AC_MODES:
        raise SpeedOptionError(
            f"train.activation_checkpointing='{mode}': use one of {', '.join(AC_MODES)}"
        )
    if mode == "none":
        return 0
    blocks = transformer_blocks(backbone)
    for block in blocks:
        block.forward = _checkpointed(block.forward, mode)  # type: ignore[method-assign]
    return len(blocks)


def apply_regional_compile(backbone: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` each block's forward of ``backbone`` (fullgraph, static shapes); returns how many."""
    blocks = transformer_blocks(backbone)
    # one cache entry per (block, input signature) at most: room for all blocks, student and teacher
    limit = 4 * len(blocks) + 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
    for block in blocks:
        block.forward = torch.compile(  # type: ignore[method-assign]
            block.forward, backend=backend, fullgraph=True, dynamic=False
        )
    return len(blocks)


def describe(cfg: DictConfig) -> str:
    """One line naming every speed choice of ``cfg`` (logged when the model is set up)."""
    return (
        f"attention kernel {cfg.student.attention}, pack_crops {bool(cfg.student.pack_crops)}, "
        f"compile {bool(cfg.train.compile)}, activation checkpointing {cfg.train.activation_checkpointing}, "
        f"fused AdamW {bool(cfg.optim.fused)}, loss_chunk_rows {int(cfg.train.loss_chunk_rows)}, "
        f"sync_free_step {bool(cfg.train.sync_free_step)}, "
        f"normalize_on_device {bool(cfg.data.normalize_on_device)}"
    )


def apply_speed_options(
    meta_arch: nn.Module, cfg: DictConfig, compile_backend: str = "inductor"
) -> nn.Module:
    """Activation checkpointing (student backbone) then regional compile (student and teacher
    backbones), in place, once; logs the choices (including the attention kernel)."""
    if getattr(meta_arch, "_speed_options_applied", False):
        return meta_arch
    mode = str(cfg.train.activation_checkpointing)
    apply_activation_checkpointing(meta_arch.student.backbone, mode)
    if bool(cfg.train.compile):
        for tower in (meta_arch.student, meta_arch.teacher):
            apply_regional_compile(tower.backbone, compile_backend)
    meta_arch._speed_options_applied = True  # type: ignore[assignment]
    logger.info("speed options: %s", describe(cfg))
    return meta_arch
