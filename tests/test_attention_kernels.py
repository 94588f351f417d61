"""Attention kernels and packed crop batches compute the same function as the per-size SDPA path."""

from __future__ import annotations

import pytest
import torch

from semlab.models import attention as attn_mod
from semlab.models import layers
from semlab.models.attention import AttentionKernelError, check_kernel, document_block_mask
from semlab.models.vit import DinoVisionTransformer

TINY = dict(img_size=28, patch_size=14, embed_dim=24, depth=2, num_heads=2, num_register_tokens=2,
            init_values=0.1, interpolate_offset=0.0, interpolate_antialias=True)


def tiny_vit(drop_path_rate: float = 0.0, **kwargs) -> DinoVisionTransformer:
    torch.manual_seed(0)
    return DinoVisionTransformer(**TINY, drop_path_rate=drop_path_rate, drop_path_uniform=True, **kwargs)


def crops(b: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    g = torch.Generator().manual_seed(1)
    glob = torch.randn(2 * b, 3, 28, 28, generator=g)
    loc = torch.randn(4 * b, 3, 14, 14, generator=g)
    masks = torch.zeros(2 * b, 4, dtype=torch.bool)
    masks[0, 1] = masks[2, 3] = True
    return [glob, loc], [masks, None]


def outputs_and_grads(model, xs, masks):
    outs = model.forward_features(xs, masks=masks)
    loss = sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].pow(3).mean() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o["x_norm_patchtokens"].detach() for o in outs], grads


def test_unknown_kernel_and_missing_xformers_are_clear_errors(monkeypatch):
    with pytest.raises(AttentionKernelError, match="unknown student.attention"):
        check_kernel("flash")
    monkeypatch.setenv("XFORMERS_DISABLED", "1")
    attn_mod.xformers_ops.cache_clear()
    try:
        with pytest.raises(AttentionKernelError, match="xFormers is not importable"):
            tiny_vit(attention="xformers")
    finally:
        attn_mod.xformers_ops.cache_clear()


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.05], ids=["no-drop-path", "per-sample-drop-path-eval"])
def test_packed_sdpa_equals_per_size_sdpa_outputs_and_gradients(drop_path_rate):
    xs, masks = crops()
    ref_model, packed_model = tiny_vit(drop_path_rate), tiny_vit(drop_path_rate, pack_crops=True)
    if drop_path_rate:  # per-sample drop path draws differently when packed: compare without it
        ref_model.eval(), packed_model.eval()
    ref_out, ref_grads = outputs_and_grads(ref_model, xs, masks)
    out, grads = outputs_and_grads(packed_model, xs, masks)
    for a, b in zip(ref_out, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_batch_subset_drop_path_equals_per_size_with_the_same_subsets(monkeypatch):
    """Training with drop path 0.3 (the recipe's): the packed block gathers each crop batch's sample
    subset, packs the subsets and scatters back; with the same subsets it equals the per-size path."""

    def fixed_subset(b, ratio, device):  # deterministic: the last samples, reversed
        return torch.arange(b - 1, b - 1 - layers.subset_size(b, ratio), -1, device=device)

    monkeypatch.setattr(layers, "sample_subset", fixed_subset)
    xs, masks = crops(b=4)
    ref_model, packed_model = tiny_vit(0.3), tiny_vit(0.3, pack_crops=True)
    ref_model.train(), packed_model.train()
    ref_out, ref_grads = outputs_and_grads(ref_model, xs, masks)
    out, grads = outputs_and_grads(packed_model, xs, masks)
    for a, b in zip(ref_out, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the subsets really were used: with other subsets the outputs differ
    monkeypatch.setattr(
        layers, "sample_subset", lambda b, r, d: torch.arange(layers.subset_size(b, r), device=d)
    )
    other, _ = outputs_and_grads(tiny_vit(0.3, pack_crops=True).train(), xs, masks)
    assert not torch.allclose(other[0], out[0])


@pytest.mark.parametrize("pack", [False, True], ids=["per-size", "packed-document-mask"])
def test_flex_attention_forward_equals_sdpa(pack):
    """flex_attention has no CPU backward in torch 2.14: its gradients are checked on the GPU
    (benchmarks/gpu_check.sh); here the forward, per size and packed with the document mask."""
    xs, masks = crops()
    ref = tiny_vit().eval()
    flex = tiny_vit(attention="flex", pack_crops=pack).eval()
    with torch.no_grad():
        a = ref.forward_features(xs, masks=masks)
        b = flex.forward_features(xs, masks=masks)
    for oa, ob in zip(a, b):
        torch.testing.assert_close(ob["x_norm_patchtokens"], oa["x_norm_patchtokens"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ob["x_norm_clstoken"], oa["x_norm_clstoken"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[13] * 4 + [7] * 9, [261] * 2 + [54] * 8, [300, 5, 128, 128, 1]])
def test_document_block_mask_equals_the_dense_block_diagonal_mask(lengths):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    total = int(doc.numel())
    ours = document_block_mask(lengths, "cpu")
    dense = create_block_mask(lambda b, h, q, k: doc[q] == doc[k], None, None, total, total, device="cpu")
    assert torch.equal(ours.to_dense(), dense.to_dense())  # same set of visited blocks
    assert torch.equal(ours.full_kv_num_blocks, dense.full_kv_num_blocks)  # same full / partial split
    assert torch.equal(ours.kv_num_blocks, dense.kv_num_blocks)
    expect = doc[:, None] == doc[None, :]
    q, k = torch.meshgrid(torch.arange(total), torch.arange(total), indexing="ij")
    zero = torch.zeros((), dtype=torch.long)
    assert torch.equal(ours.mask_mod(zero, zero, q, k), expect)  # and the token-level mask
