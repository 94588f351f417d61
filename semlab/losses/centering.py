"""Teacher centering for the DINO and iBOT losses: softmax centering and Sinkhorn-Knopp.

Both turn raw teacher logits ``t`` (rows = samples, columns = K prototypes) into target
distributions over the prototypes (each row sums to 1):

- softmax centering (DINO, Caron et al. 2021): ``p = softmax((t - c) / T_t)`` with an EMA
  center ``c <- m * c + (1 - m) * mean_batch(t)``. The batch mean is all-reduced over the
  default process group; the reduction is started asynchronously right after the teacher
  forward (``all_reduce(async_op=True)``) and applied lazily before the next centering, so
  the center used at step n includes the batch of step n-1 (as the reference does).
- Sinkhorn-Knopp (SwAV, Caron et al. 2020; used by DINOv2): ``Q = exp(t / T_t).T`` (K x B,
  B = number of samples in the *global* batch), then alternately scale rows (prototypes) to
  sum 1/K and columns (samples) to sum 1/B, ``n_iterations`` times; return ``B * Q.T``. The
  row sums run over the global batch, so they are all-reduced when ``torch.distributed`` is
  initialised. The result's rows each sum to exactly 1 (the last step is the per-sample
  normalisation); each prototype's total over the global batch tends to B/K as the number of
  iterations grows (after 3 iterations it is close to, not exactly, B/K).

Numerics. The reference evaluates ``exp(t / T_t)`` in float32, which overflows to inf (and
the result to NaN) as soon as ``t / T_t > 88.7``, e.g. a logit of 6.2 at T_t = 0.07. Here the
same iterations run in the log domain: every sum of exponentials is a log-sum-exp, the
global (all-reduced) ones via an all-reduced max followed by an all-reduced sum. In exact
arithmetic this is the reference algorithm; in float32 it agrees with it to rounding (about
1e-6 relative) wherever the reference is finite and stays finite where it overflows. The
reference's first step (``Q /= sum(Q)``) is absorbed by the first row normalisation and is
therefore skipped; likewise B only states the target marginals and cancels from the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from semlab.utils.distributed import get_world_size, is_enabled

__all__ = [
    "PendingCenterUpdate",
    "TeacherCentering",
    "ema_center",
    "sinkhorn_knopp_teacher",
    "softmax_center_teacher",
    "start_center_update",
]


def _check_logits(teacher_output: Tensor, teacher_temp: float, name: str) -> None:
    if not isinstance(teacher_output, Tensor) or teacher_output.dim() < 1:
        raise ValueError(f"{name}: expected a tensor of teacher logits (..., K), got {teacher_output!r:.80}")
    if not teacher_temp > 0:
        raise ValueError(f"{name}: teacher_temp must be > 0, got {teacher_temp}; check teacher.teacher_temp")


@torch.no_grad()
def softmax_center_teacher(teacher_output: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``softmax((t - c) / T_t)`` over the last (prototype) dim, in float32.

    ``center`` broadcasts over all leading dims (any shape with K elements, e.g. (1, K) or (1, 1, K)).
    The result has the shape of ``teacher_output``; every distribution sums to 1.
    """
    _check_logits(teacher_output, teacher_temp, "softmax_center_teacher")
    k = teacher_output.shape[-1]
    if center.numel() != k:
        raise ValueError(
            f"softmax_center_teacher: center has {center.numel()} entries but the teacher output has "
            f"K={k} prototypes; build the loss with out_dim={k}"
        )
    c = center.reshape(k).to(device=teacher_output.device, dtype=torch.float32)
    return F.softmax((teacher_output.float() - c) / teacher_temp, dim=-1)


