"""iBOT masked-patch loss (Zhou et al. 2022; as used by DINOv2).

The student sees global crops with some patches replaced by ``mask_token``; on those masked patches
it must predict the teacher's (centered) distribution of the same, unmasked patch. With student
temperature ``T_s`` and per-patch cross-entropy ``ce_p = sum_k t_p[k] log_softmax(s_p / T_s)[k]``::

    forward_masked = - (1 / n_images) * sum_i sum_{p masked in image i} ce_p / n_masked(i)

i.e. every image with at least one masked patch carries the same total weight, and images without
masked patches count in ``n_images`` but contribute 0. Rows of ``s``/``t`` are the masked patches in
the order of ``student_masks_flat.flatten().nonzero()`` (the collate's ``mask_indices_list``).

Centering as for DINO, on the masked teacher patch tokens (see ``centering.py``); the Sinkhorn-Knopp
variant counts B = total masked patches over all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from semlab.losses.centering import (
    TeacherCentering,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
)
from semlab.losses.chunked_ce import soft_cross_entropy_rows
from semlab.utils.distributed import is_enabled

__all__ = ["iBOTPatchLoss", "masked_patch_weights"]


def masked_patch_weights(student_masks_flat: Tensor) -> Tensor:
    """Per masked patch: ``1 / n_masked(image)``, in ``masks.nonzero()`` order; shape (n_masked_total,)."""
    masks = student_masks_flat.bool()
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(TeacherCentering):  # noqa: N801 (the reference's name)
    """iBOT patch cross-entropy with a (1, 1, patch_out_dim) EMA ``center`` buffer."""

    def __init__(
        self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, chunk_rows: int = 0
    ) -> None:
        if patch_out_dim < 1:
            raise ValueError(f"iBOTPatchLoss: patch_out_dim must be >= 1, got {patch_out_dim}")
        if not student_temp > 0:
            raise ValueError(f"iBOTPatchLoss: student_temp must be > 0, got {student_temp}")
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.patch_out_dim = patch_out_dim
        self.student_temp = float(student_temp)
        self.chunk_rows = int(chunk_rows)  # > 0: chunked cross-entropy (semlab.losses.chunked_ce)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """Apply the pending center update, then ``softmax((t - center) / T_t)``; same shape as input."""
        self.apply_center_update()
        return softmax_center_teacher(teacher_patch_tokens, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp over the masked patches of all ranks.

        ``teacher_output`` is (n_masked_local, K): only this rank's masked patches, no padding rows.
        ``n_masked_patches_tensor`` (one integer) is this rank's count; it is summed over ranks (on a
        copy: the caller's tensor is left unchanged) and used as B.
        """
        b = n_masked_patches_tensor.detach().to(device=teacher_output.device).reshape(-1).clone()
        if b.numel() != 1:
            raise ValueError(
                "iBOTPatchLoss.sinkhorn_knopp_teacher: n_masked_patches_tensor must hold one count, "
                f"got {b.numel()}"
            )
        if is_enabled():
            dist.all_reduce(b)
        return sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=n_iterations, n_samples=b)

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """Start the (asynchronous) center update from raw teacher patch logits.

        (n, M, K): the mean over the M tokens of each of n groups, averaged over groups and ranks;
        (M, K) is one group (the masked tokens of this rank).
        """
        x = teacher_patch_tokens
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != self.patch_out_dim:
            raise ValueError(
                f"iBOTPatchLoss.update_center: expected teacher patch logits (M, {self.patch_out_dim}) or "
                f"(n, M, {self.patch_out_dim}), got shape {tuple(teacher_patch_tokens.shape)}"
            )
        self._start_update(x.float().mean(dim=1).sum(dim=0, keepdim=True), x.shape[0])

    def _patch_ce(self, s: Tensor, t: Tensor) -> Tensor:
        if s.dim() == 2 and self.chunk_rows > 0:
            return soft_cross_entropy_rows(s, t, self.student_temp, self.chunk_rows)
        return torch.sum(t * F.log_softmax(s.float() / self.student_temp, dim=-1), dim=-1)

    def forward(
        self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor
    ) -> Tensor:
        """Dense form: tokens (n_images, N, K), masks (n_images, N); equals ``forward_masked``."""
        if student_patch_tokens.shape != teacher_patch_tokens.shape or student_patch_tokens.dim() != 3:
            raise ValueError(
                f"iBOTPatchLoss.forward: student {tuple(student_patch_tokens.shape)} and teacher "
                f"{tuple(teacher_patch_tokens.shape)} must both be (n_images, N, K)"
            )
        if tuple(student_masks_flat.shape) != tuple(student_patch_tokens.shape[:2]):
            raise ValueError(
                f"iBOTPatchLoss.forward: masks {tuple(student_masks_flat.shape)} must be (n_images, N) = "
                f"{tuple(student_patch_tokens.shape[:2])}"
            )
        masks = student_masks_flat.float()
        ce = self._patch_ce(student_patch_tokens, teacher_patch_tokens)
        per_image = (ce * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -per_image.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """``-sum_p w_p ce_p / n_images`` over the masked patches (see the module docstring).

        ``student/teacher_patch_tokens_masked``: (M', K) with M' >= M masked patches (rows past
        ``n_masked_patches`` are padding and are dropped). ``masks_weight``: (M,) per-patch weights, by
        default ``1 / n_masked(image)`` computed from ``student_masks_flat`` (n_images, N).
        """
        s, t = student_patch_tokens_masked, teacher_patch_tokens_masked
        if s.shape != t.shape or s.dim() != 2:
            raise ValueError(
                f"iBOTPatchLoss.forward_masked: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                "must both be (n_masked, K)"
            )
        if student_masks_flat.dim() != 2:
            raise ValueError(
                f"iBOTPatchLoss.forward_masked: student_masks_flat must be (n_images, N), "
                f"got shape {tuple(student_masks_flat.shape)}"
            )
        ce = self._patch_ce(s, t)
        if n_masked_patches is not None:
            ce = ce[:n_masked_patches]
        if masks_weight is None:
            masks_weight = masked_patch_weights(student_masks_flat)
        if masks_weight.shape != ce.shape:
            raise ValueError(
                f"iBOTPatchLoss.forward_masked: {ce.shape[0]} masked rows but {masks_weight.numel()} "
                "weights; "
                "pass n_masked_patches (the true count) when the token buffers are padded"
            )
        return -(ce * masks_weight.to(ce)).sum() / student_masks_flat.shape[0]
