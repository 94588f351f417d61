"""The chunked cross-entropy gives the plain one's value and gradients (losses alone and in the step)."""

from __future__ import annotations

import pytest
import torch
from equivalence import assert_dicts_close
from synthetic_batches import TINY_SSL, synthetic_batch

from semlab.config import load_config
from semlab.losses import DINOLoss, iBOTPatchLoss
from semlab.losses.chunked_ce import soft_cross_entropy_rows
from semlab.losses.ibot import masked_patch_weights
from semlab.train.meta_arch import SSLMetaArch


def targets(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, k, generator=g) / 0.05, dim=-1)


def value_and_grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s)
    (out * torch.linspace(0.5, 2.0, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_soft_cross_entropy_rows_chunked_equals_plain(dtype, chunk):
    s = (torch.randn(10, 96, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    t = targets(10, 96, 1)
    v0, g0 = value_and_grad(lambda x: soft_cross_entropy_rows(x, t, 0.1, 0), s)
    v1, g1 = value_and_grad(lambda x: soft_cross_entropy_rows(x, t, 0.1, chunk), s)
    assert g1.dtype == dtype
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(g1, g0, **tol)
    # the gradient is right, not merely equal to the plain one: (t - p sum t) / T times the row weight
    p = torch.softmax(s.float() / 0.1, dim=-1)
    w = torch.linspace(0.5, 2.0, 10)[:, None]
    torch.testing.assert_close(g1.float(), ((t - p * t.sum(-1, keepdim=True)) / 0.1 * w).to(dtype).float())


def test_chunked_targets_must_not_need_grad():
    with pytest.raises(ValueError, match="must not require grad"):
        soft_cross_entropy_rows(torch.randn(2, 3), torch.rand(2, 3, requires_grad=True), 0.1, 1)


def test_dino_loss_chunked_equals_plain_local_and_global():
    k, b = 64, 5
    t = [targets(b, k, 2), targets(b, k, 3)]
    s_loc = torch.randn(4 * b, k, generator=torch.Generator().manual_seed(4))
    plain, chunked = DINOLoss(k), DINOLoss(k, chunk_rows=3)
    for student, teacher in (
        (lambda x: list(x.chunk(4)), t),  # every local crop vs both teacher crops
        (lambda x: [x[: 2 * b]], [torch.cat(t[::-1])]),  # global crops vs swapped teacher
    ):
        v0, g0 = value_and_grad(lambda x, st=student, te=teacher: plain(st(x), te), s_loc)
        v1, g1 = value_and_grad(lambda x, st=student, te=teacher: chunked(st(x), te), s_loc)
        torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_ibot_loss_chunked_equals_plain():
    k = 48
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3] = masks[2, 4:9] = True
    m = int(masks.sum())
    t = targets(m, k, 5)
    s = torch.randn(m, k, generator=torch.Generator().manual_seed(6))
    w = masked_patch_weights(masks)
    v0, g0 = value_and_grad(lambda x: iBOTPatchLoss(k).forward_masked(x, t, masks, m, w), s)
    v1, g1 = value_and_grad(lambda x: iBOTPatchLoss(k, chunk_rows=2).forward_masked(x, t, masks, m, w), s)
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)


def test_training_step_with_chunked_losses_equals_plain():
    def run(chunk: int):
        cfg = load_config("train/demo_tiny", [*TINY_SSL, f"train.loss_chunk_rows={chunk}"])
        torch.manual_seed(0)
        model = SSLMetaArch(cfg)
        losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.07)
        return losses, {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}

    (l0, g0), (l1, g1) = run(0), run(3)
    assert_dicts_close(l1, l0, rel=1e-6)
    assert_dicts_close(g1, g0, rel=1e-5)
