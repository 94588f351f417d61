"""Unit tests for semlab.losses: centering, Sinkhorn-Knopp (also over a real 2-process gloo group),
DINO, iBOT and KoLeo."""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from semlab.losses import (
    DINOLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    masked_patch_weights,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
)


def cosine_logits(n: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Head-like logits: cosines in [-1, 1] (L2-normalised bottleneck x weight-normed last layer)."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    b = F.normalize(torch.randn(16, k, generator=g), dim=0)
    return (a @ b) * scale


def naive_sinkhorn(t: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The reference's linear-domain steps (one process), as an oracle."""
    q = torch.exp(t.double() / temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


# ----------------------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_each_sample_is_a_distribution_over_prototypes():
    t = cosine_logits(64, 256, seed=0)
    q = sinkhorn_knopp_teacher(t, teacher_temp=0.07)
    assert q.shape == t.shape and q.dtype == torch.float32
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sinkhorn_prototype_marginals_tend_to_b_over_k():
    """Invariant: each prototype's total over the B samples -> B/K; the error shrinks with every iteration."""
    t = cosine_logits(64, 256, seed=1)
    b, k = t.shape
    errors = []
    for n in (1, 2, 3, 5, 10, 50):
        q = sinkhorn_knopp_teacher(t, teacher_temp=0.07, n_iterations=n)
        errors.append(((q.sum(dim=0) - b / k).abs().max() / (b / k)).item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:-1])), errors
    assert errors[2] < 0.2  # 3 iterations, head-like logits: within 20% of uniform
    assert errors[-1] < 1e-4  # converged
    # The raw teacher softmax is far from uniform over prototypes: Sinkhorn did the balancing.
    p = F.softmax(t / 0.07, dim=-1)
    assert ((p.sum(dim=0) - b / k).abs().max() / (b / k)).item() > 10 * errors[2]


def test_sinkhorn_matches_reference_steps():
    t = cosine_logits(32, 100, seed=2, scale=3.0)
    for n in (1, 3, 7):
        q = sinkhorn_knopp_teacher(t, 0.05, n_iterations=n)
        torch.testing.assert_close(q.double(), naive_sinkhorn(t, 0.05, n), rtol=1e-5, atol=1e-9)


def test_sinkhorn_is_finite_where_float32_exp_overflows():
    t = cosine_logits(16, 32, seed=3, scale=20.0)  # t / 0.04 up to 500: exp overflows float32
    assert torch.isinf(torch.exp(t / 0.04)).any()
    q = sinkhorn_knopp_teacher(t, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16), rtol=0, atol=1e-5)
    torch.testing.assert_close(q.double(), naive_sinkhorn(t, 0.04), rtol=1e-4, atol=1e-9)


def test_sinkhorn_accepts_bf16_and_rejects_bad_input():
    t = cosine_logits(8, 16, seed=4)
    q = sinkhorn_knopp_teacher(t.bfloat16(), 0.07)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, sinkhorn_knopp_teacher(t.bfloat16().float(), 0.07))
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp_teacher(t, 0.07, n_iterations=0)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_knopp_teacher(t.unsqueeze(0), 0.07)
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp_teacher(t, 0.0)


def test_ibot_sinkhorn_uses_masked_count_and_leaves_it_unchanged():
    t = cosine_logits(12, 16, seed=5)
    n_masked = torch.tensor([12])
    q = iBOTPatchLoss(16).sinkhorn_knopp_teacher(t, 0.07, n_masked_patches_tensor=n_masked)
    assert n_masked.item() == 12
    torch.testing.assert_close(q, sinkhorn_knopp_teacher(t, 0.07))


# ----------------------------------------------------------------------------- softmax centering


def test_softmax_centering_rows_sum_to_one_and_subtract_center():
    t = torch.randn(6, 10) * 5
    c = torch.randn(1, 10)
    p = softmax_center_teacher(t, c, teacher_temp=0.04)
    torch.testing.assert_close(p.sum(dim=-1), torch.ones(6), rtol=0, atol=1e-6)
    torch.testing.assert_close(p, F.softmax((t - c) / 0.04, dim=-1))
    with pytest.raises(ValueError, match="K=10"):
        softmax_center_teacher(t, torch.zeros(1, 9), 0.04)


def test_ibot_softmax_centering_keeps_shape():
    loss = iBOTPatchLoss(10)
    loss.center.copy_(torch.randn(1, 1, 10))
    for shape in [(7, 10), (1, 7, 10)]:
        t = torch.randn(shape)
        p = loss.softmax_center_teacher(t, 0.07)
        assert p.shape == t.shape
        torch.testing.assert_close(p.sum(-1), torch.ones(shape[:-1]), rtol=0, atol=1e-6)
        torch.testing.assert_close(p, F.softmax((t - loss.center.view(10)) / 0.07, dim=-1))


