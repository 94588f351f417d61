"""semlab's backbone, SEM and DINO head reproduce the reference implementation's outputs.

``tests/data/golden_tiny.pt`` holds the weights, inputs and outputs of a tiny reference SEM ViT
(embed 64, depth 2, 4 registers, L=8, V=4) in eval mode; see ``tests/data/README.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from semlab.models import DINOHead, DinoVisionTransformer, build_backbone, load_weights

GOLDEN = Path(__file__).parent / "data" / "golden_tiny.pt"
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run ~100x faster on one intra-op thread when other processes share the 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def golden() -> dict:
    # Our own trusted fixture: it stores a config dict and a note next to tensors.
    return torch.load(GOLDEN, weights_only=False)


@pytest.fixture(scope="module")
def backbone(golden: dict) -> DinoVisionTransformer:
    model = DinoVisionTransformer(**golden["config"]).eval()
    result = load_weights(model, golden["backbone_state_dict"])
    assert result.dropped == ["sem_cls_norm.bias", "sem_cls_norm.weight"]
    return model


@pytest.fixture(scope="module")
def head(golden: dict) -> DINOHead:
    model = DINOHead(**golden["head_config"]).eval()
    load_weights(model, golden["head_state_dict"])
    return model


def test_golden_config_uses_reference_keyword_names(golden: dict) -> None:
    cfg = golden["config"]
    model = build_backbone("vit_tiny_sem", **cfg)
    assert model.embed_dim == cfg["embed_dim"] and model.n_blocks == cfg["depth"]
    assert (model.sem_L, model.sem_V, model.sem_temp) == (cfg["L"], cfg["V"], cfg["temp"])
    assert not hasattr(model, "sem_cls_norm")


@torch.no_grad()
def test_forward_features_with_masks(golden: dict, backbone: DinoVisionTransformer) -> None:
    out = backbone.forward_features(golden["x"], masks=golden["masks"])
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        assert_close(out[key], golden[f"out_{key}"], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert out["masks"] is golden["masks"]


@torch.no_grad()
def test_masks_matter(golden: dict, backbone: DinoVisionTransformer) -> None:
    # Guards against a test that passes whatever the masks do.
    out = backbone.forward_features(golden["x"])
    assert not torch.allclose(out["x_prenorm"], golden["out_x_prenorm"], **TOL)


@torch.no_grad()
def test_pos_embed_interpolation_path(golden: dict, backbone: DinoVisionTransformer) -> None:
    out = backbone.forward_features(golden["x_small"])
    assert out["x_norm_patchtokens"].shape[1] == 9
    assert_close(out["x_norm_clstoken"], golden["out_small_x_norm_clstoken"], **TOL)
    assert_close(out["x_norm_patchtokens"], golden["out_small_x_norm_patchtokens"], **TOL)


@torch.no_grad()
def test_dino_head(golden: dict, backbone: DinoVisionTransformer, head: DINOHead) -> None:
    cls = backbone.forward_features(golden["x"], masks=golden["masks"])["x_norm_clstoken"]
    assert_close(head(cls), golden["out_head"], **TOL)


@torch.no_grad()
def test_sem_raw_at_both_temperatures(golden: dict, backbone: DinoVisionTransformer) -> None:
    raw1 = backbone.sem_raw(golden["x"], temp=1.0, masks=golden["masks"])
    raw_cold = backbone.sem_raw(golden["x"], temp=1e-5, masks=golden["masks"])
    assert_close(raw1, golden["sem_raw_temp_1"], **TOL)
    assert_close(raw_cold, golden["sem_raw_temp_1e_5"], **TOL)
    # the default temperature is the model's tau (1.0 here), settable for evaluation
    assert_close(backbone.sem_raw(golden["x"], masks=golden["masks"]), raw1)
    backbone.set_sem_temp(1e-5)
    try:
        assert_close(backbone.sem_raw(golden["x"], masks=golden["masks"]), raw_cold)
    finally:
        backbone.set_sem_temp(golden["config"]["temp"])


@torch.no_grad()
def test_dlc_matches_golden_simplices(golden: dict, backbone: DinoVisionTransformer) -> None:
    L, V = golden["config"]["L"], golden["config"]["V"]
    codes = backbone.dlc(golden["x"], masks=golden["masks"])
    expected = golden["sem_raw_temp_1"].view(-1, L, V).argmax(-1)
    assert torch.equal(codes, expected)


@torch.no_grad()
def test_golden_via_reference_teacher_checkpoint(golden: dict, tmp_path: Path) -> None:
    """The same weights, saved as a reference teacher checkpoint, load into both modules."""
    teacher = {f"backbone.{k}": v for k, v in golden["backbone_state_dict"].items()}
    teacher.update({f"dino_head.{k}": v for k, v in golden["head_state_dict"].items()})
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    model = DinoVisionTransformer(**{**golden["config"], "block_chunks": 2}).eval()
    load_weights(model, path)
    head = DINOHead(**golden["head_config"]).eval()
    load_weights(head, path)
    out = model.forward_features(golden["x"], masks=golden["masks"])
    assert_close(out["x_norm_clstoken"], golden["out_x_norm_clstoken"], **TOL)
    assert_close(head(out["x_norm_clstoken"]), golden["out_head"], **TOL)
