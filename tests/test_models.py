"""Unit tests of the ViT, SEM and DINO head beyond the golden comparison."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_vit
from omegaconf import OmegaConf
from torch import nn
from torch.testing import assert_close

from semlab.models import (
    DINOHead,
    DinoVisionTransformer,
    SimplicialEmbedding,
    build_backbone,
    build_model_from_cfg,
    convert_block_layout,
    load_weights,
    vit_giant2,
    vit_large_sem,
    vit_tiny,
)
from semlab.models.layers import Attention, Block, DropPath, drop_add_residual_stochastic_depth

D, HEADS, R = 32, 2, 2


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run ~100x faster on one intra-op thread when other processes share the 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make(**kwargs) -> DinoVisionTransformer:
    return build_tiny_vit(seed=0, **{"embed_dim": D, "depth": 3, "num_heads": HEADS, "num_register_tokens": R,
                                     **kwargs})


def make_sem(**kwargs) -> DinoVisionTransformer:
    return make(**{"L": 6, "V": 5, **kwargs})


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------- shapes
@torch.no_grad()
def test_list_input_gives_one_dict_per_crop_batch(images: torch.Tensor) -> None:
    model = make_sem()
    small = torch.randn(5, 3, 28, 28)
    outs = model.forward_features([images, small])
    assert isinstance(outs, list) and len(outs) == 2
    for out, (b, n) in zip(outs, [(3, 16), (5, 4)]):
        assert out["x_norm_clstoken"].shape == (b, D)
        assert out["x_norm_regtokens"].shape == (b, R, D)
        assert out["x_norm_patchtokens"].shape == (b, n, D)
        assert out["x_prenorm"].shape == (b, 1 + R + n, D)
    single = model.forward_features(small)
    assert_close(outs[1]["x_norm_clstoken"], single["x_norm_clstoken"])
    assert_close(outs[1]["x_prenorm"], single["x_prenorm"])


@torch.no_grad()
def test_forward_modes(images: torch.Tensor) -> None:
    model = make()
    features = model(images, is_training=True)
    assert set(features) == {
        "x_norm_clstoken",
        "x_norm_regtokens",
        "x_norm_patchtokens",
        "x_prenorm",
        "masks",
    }
    assert_close(model(images), features["x_norm_clstoken"])
    # without SEM the CLS output is the normed CLS token
    assert_close(features["x_norm_clstoken"], model.norm(features["x_prenorm"])[:, 0])


@torch.no_grad()
def test_get_intermediate_layers(images: torch.Tensor) -> None:
    model = make()
    last = model.get_intermediate_layers(images, n=1)
    assert len(last) == 1
    assert_close(last[0], model.forward_features(images)["x_norm_patchtokens"])
    maps = model.get_intermediate_layers(images, n=[0, 2], reshape=True, return_class_token=True)
    assert [tuple(p.shape) for p, _ in maps] == [(3, D, 4, 4)] * 2
    assert [tuple(c.shape) for _, c in maps] == [(3, D)] * 2
    raw = model.get_intermediate_layers(images, n=2, norm=False)
    assert_close(raw[-1], model.forward_features(images)["x_prenorm"][:, 1 + R :])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(images, n=[5])


def test_architectures_and_overrides() -> None:
    with torch.device("meta"):
        g = vit_giant2()
        tiny = build_backbone("vit_tiny", depth=2, embed_dim=48, num_heads=3)
    assert g.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    assert g.blocks[0].mlp.w3.weight.shape == (1536, 4096)
    assert (tiny.embed_dim, tiny.n_blocks, tiny.num_heads) == (48, 2, 3)
    assert tiny.pos_embed.shape == (1, 1 + 37 * 37, 48)  # img_size 518, patch 14 by default
    with pytest.raises(ValueError, match="unknown architecture"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="needs L > 0"):
        build_backbone("vit_large_sem", L=0)
    with pytest.raises(ValueError, match="ffn_layer"):
        make(ffn_layer="moe")


def test_bad_inputs_are_explained(images: torch.Tensor) -> None:
    model = make()
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model.forward_features(torch.zeros(1, 3, 50, 56))
    with pytest.raises(ValueError, match="masks of shape"):
        model.forward_features(images, masks=torch.zeros(3, 15, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="no SEM"):
        model.sem_raw(images)


def test_init_matches_reference() -> None:
    model = make(depth=2, embed_dim=64, num_heads=4)
    assert torch.count_nonzero(model.mask_token) == 0
    assert model.cls_token.abs().max() < 1e-4 and model.cls_token.abs().max() > 0
    assert model.register_tokens.abs().max() < 1e-4
    # trunc_normal(std=0.02) truncates at +-2 absolute (as torch and the reference do), i.e. ~N(0, 0.02)
    assert 0.015 < model.pos_embed.std() < 0.025
    qkv = model.blocks[0].attn.qkv
    assert torch.count_nonzero(qkv.bias) == 0 and 0.015 < qkv.weight.std() < 0.025
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    head = DINOHead(64, 10, hidden_dim=32, bottleneck_dim=8)
    assert torch.all(head.last_layer.weight_g == 1)
    assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10))



def test_sem_layers_keep_pytorch_default_init_as_the_reference() -> None:
    """The reference builds sem_embed/sem_out after the ViT's trunc-normal(0.02) init, so they keep
    nn.Linear's default kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std
    1/sqrt(3 fan_in), and sem_norm keeps ones/zeros. In the recipe these are the only layers not
    loaded from the released backbone, so their scale sets how fast SEM trains."""
    torch.manual_seed(0)
    model = vit_tiny(embed_dim=64, depth=1, num_heads=2, num_register_tokens=4, L=64, V=32)
    for name, fan_in, out in (("sem_embed", 5 * 64, 64 * 32), ("sem_out", 64 * 32, 64)):
        w = getattr(model, name).weight.detach()
        assert w.shape == (out, fan_in)
        bound = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= bound + 1e-7, name
        assert w.abs().max() > 0.99 * bound, f"{name}: not uniform over the full default range"
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.03, name
        assert abs(w.mean().item()) < 0.01 * bound, name
    assert torch.all(model.sem_norm.weight == 1) and torch.all(model.sem_norm.bias == 0)
    # the ViT's own linears still get trunc_normal(0.02)
    assert 0.018 < model.blocks[0].attn.qkv.weight.std() < 0.022


# ------------------------------------------------------------------------ masks
@torch.no_grad()
def test_masks_replace_patch_tokens_by_mask_token(images: torch.Tensor) -> None:
    model = make()
    nn.init.normal_(model.mask_token)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[2, 15] = True
    plain = model.prepare_tokens_with_masks(images)
    masked = model.prepare_tokens_with_masks(images, masks)
    patch_pos = model.pos_embed[:, 1:]
    for b, i in masks.nonzero().tolist():
        assert_close(masked[b, 1 + R + i], model.mask_token[0] + patch_pos[0, i])
    keep = torch.cat([torch.ones(3, 1 + R, dtype=torch.bool), ~masks], dim=1)
    assert_close(masked[keep], plain[keep])
    assert not torch.allclose(masked[~keep], plain[~keep])


# -------------------------------------------------------------------- drop path
@torch.no_grad()
def test_drop_path_is_identity_in_eval(images: torch.Tensor) -> None:
    for rate, uniform in [(0.05, False), (0.5, True)]:
        dropping = make(drop_path_rate=rate, drop_path_uniform=uniform)
        plain = make()
        plain.load_state_dict(dropping.state_dict())
        assert_close(dropping(images), plain(images))
        dropping.train()
        torch.manual_seed(3)
        assert not torch.allclose(dropping(images), plain(images))


def test_drop_path_rates_uniform_or_linear() -> None:
    linear = make(depth=5, drop_path_rate=0.4)
    assert [b.sample_drop_ratio for b in linear.iter_blocks()] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    uniform = make(depth=5, drop_path_rate=0.4, drop_path_uniform=True)
    assert [b.sample_drop_ratio for b in uniform.iter_blocks()] == pytest.approx([0.4] * 5)


def test_drop_path_statistics() -> None:
    x = torch.ones(4000, 3)
    out = DropPath(0.25).train()(x)
    kept = out[:, 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert torch.equal(DropPath(0.25).eval()(x), x)


def test_batch_subset_stochastic_depth() -> None:
    x = torch.zeros(8, 2, 3)
    out = drop_add_residual_stochastic_depth(x, lambda t: torch.ones_like(t), sample_drop_ratio=0.5)
    touched = out.flatten(1).abs().sum(1) > 0
    assert touched.sum() == 4  # int(8 * (1 - 0.5)) samples get the residual ...
    assert torch.all(out[touched] == 2.0)  # ... scaled by 8 / 4


# ------------------------------------------------------------------------- SEM
@torch.no_grad()
def test_dlc_codes_are_argmax_of_sem_raw(images: torch.Tensor) -> None:
    model = make_sem(L=7, V=9)
    raw = model.sem_raw(images)
    assert raw.shape == (3, 63)
    assert_close(raw.view(3, 7, 9).sum(-1), torch.ones(3, 7))
    codes = model.dlc(images)
    assert codes.dtype == torch.long and codes.shape == (3, 7)
    assert codes.min() >= 0 and codes.max() < 9
    assert torch.equal(codes, raw.view(3, 7, 9).argmax(-1))
    cold = model.sem_raw(images, temp=1e-5).view(3, 7, 9)
    assert_close(cold.max(-1).values, torch.ones(3, 7), atol=1e-3, rtol=0)
    assert torch.equal(cold.argmax(-1), codes)


@torch.no_grad()
def test_sem_cls_output_is_norm_of_sem_out(images: torch.Tensor) -> None:
    model = make_sem()
    out = model.forward_features(images)
    tokens = out["x_prenorm"][:, : 1 + R]
    expected = model.norm(model.sem_out(model.sem_raw(images)))
    assert_close(out["x_norm_clstoken"], expected)
    manual = F.layer_norm(
        model.sem_embed(tokens.flatten(1)), (30,), model.sem_norm.weight, model.sem_norm.bias, 1e-6
    )
    assert_close(model.sem_raw(images), manual.view(3, 6, 5).softmax(-1).flatten(1))
    assert_close(out["x_norm_patchtokens"], model.norm(out["x_prenorm"])[:, 1 + R :])
    assert_close(out["x_norm_regtokens"], model.norm(out["x_prenorm"])[:, 1 : 1 + R])
    names = {k.split(".")[0] for k in model.state_dict() if k.startswith("sem")}
    assert names == {"sem_embed", "sem_norm", "sem_out"}


def test_sem_temperature() -> None:
    model = make_sem()
    model.set_sem_temp(0.5)
    assert model.sem_temp == 0.5
    with pytest.raises(ValueError, match="> 0"):
        model.set_sem_temp(0.0)


@pytest.mark.parametrize("variant", ["shared", "pos_shared"])
@torch.no_grad()
def test_sem_variants(images: torch.Tensor, variant: str) -> None:
    model = make_sem(sem_variant=variant)
    raw = model.sem_raw(images)
    assert_close(raw.view(3, 6, 5).sum(-1), torch.ones(3, 6))
    assert model.sem_shared.weight.shape == (5, 5)
    assert ("sem_pos" in model.state_dict()) == (variant == "pos_shared")
    assert model(images).shape == (3, D)
    with pytest.raises(ValueError, match="sem_variant"):
        make_sem(sem_variant="other")


def test_standalone_simplicial_embedding_matches_backbone(images: torch.Tensor) -> None:
    model = make_sem()
    sem = SimplicialEmbedding((1 + R) * D, D, L=6, V=5)
    sem.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("sem_")})
    with torch.no_grad():
        tokens = model.forward_features(images)["x_prenorm"][:, : 1 + R]
        assert_close(model.norm(sem(tokens)), model.forward_features(images)["x_norm_clstoken"])


# ------------------------------------------------------------------- attention
def test_sdpa_attention_equals_manual_softmax_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(48, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 11, 48)
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 4, 12).permute(2, 0, 3, 1, 4)
    weights = ((q * 12**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    manual = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
    assert_close(attn(x), manual, rtol=1e-5, atol=1e-6)
    assert [tuple(t.shape) for t in attn([x, x[:, :5]])] == [(2, 11, 48), (2, 5, 48)]


def test_block_accepts_lists() -> None:
    block = Block(32, 2, init_values=1e-3, qkv_bias=True).eval()
    x, y = torch.randn(2, 7, 32), torch.randn(3, 4, 32)
    out = block([x, y])
    assert_close(out[0], block(x))
    assert_close(out[1], block(y))


# ---------------------------------------------------------------- block chunks
@torch.no_grad()
def test_chunked_and_unchunked_give_the_same_output(images: torch.Tensor) -> None:
    flat = make_sem(depth=4)
    chunked = make_sem(depth=4, block_chunks=2)
    assert {
        k.split(".")[1] + "." + k.split(".")[2] for k in chunked.state_dict() if k.startswith("blocks.")
    } == {"0.0", "0.1", "1.2", "1.3"}
    assert isinstance(chunked.blocks[1][0], nn.Identity)
    load_weights(chunked, flat.state_dict())
    assert_close(chunked(images), flat(images), rtol=0, atol=0)
    out_c, out_f = chunked.forward_features(images), flat.forward_features(images)
    assert_close(out_c["x_prenorm"], out_f["x_prenorm"], rtol=0, atol=0)
    assert_close(chunked.get_intermediate_layers(images, n=3), flat.get_intermediate_layers(images, n=3))
    assert convert_block_layout(chunked.state_dict(), 0).keys() == flat.state_dict().keys()


# ---------------------------------------------------------------- pos-embed
def test_pos_embed_interpolation_math() -> None:
    model = make(interpolate_antialias=True, interpolate_offset=0.0)
    x = torch.zeros(1, 1 + 9, D)
    got = model.interpolate_pos_encoding(x, 42, 42)
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    ref = (
        F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 9, D)
    )
    assert_close(got[:, 1:], ref)
    assert_close(got[:, :1], model.pos_embed[:, :1])
    assert model.interpolate_pos_encoding(torch.zeros(1, 17, D), 56, 56) is model.pos_embed

    offset = make(interpolate_offset=0.1)
    got = offset.interpolate_pos_encoding(torch.zeros(1, 1 + 15, D), 42, 70)  # non-square 3 x 5 grid
    grid = offset.pos_embed[:, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(3.1 / 4, 5.1 / 4), mode="bicubic", antialias=False)
    assert_close(got[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 15, D))
    assert not torch.allclose(ref, F.interpolate(grid, size=(3, 5), mode="bicubic"))


def test_pos_embed_is_computed_in_float32() -> None:
    model = make().to(torch.bfloat16)
    out = model.interpolate_pos_encoding(torch.zeros(1, 10, D, dtype=torch.bfloat16), 42, 42)
    assert out.dtype == torch.bfloat16
    ref = make().interpolate_pos_encoding(torch.zeros(1, 10, D), 42, 42)
    # float32 math from the bf16-rounded table: within bf16 rounding of the float32 result
    assert_close(out.float(), ref, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------ head
def test_dino_head_normalises_and_uses_weight_norm() -> None:
    head = DINOHead(16, 12, hidden_dim=24, bottleneck_dim=8)
    nn.init.uniform_(head.last_layer.weight_g, 0.5, 2.0)
    x = torch.randn(5, 16)
    h = F.normalize(head.mlp(x), dim=-1, eps=1e-12)
    w = (
        head.last_layer.weight_g
        * head.last_layer.weight_v
        / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    )
    assert_close(head(x), h @ w.t())
    assert [k for k in head.state_dict()] == [
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
    ]
    assert head(x.half().float()).shape == (5, 12)


# ------------------------------------------------------------------------- build
def _cfg(**student) -> object:
    base = dict(
        arch="vit_tiny",
        patch_size=14,
        img_size=56,
        embed_dim=32,
        depth=2,
        num_heads=2,
        drop_path_rate=0.2,
        layerscale=1e-5,
        drop_path_uniform=True,
        ffn_layer="mlp",
        block_chunks=0,
        qkv_bias=True,
        proj_bias=True,
        ffn_bias=True,
        num_register_tokens=2,
        interpolate_antialias=True,
        interpolate_offset=0.0,
        L=0,
        V=0,
        temp=1.0,
        sem_variant="full",
        sem_norm="layer",
        attention="sdpa",
        pack_crops=False,
    )
    cfg = OmegaConf.create({"student": {**base, **student}, "crops": {"global_crops_size": 56}})
    OmegaConf.set_struct(cfg, True)
    return cfg


def test_build_model_from_cfg() -> None:
    student, teacher, dim = build_model_from_cfg(_cfg())
    assert dim == 32 and not student.has_sem
    assert [b.sample_drop_ratio for b in student.iter_blocks()] == [0.2, 0.2]
    assert [b.sample_drop_ratio for b in teacher.iter_blocks()] == [0.0, 0.0]
    assert student.state_dict().keys() == teacher.state_dict().keys()
    s, t, _ = build_model_from_cfg(_cfg(L=4, V=8, temp=0.5, sem_variant="pos_shared"))
    assert (s.sem_L, s.sem_V, s.sem_temp, s.sem_variant) == (4, 8, 0.5, "pos_shared") and t.has_sem
    only, dim = build_model_from_cfg(_cfg(), only_teacher=True)
    assert isinstance(only, DinoVisionTransformer) and dim == 32
    with pytest.raises(ValueError, match="student.V"):
        build_model_from_cfg(_cfg(L=4, V=0))
    with pytest.raises(ValueError, match="student.L"):
        build_model_from_cfg(_cfg(arch="vit_tiny_sem"))


def test_recipe_config_builds_the_reference_sem_layout() -> None:
    from semlab.config import load_config

    cfg = load_config("train/vitl14_sem_L512")
    with torch.device("meta"):
        student, teacher, dim = build_model_from_cfg(cfg)
    assert dim == 1024 and teacher.sem_L == 512 and teacher.sem_V == 256
    # the resolved recipe has unchunked blocks (blocks.<i>); chunked checkpoints still load
    with torch.device("meta"):
        expected = vit_large_sem(num_register_tokens=4, init_values=1e-5, block_chunks=0)
    assert {k: v.shape for k, v in teacher.state_dict().items()} == {
        k: v.shape for k, v in expected.state_dict().items()
    }
    assert teacher.interpolate_antialias and teacher.interpolate_offset == 0.0
    assert math.isclose(next(student.iter_blocks()).sample_drop_ratio, cfg.student.drop_path_rate)
