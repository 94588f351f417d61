"""DINO self-distillation loss on the CLS (SEM) output (Caron et al. 2021; Oquab et al. 2023, DINOv2).

For student logits ``s`` and teacher targets ``t`` (already centered: softmax or Sinkhorn-Knopp,
see ``centering.py``), with student temperature ``T_s = 0.1``::

    forward(S, T) = - sum_{s in S} sum_{t in T} mean_rows( sum_k t[:, k] * log_softmax(s / T_s)[:, k] )

``S`` and ``T`` are lists of chunks (one chunk per crop, rows = images); every student chunk meets
every teacher chunk, so each must have the same shape.

How the reference training step calls it (and the golden file reproduces):
- local crops: ``forward(s_loc.chunk(n_local), t.chunk(2))`` -- every local crop vs both global
  teacher crops;
- global crops: ``forward([s_glob], [swap(t)])`` where ``swap`` exchanges the two crop chunks of the
  teacher batch (``cat(t2, t1)``), so student crop 1 is matched to teacher crop 2 and vice versa; this
  equals ``(CE(s1, t2) + CE(s2, t1)) / 2``, and the training step multiplies it by 2 (``loss_scales``).

With ``chunk_rows`` > 0 the cross-entropy is computed in row blocks (:mod:`semlab.losses.chunked_ce`),
and the teacher chunks are summed first: ``sum_t mean_rows(t . log p) = mean_rows((sum_t t) . log p)``
(linearity in ``t``), so each student chunk's softmax is computed once, not once per teacher chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from semlab.losses.centering import TeacherCentering, sinkhorn_knopp_teacher, softmax_center_teacher
from semlab.losses.chunked_ce import soft_cross_entropy_rows

__all__ = ["DINOLoss"]


class DINOLoss(TeacherCentering):
    """DINO cross-entropy with a (1, out_dim) EMA ``center`` buffer for softmax centering."""

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, chunk_rows: int = 0
    ) -> None:
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim (number of prototypes) must be >= 1, got {out_dim}")
        if not student_temp > 0:
            raise ValueError(f"DINOLoss: student_temp must be > 0, got {student_temp}")
        super().__init__((1, out_dim), center_momentum)
        self.out_dim = out_dim
        self.student_temp = float(student_temp)
        self.chunk_rows = int(chunk_rows)  # > 0: chunked cross-entropy (same value, less memory)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """Apply the pending center update, then ``softmax((t - center) / teacher_temp)``."""
        self.apply_center_update()
        return softmax_center_teacher(teacher_output, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp targets over the global batch (B = rows x world size)."""
        return sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """Start the (async) all-reduce of ``sum_rows(teacher_output)``; applied by the next centering."""
        if teacher_output.dim() != 2 or teacher_output.shape[-1] != self.out_dim:
            raise ValueError(
                f"DINOLoss.update_center: expected raw teacher logits (B, {self.out_dim}), "
                f"got shape {tuple(teacher_output.shape)}"
            )
        self._start_update(teacher_output.float().sum(dim=0, keepdim=True), teacher_output.shape[0])

    def forward(
        self, student_output_list: Sequence[Tensor], teacher_out_softmaxed_centered_list: Sequence[Tensor]
    ) -> Tensor:
        if len(student_output_list) == 0 or len(teacher_out_softmaxed_centered_list) == 0:
            raise ValueError(
                "DINOLoss: student_output_list and teacher list must each hold at least one chunk"
            )
        for t in teacher_out_softmaxed_centered_list:
            for s in student_output_list:
                if s.shape != t.shape or s.dim() != 2:
                    raise ValueError(
                        f"DINOLoss: student chunk {tuple(s.shape)} and teacher chunk {tuple(t.shape)} must "
                        "both be (images, K) with the same shape; chunk the crop batches per crop"
                    )
        total = torch.zeros((), device=student_output_list[0].device)
        if self.chunk_rows > 0:
            t_sum = torch.stack(list(teacher_out_softmaxed_centered_list)).sum(dim=0)
            for s in student_output_list:
                total = total - soft_cross_entropy_rows(s, t_sum, self.student_temp, self.chunk_rows).mean()
            return total
        for s in student_output_list:
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total = total - torch.sum(t * log_p, dim=-1).mean()
        return total
