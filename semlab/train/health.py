"""Is a model's state fit to be trusted as a checkpoint? Student and teacher weights finite and not exploded.

A finite loss does not prove a healthy model: one step at a huge learning rate can leave finite
weights in the thousands, and the next step goes NaN. The training loop checks the parameters
before it writes a full checkpoint, and resume skips a checkpoint that fails the same check, so
the "last good" checkpoint is good. ``train.param_abs_limit`` is the largest ``|weight|`` allowed
(1000 by default: far above what a trained ViT holds, far below a diverged one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

PARTS = ("student.", "teacher.")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def first_unhealthy(named: Iterable[tuple[str, torch.Tensor]], limit: float) -> str | None:
    """A sentence naming the first tensor that is non-finite or has ``|value| > limit`` (None: all good).

    Only the names under ``student.`` / ``teacher.`` and floating tensors are checked.
    """
    for name, tensor in named:
        if not name.startswith(PARTS) or not torch.is_floating_point(tensor):
            continue
        local = _local(tensor).detach()
        if local.numel() == 0:
            continue
        # one pass, no temporary: the inf-norm is max |w|, and NaN/inf propagate into it
        biggest = float(torch.linalg.vector_norm(local, ord=math.inf))
        if not math.isfinite(biggest):
            return f"{name} holds NaN/inf"
        if biggest > limit:
            return f"{name} reaches |w| = {biggest:.4g} > train.param_abs_limit = {limit:g}"
    return None


def model_problem(model: torch.nn.Module, limit: float) -> str | None:
    """:func:`first_unhealthy` of a live model's parameters. Collective when a process group is up
    (every rank checks its shards, then all agree), so that all ranks stop or go on together."""
    problem = first_unhealthy(model.named_parameters(), limit)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = next(iter(model.parameters())).device
        flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if problem is None and float(flag) > 0:
            problem = "the parameters of another rank are non-finite or exploded"
    return problem


class DivergedModelError(RuntimeError):
    """The parameters are non-finite or exploded; training stopped without writing a checkpoint."""

    def __init__(self, iteration: int, problem: str, checkpoint: object | None) -> None:
        self.iteration, self.problem, self.checkpoint = iteration, problem, checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"diverged parameters at iteration {iteration}: {problem}; training stopped without writing "
            f"a checkpoint; {where}. Lower optim.base_lr (or raise train.param_abs_limit if such "
            "weights are expected)."
        )


def state_problem(state: Mapping[str, torch.Tensor], limit: float) -> str | None:
    """:func:`first_unhealthy` of a checkpoint's ``model`` state dict."""
    return first_unhealthy(((k, v) for k, v in state.items() if isinstance(v, torch.Tensor)), limit)


def param_limit(cfg) -> float:  # noqa: ANN001 (a DictConfig)
    """``train.param_abs_limit`` (inf when the key is absent, e.g. an old saved config)."""
    value = cfg.train.get("param_abs_limit", None)
    return float(value) if value is not None else math.inf