def test_center_ema_update_is_lazy_and_applied_before_next_centering():
    loss = DINOLoss(4, center_momentum=0.9)
    c0 = torch.tensor([[0.1, -0.2, 0.3, 0.0]])
    loss.center.copy_(c0)
    t1 = torch.randn(5, 4)
    loss.update_center(t1)
    assert loss.has_pending_update and torch.equal(loss.center, c0)
    c1 = 0.9 * c0 + 0.1 * t1.mean(dim=0, keepdim=True)
    t2 = torch.randn(3, 4)
    p = loss.softmax_center_teacher(t2, 0.05)  # uses the center updated with t1
    torch.testing.assert_close(loss.center, c1)
    torch.testing.assert_close(p, F.softmax((t2 - c1) / 0.05, dim=-1))
    assert not loss.has_pending_update
    # Two updates without a centering in between: none is lost, they apply in order.
    loss.update_center(t1)
    loss.update_center(t2)
    loss.apply_center_update()
    c2 = 0.9 * c1 + 0.1 * t1.mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, 0.9 * c2 + 0.1 * t2.mean(0, keepdim=True))
    assert "center" in loss.state_dict()


def test_ibot_center_update_means_over_tokens():
    loss = iBOTPatchLoss(6, center_momentum=0.5)
    t = torch.randn(9, 6)
    loss.update_center(t)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.5 * t.mean(0).view(1, 1, 6))
    loss2 = iBOTPatchLoss(6, center_momentum=0.0)
    t3 = torch.randn(2, 5, 6)
    loss2.update_center(t3)
    loss2.apply_center_update()
    torch.testing.assert_close(loss2.center, t3.mean(1).mean(0).view(1, 1, 6))
    with pytest.raises(ValueError, match="update_center"):
        loss.update_center(torch.randn(4, 5))


# ----------------------------------------------------------------------------- DINO