def _global_logsumexp_over_rows(x: Tensor) -> Tensor:
    """``log(sum_b exp(x[b, k]))`` per column k, over the rows of every rank; shape (1, K)."""
    if x.shape[0] > 0:
        m = x.amax(dim=0, keepdim=True)
    else:  # a rank without samples contributes nothing
        m = torch.full((1, x.shape[1]), -math.inf, dtype=x.dtype, device=x.device)
    if is_enabled():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf column: avoid inf - inf
    s = torch.exp(x - m).sum(dim=0, keepdim=True)
    if is_enabled():
        dist.all_reduce(s)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn_knopp_teacher(
    teacher_output: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: Tensor | int | None = None,
) -> Tensor:
    """Sinkhorn-Knopp targets for teacher logits (n_local, K); returns (n_local, K) float32.

    With ``Q = exp(t / T_t).T`` (K x B over the global batch) each iteration does
    ``Q /= rowsum(Q) (all-reduced); Q /= K; Q /= colsum(Q); Q /= B`` and the result is ``B * Q.T``,
    computed in the log domain (see the module docstring). Output invariants: every row (sample)
    sums to 1; every column (prototype) sums, over the global batch, to approximately B/K.

    ``n_samples`` is B, the global number of samples (a tensor already summed over ranks, or an int);
    None means ``n_local * world_size`` (equal batches per rank, the DINO case).
    """
    _check_logits(teacher_output, teacher_temp, "sinkhorn_knopp_teacher")
    if teacher_output.dim() != 2:
        raise ValueError(
            f"sinkhorn_knopp_teacher: expected 2-D logits (samples, K), "
            f"got shape {tuple(teacher_output.shape)}; "
            "flatten the leading dims first"
        )
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp_teacher: n_iterations must be >= 1, got {n_iterations}")
    x = teacher_output.float() / teacher_temp  # log Q.T, up to the (absorbed) global normalisation
    k = x.shape[1]
    if n_samples is None:
        n_samples = x.shape[0] * get_world_size()
    if isinstance(n_samples, Tensor):
        if n_samples.numel() != 1:
            raise ValueError(
                f"sinkhorn_knopp_teacher: n_samples must hold one number, got {n_samples.numel()}"
            )
        b = n_samples.to(device=x.device, dtype=torch.float32).reshape(1)
    elif n_samples > 0:
        b = torch.tensor([float(n_samples)], device=x.device)
    else:
        raise ValueError(f"sinkhorn_knopp_teacher: n_samples must be > 0, got {n_samples}")
    log_b = torch.log(b)
    log_k = math.log(k)
    for _ in range(n_iterations):
        x = x - _global_logsumexp_over_rows(x) - log_k  # each prototype: total 1/K over the global batch
        x = x - torch.logsumexp(x, dim=1, keepdim=True) - log_b  # each sample: total 1/B
    return torch.exp(x + log_b)


def ema_center(center: Tensor, batch_center: Tensor, momentum: float) -> Tensor:
    """``momentum * center + (1 - momentum) * batch_center`` (shapes broadcast to ``center``'s)."""
    return center * momentum + batch_center.reshape(center.shape).to(center) * (1.0 - momentum)


@dataclass
class PendingCenterUpdate:
    """A batch sum of teacher outputs whose all-reduce may still be in flight.

    ``batch_mean()`` waits for the reduction and returns ``sum / (count * world_size)``: the mean over
    the global batch when every rank contributes ``count`` rows.
    """

    batch_sum: Tensor
    count: int
    world_size: int
    handle: Any | None = None

    def batch_mean(self) -> Tensor:
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        return self.batch_sum / (self.count * self.world_size)


@torch.no_grad()
def start_center_update(batch_sum: Tensor, count: int) -> PendingCenterUpdate:
    """Start all-reducing ``batch_sum`` (float32 copy) without blocking; returns the pending update."""
    summed = batch_sum.detach().float().clone()
    handle = dist.all_reduce(summed, async_op=True) if is_enabled() else None
    return PendingCenterUpdate(summed, int(count), get_world_size(), handle)


class TeacherCentering(nn.Module):
    """Holds the EMA ``center`` buffer and the pending (asynchronously reduced) center update.

    Subclasses (DINOLoss, iBOTPatchLoss) decide which batch statistic feeds the center.
    """

    center: Tensor

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float) -> None:
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if math.prod(center_shape) < 1:
            raise ValueError(f"the number of prototypes must be >= 1, got center shape {center_shape}")
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(center_shape))
        self._pending: PendingCenterUpdate | None = None

    @property
    def has_pending_update(self) -> bool:
        return self._pending is not None

    def _start_update(self, batch_sum: Tensor, count: int) -> None:
        if self._pending is not None:  # never drop a reduction in flight
            self.apply_center_update()
        self._pending = start_center_update(batch_sum, count)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Wait for the pending reduction (if any) and apply ``c <- m c + (1 - m) batch_mean``."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self.center.copy_(ema_center(self.center, pending.batch_mean(), self.center_momentum))
