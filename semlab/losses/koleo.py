"""KoLeo regulariser: the Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al. 2019).

For a batch of n vectors, L2-normalise the rows ``x_i``, find each row's nearest other row by the
largest inner product ``nn(i) = argmax_{j != i} <x_i, x_j>`` (on the sphere, the nearest in L2),
and take::

    KoLeo(x) = - (1/n) sum_i log( max(||x_i - x_nn(i)||_2, d_min) + eps )

Minimising it spreads the batch uniformly over the sphere (DINOv2 applies it, weight 0.1, to the
student CLS output of each global crop).

Numerics, where semlab departs from the reference on purpose (identical on ordinary inputs):
- always computed in float32 with autocast off: the reference keeps the input dtype, so in fp16
  its ``eps = 1e-8`` rounds to 0 and two identical rows give ``log(0) = -inf`` (loss +inf);
- the distance is floored at ``d_min = 1e-6`` (default): identical or numerically identical rows
  (closer than float32 normalisation noise) give a finite loss ``-log(d_min + eps) ~ 13.8`` per row
  and a zero gradient for that pair (the direction that would separate them is undefined);
  nearer rows than 1e-6 are far below anything a representation distinguishes;
- the diagonal is excluded with -inf rather than the reference's -1, so a row is never its own
  neighbour (the reference could pick itself when every other row is antipodal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """``forward(student_output (n, D), eps=1e-8)`` -> scalar float32 KoLeo loss (n >= 2)."""

    def __init__(self, min_distance: float = 1e-6) -> None:
        super().__init__()
        if not min_distance > 0:
            raise ValueError(f"KoLeoLoss: min_distance must be > 0, got {min_distance}")
        self.min_distance = float(min_distance)

    @staticmethod
    def nearest_neighbours(x: Tensor) -> Tensor:
        """Index of each row's nearest other row by inner product (rows assumed L2-normalised)."""
        dots = x @ x.t()
        dots.fill_diagonal_(float("-inf"))
        return dots.argmax(dim=1)

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        if student_output.dim() != 2:
            raise ValueError(f"KoLeoLoss: expected (n, D) features, got shape {tuple(student_output.shape)}")
        if student_output.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss: needs at least 2 rows to find nearest neighbours, "
                f"got {student_output.shape[0]}; "
                "use train.batch_size_per_gpu >= 2 or set dino.koleo_loss_weight=0"
            )
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            with torch.no_grad():
                idx = self.nearest_neighbours(x.detach())
            sq = (x - x[idx]).pow(2).sum(dim=-1)
            dist = sq.clamp(min=self.min_distance**2).sqrt()  # clamp before sqrt: finite gradient at 0
            return -torch.log(dist + eps).mean()
