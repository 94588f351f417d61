"""Checkpoint layouts: the reference key layouts load strictly, conversions round-trip, errors are clear."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_vit
from torch import nn
from torch.testing import assert_close

from semlab.models import (
    CheckpointError,
    DINOHead,
    DinoVisionTransformer,
    convert_block_layout,
    load_weights,
    read_checkpoint,
    save_weights,
    vit_giant2,
    vit_large,
    vit_large_sem,
    vit_small,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run ~100x faster on one intra-op thread when other processes share the 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# The semlab model that each reference layout describes.
LAYOUTS: dict[str, Callable[[], nn.Module]] = {
    "dinov2_vits14_reg4_pretrain": lambda: vit_small(num_register_tokens=4, init_values=1e-5),
    "dinov2_vitl14_reg4_pretrain": lambda: vit_large(num_register_tokens=4, init_values=1e-5),
    "dinov2_vitg14_reg4_pretrain": lambda: vit_giant2(num_register_tokens=4, init_values=1e-5),
    "vitl14_sem_L512_backbone": lambda: vit_large_sem(
        num_register_tokens=4, init_values=1e-5, block_chunks=4
    ),
    "dino_head_65536": lambda: DINOHead(1024, 65536),
}


def read_layout(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (DATA / f"{name}.keys.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return shapes


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def tiny(**kwargs) -> DinoVisionTransformer:
    return build_tiny_vit(**kwargs)


def tiny_sem(**kwargs) -> DinoVisionTransformer:
    return build_tiny_vit(**{"L": 4, "V": 8, **kwargs})


def test_every_reference_layout_has_a_model() -> None:
    assert {p.name.removesuffix(".keys.tsv") for p in DATA.glob("*.keys.tsv")} == set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reference_layout_loads_strictly_on_meta(name: str) -> None:
    shapes = read_layout(name)
    with torch.device("meta"):
        model = LAYOUTS[name]()
    result = load_weights(model, meta_state_dict(shapes))
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: s for k, s in shapes.items() if not k.startswith("sem_cls_norm.")}
    assert model_shapes == expected
    assert sorted(result.loaded) == sorted(expected)
    assert result.dropped == sorted(set(shapes) - set(expected))
    assert not result.missing and not result.unexpected and not result.mismatched


def test_sem_teacher_checkpoint_layout_on_meta() -> None:
    """``{"teacher": {"backbone.*", "dino_head.*"}}`` as the reference writes its eval checkpoints."""
    backbone = {
        f"backbone.{k}": v for k, v in meta_state_dict(read_layout("vitl14_sem_L512_backbone")).items()
    }
    head = {f"dino_head.{k}": v for k, v in meta_state_dict(read_layout("dino_head_65536")).items()}
    ckpt = {"teacher": {**backbone, **head}}
    with torch.device("meta"):
        model = vit_large_sem(num_register_tokens=4, init_values=1e-5)  # unchunked target
        dino_head = DINOHead(1024, 65536)
    assert len(load_weights(model, ckpt).loaded) == len(model.state_dict())
    assert len(load_weights(dino_head, ckpt).loaded) == 8
    flat = {f"teacher.{k}": v for k, v in {**backbone, **head}.items()}
    flat.update({f"student.{k}": v for k, v in backbone.items()})
    assert len(load_weights(model, {"model": flat}, which="student").loaded) == len(model.state_dict())


def test_released_backbone_into_sem_model_needs_allow_missing_sem(caplog: pytest.LogCaptureFixture) -> None:
    sd = meta_state_dict(read_layout("dinov2_vitl14_reg4_pretrain"))
    with torch.device("meta"):
        model = vit_large_sem(num_register_tokens=4, init_values=1e-5, block_chunks=4)
    with pytest.raises(CheckpointError, match="allow_missing_sem") as err:
        load_weights(model, sd)
    assert "sem_embed.weight" in str(err.value)
    with caplog.at_level(logging.INFO, logger="semlab.models.weight_layouts"):
        result = load_weights(model, sd, allow_missing_sem=True)
    assert sorted(result.missing) == sorted(
        ["sem_embed.weight", "sem_norm.weight", "sem_norm.bias", "sem_out.weight"]
    )
    assert "stay at their initialisation" in caplog.text and "sem_out.weight" in caplog.text


def test_allow_missing_sem_keeps_everything_else_strict() -> None:
    sd = meta_state_dict(read_layout("dinov2_vitl14_reg4_pretrain"))
    del sd["blocks.3.norm1.weight"]
    with torch.device("meta"):
        model = vit_large_sem(num_register_tokens=4, init_values=1e-5)
    with pytest.raises(CheckpointError, match=r"1 missing keys: blocks\.3\.norm1\.weight"):
        load_weights(model, sd, allow_missing_sem=True)


def test_round_trip_through_chunked_reference_layout() -> None:
    src = tiny_sem()
    ours = src.state_dict()
    reference = convert_block_layout(ours, block_chunks=2)
    assert "blocks.1.3.attn.qkv.weight" in reference and "blocks.0.1.mlp.fc1.weight" in reference
    assert not any(k.startswith("blocks.3.") for k in reference)
    back = convert_block_layout(reference, block_chunks=0)
    assert back.keys() == ours.keys()
    dst = tiny_sem()
    load_weights(dst, reference)
    for key, value in dst.state_dict().items():
        assert torch.equal(value, ours[key]), key
    chunked = tiny_sem(block_chunks=2)
    load_weights(chunked, ours)
    assert chunked.state_dict().keys() == reference.keys()


def test_wrong_shape_names_key_and_both_shapes() -> None:
    sd = tiny().state_dict()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(10, 32)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(), sd)
    msg = str(err.value)
    assert "blocks.1.attn.qkv.weight" in msg and "[10, 32]" in msg and "[96, 32]" in msg
    assert isinstance(err.value, ValueError)


def test_missing_and_unexpected_keys_are_listed_and_truncated() -> None:
    sd = tiny().state_dict()
    del sd["norm.weight"]
    for i in range(25):
        sd[f"extra.{i}"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(), sd)
    msg = str(err.value)
    assert "1 missing keys: norm.weight" in msg
    assert "25 unexpected keys" in msg and "and 15 more" in msg


def test_non_strict_loads_what_fits(caplog: pytest.LogCaptureFixture) -> None:
    src = tiny()
    sd = src.state_dict()
    sd["norm.bias"] = torch.zeros(7)
    dst = tiny()
    with caplog.at_level(logging.WARNING, logger="semlab.models.weight_layouts"):
        result = load_weights(dst, sd, strict=False)
    assert result.mismatched == [("norm.bias", (7,), (32,))]
    assert torch.equal(dst.norm.weight, src.norm.weight)
    assert "shape differences" in caplog.text


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_files_round_trip(tmp_path: Path, suffix: str) -> None:
    src = tiny_sem()
    path = save_weights(src.state_dict(), tmp_path / f"weights{suffix}")
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    dst = tiny_sem()
    load_weights(dst, path)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert_close(dst(x), src(x), rtol=0, atol=0)


def test_prefixes_are_stripped() -> None:
    src = tiny()
    wrapped = {f"module._orig_mod.backbone.{k}": v for k, v in src.state_dict().items()}
    wrapped["module._orig_mod.dino_head.mlp.0.weight"] = torch.zeros(3, 3)
    dst = tiny()
    load_weights(dst, {"state_dict": wrapped})
    assert torch.equal(dst.pos_embed, src.pos_embed)
    dst2 = tiny()
    load_weights(dst2, {f"teacher.backbone.{k}": v for k, v in src.state_dict().items()}, prefix="backbone.")
    assert torch.equal(dst2.cls_token, src.cls_token)


def test_which_selects_and_explains() -> None:
    src = tiny()
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}}
    with pytest.raises(CheckpointError, match="no 'student.' weights"):
        load_weights(tiny(), ckpt, which="student")


def test_pos_embed_interpolated_on_load(caplog: pytest.LogCaptureFixture) -> None:
    big = tiny(img_size=70)  # 5x5 grid
    small = tiny(img_size=42, interpolate_antialias=True, interpolate_offset=0.0)  # 3x3 grid
    with caplog.at_level(logging.INFO, logger="semlab.models.weight_layouts"):
        result = load_weights(small, big.state_dict())
    assert result.interpolated == ["pos_embed"]
    assert "interpolated pos_embed from [1, 26, 32] to [1, 10, 32]" in caplog.text
    # the loaded embedding is what the big model (same interpolation settings) uses at 42 px
    x = torch.zeros(1, 10, 32)
    big_aa = tiny(img_size=70, interpolate_antialias=True, interpolate_offset=0.0)
    big_aa.load_state_dict(big.state_dict())
    assert_close(small.pos_embed.detach(), big_aa.interpolate_pos_encoding(x, 42, 42).detach())


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "obj": Path("x")}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_weights(tiny(), path)
    assert issubclass(CheckpointError, ValueError)


def test_bad_sources() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tiny(), "/nonexistent/ckpt.pth")
    with pytest.raises(CheckpointError, match="suffix"):
        save_weights({}, "/tmp/x.bin")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_weights(tiny(), {"cls_token": torch.zeros(1), "iteration": 3})
    real = tiny()
    with pytest.raises(CheckpointError, match="meta device"):
        load_weights(real, {k: torch.empty(v.shape, device="meta") for k, v in real.state_dict().items()})


def test_head_layout_from_parametrized_weight_norm() -> None:
    """Heads saved with ``torch.nn.utils.parametrizations.weight_norm`` load too."""
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(16, 32, bias=False))
    head = DINOHead(64, 32, hidden_dim=48, bottleneck_dim=16)
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer.")}
    sd.update({f"last_layer.{k}": v for k, v in layer.state_dict().items()})
    load_weights(head, sd)
    assert_close(head.last_layer.weight, layer.weight)
