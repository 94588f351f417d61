"""Soft cross-entropy over many prototypes, computed a few rows at a time.

For student logits ``s`` (R, K) (any float dtype), teacher targets ``t`` (R, K) and temperature ``T``,
per row ``r``::

    ce_r = sum_k t_rk * log_softmax(s_r / T)_k                                  (returned, float32)
    d ce_r / d s_rj = (t_rj - softmax(s_r / T)_j * sum_k t_rk) / T              (used in backward)

The plain computation keeps float32 (R, K) intermediates alive for the backward (the float copy of
``s``, ``log_softmax`` and ``t * log_softmax``); with K = 65,536 prototypes and the iBOT loss's
~5,000 masked patches per GPU at batch 64 each is ~1.2 GiB. Here the forward and the backward walk
over blocks of ``chunk_rows`` rows and keep only ``s`` and ``t`` (which the step holds anyway): the
softmax of a block is recomputed in the backward, so the extra memory is O(chunk_rows * K). The
value is the same as the plain computation's (float32 rounding aside); the gradient is returned in
``s``'s dtype, as the plain ``s.float()`` path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy_rows"]


class _ChunkedSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, temp: float, chunk_rows: int) -> Tensor:  # type: ignore[override]
        out = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk_rows):
            log_p = F.log_softmax(s[i : i + chunk_rows].float() / temp, dim=-1)
            out[i : i + chunk_rows] = (t[i : i + chunk_rows].float() * log_p).sum(dim=-1)
        ctx.save_for_backward(s, t)
        ctx.temp, ctx.chunk_rows = temp, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        s, t = ctx.saved_tensors
        temp, chunk_rows = ctx.temp, ctx.chunk_rows
        grad = torch.empty_like(s)
        for i in range(0, s.shape[0], chunk_rows):
            tc = t[i : i + chunk_rows].float()
            p = F.softmax(s[i : i + chunk_rows].float() / temp, dim=-1)
            g = (tc - p * tc.sum(dim=-1, keepdim=True)) * (grad_out[i : i + chunk_rows, None] / temp)
            grad[i : i + chunk_rows] = g.to(s.dtype)
        return grad, None, None, None


def soft_cross_entropy_rows(s: Tensor, t: Tensor, temp: float, chunk_rows: int = 0) -> Tensor:
    """``ce_r = sum_k t_rk log_softmax(s_r / temp)_k`` per row (float32, shape (R,)); see the module doc.

    ``chunk_rows`` <= 0 computes it in one go (autograd through ``log_softmax``); > 0 in blocks of that
    many rows with the hand-written backward. ``t`` is a target: it gets no gradient.
    """
    if s.shape != t.shape or s.dim() != 2:
        raise ValueError(f"soft_cross_entropy_rows: s {tuple(s.shape)} and t {tuple(t.shape)} must be (R, K)")
    if chunk_rows <= 0:
        return torch.sum(t * F.log_softmax(s.float() / temp, dim=-1), dim=-1)
    if t.requires_grad:
        raise ValueError("soft_cross_entropy_rows: the targets t must not require grad in the chunked form")
    return _ChunkedSoftCE.apply(s, t, float(temp), int(chunk_rows))
