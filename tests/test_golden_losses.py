"""semlab's losses against the reference DINOv2+SEM outputs in ``tests/data/golden_tiny.pt``.

What the golden file holds (``loss_inputs`` -> outputs), and what reproduces it:
- ``dino_centered_teacher_temp_0_05``: ``softmax((t_glob - center_before) / 0.05)``.
- ``dino_center_after_update``: ``0.9 * center_before + 0.1 * mean_rows(t_glob)``.
- ``koleo_loss``: KoLeo on ``koleo_feats``.
  These three are finite and are matched directly (float32, 1e-5 relative).
- ``dino_sinkhorn_teacher_temp_0_07``, ``ibot_sinkhorn_teacher_temp_0_07`` and the three losses built on
  them (``dino_loss_local``, ``dino_loss_global``, ``ibot_loss_masked``) are all NaN in the golden file:
  the reference evaluates ``exp(t / 0.07)`` in float32, and ``max(t) / 0.07 ~ 152 > log(float32 max) ~ 88.7``
  overflows to inf, then inf / inf = NaN. The tests prove that cause (a float32 transcription of the
  reference steps gives the same all-NaN tensors) and check semlab, which computes Sinkhorn-Knopp in
  the log domain, against the same reference steps evaluated in float64, where nothing overflows.
  Pairings (from the reference training step): local = every local crop chunk (3) vs both Sinkhorn
  teacher chunks (2); global = ``[s_glob]`` vs ``[swap(T)]`` (teacher crop chunks exchanged), i.e.
  ``(CE(s_1, T_2) + CE(s_2, T_1)) / 2``; iBOT: the 6 masked patches of ``masks`` in row-major order,
  weight 1 / (masked count of their image), summed and divided by the 3 images.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semlab.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss

GOLDEN = Path(__file__).parent / "data" / "golden_tiny.pt"
SINKHORN_ENTRIES = (
    "dino_sinkhorn_teacher_temp_0_07",
    "ibot_sinkhorn_teacher_temp_0_07",
    "dino_loss_local",
    "dino_loss_global",
    "ibot_loss_masked",
)


@pytest.fixture(scope="module")
def golden() -> dict:
    # A plain dict of tensors, strings and numbers: loads with weights_only=True.
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)


def reference_sinkhorn(t: torch.Tensor, temp: float, n_samples: int, n_iterations: int = 3) -> torch.Tensor:
    """The reference's linear-domain steps, in the dtype of ``t`` (test oracle)."""
    q = torch.exp(t / temp).t()
    k = q.shape[0]
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).t()


