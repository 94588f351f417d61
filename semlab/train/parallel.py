"""Data parallelism for :class:`SSLMetaArch`: FSDP2 (``fully_shard``) or DDP-style replication.

torch only: this module knows nothing of Ray; whoever started the process group (Ray Train,
torchrun, ``torch.multiprocessing``) calls :func:`parallelize` once, after building the model and
before building the optimizer, so that the optimizer holds the distributed parameters.

The math. With W ranks holding b = B / W images each, rank r computes the gradient ``g_r`` of
its local mean loss; data parallelism makes every rank apply ``g = (1/W) sum_r g_r``, which is the
gradient of the mean loss over all B images whenever the loss is a mean over equally sized local
batches (the DINO and iBOT cross-entropies; the Sinkhorn-Knopp and softmax-centering statistics
are all-reduced by the losses themselves; KoLeo is, as in the reference, per rank).

Strategies (``compute_precision.sharding_strategy``, the reference's names):

- ``SHARD_GRAD_OP`` (default, the reference's choice): FSDP2 ``fully_shard`` on every transformer
  block, then on each tower module (backbone, heads) with ``reshard_after_forward=False``. Every
  parameter is split along dim 0 into W shards (DTensors); a module all-gathers its parameters
  before forward and keeps them until its backward, which reduce-scatters the averaged gradient so
  rank r holds shard r of ``g``; AdamW, grad clipping and the EMA then act on local shards only.
- ``FULL_SHARD``: the same with ``reshard_after_forward=True`` (parameters re-gathered in backward).
- ``NO_SHARD``: DDP-style replication without a wrapper: parameters are broadcast from rank 0 and
  every gradient is averaged by an all-reduce started from a post-accumulate-grad hook as soon as
  it is complete, and waited for at the end of backward. State-dict keys do not change.

The teacher is sharded like the student (same placements, no gradients), so the EMA
``teacher = m teacher + (1 - m) student`` runs shard by shard. Its top-level modules are set to
reshard after forward, so between steps its parameters are always the sharded DTensors that the
EMA pairs with the student's. On CUDA, parameters are computed in ``compute_precision.param_dtype``
(bf16) and gradients reduced in ``compute_precision.reduce_dtype`` (fp32) through FSDP2's
``MixedPrecisionPolicy``; on CPU everything stays float32 (gloo has no bf16 benefit and exact
float32 keeps 1-worker and W-worker runs comparable).

A single process (no process group, or world size 1) is a no-op. Checkpoints are written and read
as full state dicts (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``), so
a run can resume on another number of workers. ``torch.nn.utils.clip_grad_norm_`` handles the
DTensor gradients of FSDP2 (the norm is reduced over shards).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from semlab.train.speed import apply_speed_options
from semlab.utils.distributed import get_world_size

logger = logging.getLogger(__name__)

STRATEGIES = ("SHARD_GRAD_OP", "FULL_SHARD", "NO_SHARD")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Backbone methods that run the blocks without going through ``forward`` (and may be called on a
# sharded backbone, e.g. by evaluation code): FSDP2 must unshard around them too.
_EXTRA_FORWARD_METHODS = ("get_intermediate_layers", "sem_raw", "dlc")


class ParallelError(ValueError):
    """The parallel configuration cannot be applied; the message says what to change."""


def resolve_strategy(cfg: DictConfig) -> str:
    """``compute_precision.sharding_strategy`` checked against :data:`STRATEGIES`."""
    section = cfg.get("compute_precision", None)
    strategy = str(
        section.get("sharding_strategy", "SHARD_GRAD_OP") if section is not None else "SHARD_GRAD_OP"
    )
    strategy = strategy.upper()
    if strategy not in STRATEGIES:
        raise ParallelError(
            f"compute_precision.sharding_strategy='{strategy}' is not supported; "
            f"use one of {', '.join(STRATEGIES)}"
        )
    return strategy


def _dtype(cfg: DictConfig, key: str, default: str) -> torch.dtype:
    name = str(cfg.compute_precision.get(key, default)).lower()
    if name not in _DTYPES:
        raise ParallelError(
            f"compute_precision.{key}='{name}' is not a dtype; use one of {', '.join(_DTYPES)}"
        )
    return _DTYPES[name]


def mixed_precision_policy(cfg: DictConfig, device: torch.device) -> Any:
    """FSDP2 policy: on CUDA compute in ``param_dtype``, reduce in ``reduce_dtype``; fp32 elsewhere.

    ``compute_precision.autocast: off`` also switches the CUDA policy off (pure fp32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    autocast = str(cfg.compute_precision.get("autocast", "auto")).lower()
    if device.type != "cuda" or autocast == "off":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=_dtype(cfg, "param_dtype", "bf16"), reduce_dtype=_dtype(cfg, "reduce_dtype", "fp32")
    )


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's transformer blocks in order (through block chunks); [] if it has none."""
    if hasattr(backbone, "iter_blocks"):
        return list(backbone.iter_blocks())
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        return []
    out: list[nn.Module] = []
    for module in blocks:
        if isinstance(module, nn.ModuleList | nn.Sequential):
            out += [b for b in module if not isinstance(b, nn.Identity)]
        else:
            out.append(module)
    return out


