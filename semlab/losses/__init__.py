"""semlab losses: DINO (CLS), iBOT (masked patches), KoLeo, and teacher centering.

See ``docs/architecture.md`` for the contract; each module's docstring states its math.
"""

from semlab.losses.centering import sinkhorn_knopp_teacher, softmax_center_teacher
from semlab.losses.dino import DINOLoss
from semlab.losses.ibot import iBOTPatchLoss, masked_patch_weights
from semlab.losses.koleo import KoLeoLoss

__all__ = [
    "DINOLoss",
    "KoLeoLoss",
    "iBOTPatchLoss",
    "masked_patch_weights",
    "sinkhorn_knopp_teacher",
    "softmax_center_teacher",
]