def reference_ce(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum_k t log_softmax(s / 0.1)`` (test oracle)."""
    return (t * F.log_softmax(s / 0.1, dim=-1)).sum(dim=-1)


def reference_losses(li: dict, masks: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All Sinkhorn-based golden entries from the reference formulas, computed in ``dtype``."""
    t_glob, t_patch = li["t_glob"].to(dtype), li["t_patch"].to(dtype)
    s_glob, s_loc, s_patch = li["s_glob"].to(dtype), li["s_loc"].to(dtype), li["s_patch"].to(dtype)
    tq = reference_sinkhorn(t_glob, 0.07, t_glob.shape[0])
    pq = reference_sinkhorn(t_patch, 0.07, int(masks.sum()))
    t1, t2 = tq.chunk(2)
    s1, s2 = s_glob.chunk(2)
    local = -sum(reference_ce(s, t).mean() for s in s_loc.chunk(3) for t in (t1, t2))
    glob = -(reference_ce(s1, t2).mean() + reference_ce(s2, t1).mean()) / 2
    counts = masks.sum(dim=1).to(dtype)
    w = torch.cat([torch.full((int(c),), 1.0 / float(c), dtype=dtype) for c in counts if c > 0])
    ibot = -(reference_ce(s_patch, pq) * w).sum() / masks.shape[0]
    return {
        "dino_sinkhorn_teacher_temp_0_07": tq,
        "ibot_sinkhorn_teacher_temp_0_07": pq,
        "dino_loss_local": local,
        "dino_loss_global": glob,
        "ibot_loss_masked": ibot,
    }


def semlab_losses(li: dict, masks: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The same entries from semlab's API, as the training step calls it."""
    dino, ibot = DINOLoss(32), iBOTPatchLoss(32)
    tq = dino.sinkhorn_knopp_teacher(li["t_glob"] * scale, teacher_temp=0.07)
    n_masked = torch.tensor([int(masks.sum())])
    pq = ibot.sinkhorn_knopp_teacher(li["t_patch"] * scale, 0.07, n_masked_patches_tensor=n_masked)
    t1, t2 = tq.chunk(2)
    return {
        "dino_sinkhorn_teacher_temp_0_07": tq,
        "ibot_sinkhorn_teacher_temp_0_07": pq,
        "dino_loss_local": dino(list(li["s_loc"].chunk(3)), [t1, t2]),
        "dino_loss_global": dino([li["s_glob"]], [torch.cat([t2, t1])]),
        "ibot_loss_masked": ibot.forward_masked(li["s_patch"], pq, masks),
    }


def test_golden_softmax_centering(golden):
    li = golden["loss_inputs"]
    loss = DINOLoss(32)
    loss.center.copy_(li["center_before"])
    out = loss.softmax_center_teacher(li["t_glob"], teacher_temp=0.05)
    torch.testing.assert_close(out, golden["dino_centered_teacher_temp_0_05"], rtol=1e-5, atol=1e-7)


def test_golden_center_after_update(golden):
    li = golden["loss_inputs"]
    loss = DINOLoss(32, center_momentum=0.9)
    loss.center.copy_(li["center_before"])
    loss.update_center(li["t_glob"])
    torch.testing.assert_close(loss.center, li["center_before"], rtol=0, atol=0)  # applied lazily
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, golden["dino_center_after_update"], rtol=1e-5, atol=1e-7)


def test_golden_koleo(golden):
    out = KoLeoLoss()(golden["loss_inputs"]["koleo_feats"])
    torch.testing.assert_close(out, golden["koleo_loss"], rtol=1e-5, atol=0)


def test_golden_sinkhorn_entries_are_float32_overflow_of_the_reference(golden):
    li = golden["loss_inputs"]
    assert all(torch.isnan(golden[k]).all() for k in SINKHORN_ENTRIES)
    assert max(li["t_glob"].max(), li["t_patch"].max()) / 0.07 > math.log(torch.finfo(torch.float32).max)
    ref32 = reference_losses(li, golden["masks"], torch.float32)
    for key in SINKHORN_ENTRIES:  # the reference steps in float32 reproduce the golden NaNs exactly
        assert ref32[key].shape == golden[key].shape and torch.isnan(ref32[key]).all(), key


def test_golden_sinkhorn_entries_match_reference_math_in_float64(golden):
    li = golden["loss_inputs"]
    ours = semlab_losses(li, golden["masks"])
    ref64 = reference_losses(li, golden["masks"], torch.float64)
    for key in SINKHORN_ENTRIES:
        assert torch.isfinite(ours[key]).all(), key
        assert ours[key].dtype == torch.float32
        torch.testing.assert_close(ours[key].double(), ref64[key], rtol=1e-5, atol=1e-8, msg=key)
    # Sanity: the losses are not degenerate (would hide pairing mistakes).
    assert ours["dino_loss_local"] > 0 and ours["dino_loss_global"] > 0 and ours["ibot_loss_masked"] > 0


@pytest.mark.parametrize("scale", [0.5, 0.1])
def test_golden_inputs_scaled_match_reference_float32(golden, scale):
    """Where the reference's float32 arithmetic does not overflow, semlab equals it in float32."""
    li = dict(golden["loss_inputs"])
    ref32 = reference_losses(
        {**li, "t_glob": li["t_glob"] * scale, "t_patch": li["t_patch"] * scale},
        golden["masks"],
        torch.float32,
    )
    ours = semlab_losses(li, golden["masks"], scale=scale)
    for key in SINKHORN_ENTRIES:
        assert torch.isfinite(ref32[key]).all(), key
        torch.testing.assert_close(ours[key], ref32[key], rtol=1e-5, atol=1e-7, msg=key)


def test_global_pairing_is_distinguishable(golden):
    """The swapped pairing differs from the unswapped one, so the float64 check above pins it down."""
    li = golden["loss_inputs"]
    dino = DINOLoss(32)
    tq = dino.sinkhorn_knopp_teacher(li["t_glob"], teacher_temp=0.07)
    t1, t2 = tq.chunk(2)
    swapped = dino([li["s_glob"]], [torch.cat([t2, t1])])
    straight = dino([li["s_glob"]], [tq])
    assert not torch.isclose(swapped, straight, rtol=1e-3)
    s1, s2 = li["s_glob"].chunk(2)
    torch.testing.assert_close(swapped, (dino([s1], [t2]) + dino([s2], [t1])) / 2, rtol=1e-6, atol=1e-6)