def _unique_modules(tower: nn.ModuleDict) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of a tower, each module once (a head may be shared under two names)."""
    seen: set[int] = set()
    for name, module in tower.items():
        if id(module) not in seen:
            seen.add(id(module))
            yield name, module


@torch.no_grad()
def broadcast_from_rank0(modules: Iterable[nn.Module]) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start, whatever the seeds)."""
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


# torch 2.14 warns whenever an FSDP2 module returns a view (an in-place op on it would skip the hook that
# all-gathers the parameters for backward). The backbone's outputs are slices of its final norm, as in the
# reference, and the training step only reads them out of place (chunk, index_select, heads); the
# two-rank FULL_SHARD / SHARD_GRAD_OP runs of tests/test_parallel.py, iBOT masks included, equal the
# single-process gradients, which a dropped hook would break. The warning, repeated in every worker's
# log, would only alarm.
_VIEW_OUTPUT_WARNING = r"FSDP2-wrapped module \(.*\) returned a view tensor"


def _shard_tower(
    tower: nn.ModuleDict, mesh: Any, reshard_after_forward: bool, mp_policy: Any, is_teacher: bool
) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    warnings.filterwarnings("ignore", message=_VIEW_OUTPUT_WARNING, category=UserWarning)
    for _, module in _unique_modules(tower):
        blocks = transformer_blocks(module)
        n = len(blocks)
        for i, block in enumerate(blocks):
            # The last block is all-gathered again right away by the backward: keep it (torchtitan).
            fully_shard(
                block,
                mesh=mesh,
                mp_policy=mp_policy,
                reshard_after_forward=reshard_after_forward and (is_teacher or i < n - 1),
            )
        fully_shard(module, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
        for method in _EXTRA_FORWARD_METHODS:
            if callable(getattr(module, method, None)):
                register_fsdp_forward_method(module, method)
        if is_teacher:
            # FSDP2 keeps a root module's parameters gathered after forward (training expects its
            # backward next); the teacher has no backward, and the EMA needs its shards.
            module.set_reshard_after_forward(True)  # type: ignore[operator]


class GradientAllReduce:
    """DDP-style gradient averaging through post-accumulate-grad hooks (no module wrapper).

    For each parameter, as soon as autograd has accumulated its gradient, ``grad / W`` is
    all-reduced (summed) asynchronously; a callback queued on the autograd engine waits for all
    reductions at the end of the backward pass. Every rank runs the same graph, so the hooks and
    therefore the collectives run in the same order on every rank.
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.world = get_world_size()
        self._pending: list[Any] = []
        self._queued = False
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)  # type: ignore[attr-defined]
            self._queued = True
        param.grad.div_(self.world)
        self._pending.append(dist.all_reduce(param.grad, async_op=True))

    def _finish(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending.clear()
        self._queued = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _check_meta_arch(meta_arch: nn.Module) -> None:
    for name in ("student", "teacher"):
        if not isinstance(getattr(meta_arch, name, None), nn.ModuleDict):
            raise ParallelError(
                f"parallelize expects an SSLMetaArch with '{name}' as an nn.ModuleDict "
                f"(backbone, dino_head[, ibot_head]); got {type(meta_arch).__name__}"
            )


def parallelize(
    meta_arch: nn.Module, cfg: DictConfig, device: torch.device | str, force_shard: bool = False
) -> nn.Module:
    """Move ``meta_arch`` to ``device`` and make it data parallel over the default process group.

    Returns the same object (modified in place). Call it before building the optimizer. The speed
    options of ``cfg`` (activation checkpointing, regional compile: :mod:`semlab.train.speed`) are
    applied first, so that FSDP2 wraps the wrapped blocks. Otherwise a no-op
    beyond the move when there is no process group or a single rank, unless ``force_shard`` (with
    a one-rank process group): then FSDP2 wraps the model anyway, so that the sharded path (bf16
    parameters, DTensor clipping and EMA) can be exercised on a single GPU.
    """
    _check_meta_arch(meta_arch)
    device = torch.device(device)
    meta_arch.to(device)
    apply_speed_options(meta_arch, cfg)  # checkpointing and compile wrap the blocks before FSDP2 does
    world = get_world_size()
    if force_shard and not (dist.is_available() and dist.is_initialized()):
        raise ParallelError(
            "force_shard needs a process group: call torch.distributed.init_process_group first"
        )
    if world == 1 and not force_shard:
        return meta_arch
    strategy = resolve_strategy(cfg)
    towers = [meta_arch.student, meta_arch.teacher]
    broadcast_from_rank0([meta_arch])
    if strategy == "NO_SHARD":
        meta_arch._grad_all_reduce = GradientAllReduce(meta_arch.student.parameters())  # type: ignore[assignment]
        logger.info("parallelize: DDP-style gradient all-reduce over %d ranks", world)
        return meta_arch

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    mp_policy = mixed_precision_policy(cfg, device)
    reshard = strategy == "FULL_SHARD"
    _shard_tower(towers[0], mesh, reshard, mp_policy, is_teacher=False)
    _shard_tower(towers[1], mesh, True, mp_policy, is_teacher=True)
    logger.info(
        "parallelize: FSDP2 %s over %d ranks on %s (param dtype %s)",
        strategy,
        world,
        device.type,
        mp_policy.param_dtype or "fp32",
    )
    return meta_arch


def is_sharded(module: nn.Module) -> bool:
    """True if any parameter of ``module`` is a DTensor (FSDP2-managed)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())