def test_dino_loss_is_cross_entropy_over_all_chunk_pairs():
    loss = DINOLoss(8)
    assert loss.student_temp == 0.1
    s = [torch.randn(3, 8) for _ in range(3)]
    t = [F.softmax(torch.randn(3, 8), -1) for _ in range(2)]
    expected = 0.0
    for si in s:
        for ti in t:
            expected -= (ti * torch.log(F.softmax(si / 0.1, -1))).sum(-1).mean()
    torch.testing.assert_close(loss(s, t), expected)
    # Cross-entropy >= entropy of the target: the loss is bounded below by sum of target entropies.
    entropy = sum(-(ti * ti.log()).sum(-1).mean() for ti in t) * len(s)
    assert loss(s, t) >= entropy - 1e-5
    with pytest.raises(ValueError, match="same shape"):
        loss([torch.randn(2, 8)], [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="at least one"):
        loss([], t)


def test_dino_loss_gradient_flows_to_student_only():
    loss = DINOLoss(8)
    s = torch.randn(4, 8, requires_grad=True)
    t = F.softmax(torch.randn(4, 8), -1)
    loss([s], [t]).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- iBOT


def test_ibot_weights_are_one_over_masked_count_per_image():
    masks = torch.tensor(
        [[0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool
    )
    w = masked_patch_weights(masks)
    torch.testing.assert_close(w, torch.tensor([0.25] * 4 + [0.5] * 2 + [1.0]))
    image_of_row = masks.nonzero()[:, 0]
    per_image = torch.zeros(4).index_add_(0, image_of_row, w)
    torch.testing.assert_close(per_image, torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_ibot_forward_masked_equals_dense_form_and_formula():
    g = torch.Generator().manual_seed(7)
    n_img, n_tok, k = 4, 6, 10
    masks = torch.rand(n_img, n_tok, generator=g) < 0.4
    masks[1] = False
    masks[0, 0] = True
    s = torch.randn(n_img, n_tok, k, generator=g)
    t = F.softmax(torch.randn(n_img, n_tok, k, generator=g), -1)
    loss = iBOTPatchLoss(k)
    rows = masks.flatten().nonzero().squeeze(1)
    sm, tm = s.flatten(0, 1)[rows], t.flatten(0, 1)[rows]
    masked = loss.forward_masked(sm, tm, masks)
    torch.testing.assert_close(masked, loss(s, t, masks))
    ce = (tm * F.log_softmax(sm / 0.1, -1)).sum(-1)
    expected = torch.zeros(())
    for i in range(n_img):
        sel = rows // n_tok == i
        if sel.any():
            expected = expected - ce[sel].mean()
    torch.testing.assert_close(masked, expected / n_img)
    # Padded buffers (upperbound rows) with the true count and explicit weights give the same value.
    pad = 5
    sm_pad = torch.cat([sm, torch.randn(pad, k)])
    tm_pad = torch.cat([tm, F.softmax(torch.randn(pad, k), -1)])
    w = masked_patch_weights(masks)
    padded = loss.forward_masked(sm_pad, tm_pad, masks, n_masked_patches=sm.shape[0], masks_weight=w)
    torch.testing.assert_close(padded, masked)
    with pytest.raises(ValueError, match="n_masked_patches"):
        loss.forward_masked(sm_pad, tm_pad, masks)


# ----------------------------------------------------------------------------- KoLeo


def reference_koleo_terms(x: torch.Tensor) -> torch.Tensor:
    """Per-row ``-log(d_nn + eps)`` of the reference formulation, in float64 (oracle)."""
    x = F.normalize(x.double(), p=2, dim=-1, eps=1e-8)
    dots = x @ x.t()
    dots.fill_diagonal_(-1)
    idx = dots.argmax(dim=1)
    d = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[idx])
    return -torch.log(d + 1e-8)


def reference_koleo(x: torch.Tensor) -> torch.Tensor:
    return reference_koleo_terms(x).mean()


def test_koleo_matches_reference_on_ordinary_inputs():
    x = torch.randn(16, 32)
    torch.testing.assert_close(KoLeoLoss()(x).double(), reference_koleo(x), rtol=1e-5, atol=1e-6)
    # Scale invariance (rows are normalised) and more spread -> lower loss.
    torch.testing.assert_close(KoLeoLoss()(x * 7.0), KoLeoLoss()(x), rtol=1e-5, atol=1e-6)
    clustered = torch.randn(1, 32) + 0.01 * torch.randn(16, 32)
    assert KoLeoLoss()(clustered) > KoLeoLoss()(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_koleo_finite_on_duplicate_rows(dtype):
    base = torch.randn(6, 32)
    x = torch.cat([base, base[:3]]).to(dtype).requires_grad_(True)  # rows 6..8 duplicate rows 0..2
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    # The 6 duplicated rows sit at the floor distance; the 3 others match the reference.
    floor_term = -math.log(KoLeoLoss().min_distance + 1e-8)
    others = reference_koleo_terms(x.detach().float())[3:6]
    expected = (6 * floor_term + others.sum().item()) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_koleo_all_identical_rows_and_bad_input():
    x = torch.ones(4, 8, dtype=torch.float16, requires_grad=True)
    loss = KoLeoLoss()(x)
    torch.testing.assert_close(loss, torch.tensor(-math.log(1e-6 + 1e-8)), rtol=1e-4, atol=0)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="at least 2 rows"):
        KoLeoLoss()(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        KoLeoLoss()(torch.randn(2, 3, 8))


# ----------------------------------------------------------------------------- 2-process gloo group


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str, data: dict) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        t = data["t"].chunk(world)[rank]
        q = sinkhorn_knopp_teacher(t, 0.07)
        sizes = data["patch_sizes"]
        start = sum(sizes[:rank])
        tp = data["t_patch"][start : start + sizes[rank]]
        n_masked = torch.tensor([sizes[rank]])
        qp = iBOTPatchLoss(tp.shape[1]).sinkhorn_knopp_teacher(tp, 0.07, n_masked_patches_tensor=n_masked)
        loss = DINOLoss(t.shape[1], center_momentum=0.9)
        loss.center.copy_(data["c0"])
        loss.update_center(t)  # async all-reduce in flight
        loss.apply_center_update()
        result = {"q": q, "qp": qp, "center": loss.center.clone(), "n_masked": n_masked}
        tmp = os.path.join(out_dir, f"rank{rank}.pt.tmp")
        torch.save(result, tmp)
        os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_and_center_all_reduce_over_two_gloo_processes(tmp_path: Path):
    world = 2
    data = {
        "t": cosine_logits(16, 24, seed=11, scale=4.0),
        "t_patch": cosine_logits(7, 24, seed=12, scale=4.0),
        "patch_sizes": [5, 2],  # uneven masked counts per rank
        "c0": torch.randn(1, 24),
    }
    ctx = mp.start_processes(
        _distributed_worker,
        args=(world, str(tmp_path / "rendezvous"), str(tmp_path), data),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("2-process gloo test timed out after 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    full_q = sinkhorn_knopp_teacher(data["t"], 0.07)
    torch.testing.assert_close(torch.cat([r["q"] for r in res]), full_q, rtol=1e-5, atol=1e-7)
    full_qp = sinkhorn_knopp_teacher(data["t_patch"], 0.07)
    torch.testing.assert_close(torch.cat([r["qp"] for r in res]), full_qp, rtol=1e-5, atol=1e-7)
    # Without the all-reduce, each half alone gives different targets: the test can tell.
    assert not torch.allclose(sinkhorn_knopp_teacher(data["t"][:8], 0.07), full_q[:8], rtol=1e-3, atol=1e-5)
    expected_center = 0.9 * data["c0"] + 0.1 * data["t"].mean(dim=0, keepdim=True)
    for r in res:
        torch.testing.assert_close(r["center"], expected_center, rtol=1e-5, atol=1e-7)
    assert [int(r["n_masked"]) for r in res] == data["patch_sizes"]  # the caller's count is not all-reduced
