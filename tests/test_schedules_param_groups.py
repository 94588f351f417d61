"""Schedules (warmup, cosine end, freeze) and optimizer parameter groups (DINOv2 rules)."""

import math

import numpy as np
import pytest
import torch

from semlab.config import apply_scaling_rules, load_config
from semlab.models import DINOHead, build_backbone
from semlab.train.param_groups import (
    apply_optim_schedule,
    build_optimizer,
    fuse_param_groups,
    get_param_groups,
    param_groups_for_module,
    vit_layer_id,
)
from semlab.train.schedules import CosineScheduler, build_schedules


def test_cosine_scheduler_warmup_cosine_and_end():
    s = CosineScheduler(
        base_value=1.0, final_value=0.1, total_iters=100, warmup_iters=10, start_warmup_value=0.0
    )
    assert s[0] == 0.0
    assert s[9] == pytest.approx(1.0)  # linspace includes the base value
    assert s[5] == pytest.approx(5 / 9)
    assert s[10] == pytest.approx(1.0)  # cosine starts at base
    j = 45
    assert s[10 + j] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * j / 90)))
    assert s[99] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))  # near, above final
    assert 0.1 < s[99] < 0.101
    assert s[100] == 0.1 and s[10_000] == 0.1  # beyond the end: final value
    assert np.all(np.diff(s.schedule[10:]) <= 0)


def test_cosine_scheduler_freeze_and_errors():
    s = CosineScheduler(2.0, 0.0, total_iters=20, warmup_iters=5, freeze_iters=3)
    assert [s[i] for i in range(3)] == [0.0, 0.0, 0.0]
    assert s[3] == 0.0 and s[7] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="exceed"):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=6)


def _cfg(*overrides):
    cfg = load_config("train/demo_tiny", list(overrides))
    apply_scaling_rules(cfg, 1)
    return cfg


def test_recipe_schedules():
    cfg = _cfg(
        "optim.epochs=10",
        "train.OFFICIAL_EPOCH_LENGTH=10",
        "optim.warmup_epochs=2",
        "optim.freeze_last_layer_epochs=1",
        "teacher.warmup_teacher_temp_epochs=3",
        "optim.base_lr=0.004",
        "train.batch_size_per_gpu=256",
    )
    assert cfg.optim.lr == pytest.approx(0.004 * math.sqrt(256 / 1024))
    s = build_schedules(cfg)
    assert s.lr[0] == 0.0 and s.lr[19] == pytest.approx(cfg.optim.lr)
    assert s.lr[100] == cfg.optim.min_lr
    assert s.wd[0] == pytest.approx(cfg.optim.weight_decay) and s.wd[100] == cfg.optim.weight_decay_end
    assert s.momentum[0] == pytest.approx(cfg.teacher.momentum_teacher)
    assert s.momentum[100] == cfg.teacher.final_momentum_teacher
    assert s.teacher_temp[0] == pytest.approx(cfg.teacher.warmup_teacher_temp)
    assert s.teacher_temp[29] == pytest.approx(cfg.teacher.teacher_temp)
    assert s.teacher_temp[500] == cfg.teacher.teacher_temp
    assert [s.last_layer_lr[i] for i in range(10)] == [0.0] * 10  # frozen first epoch
    assert s.last_layer_lr[15] == pytest.approx(s.lr[15]) and s.last_layer_lr[15] > 0


def test_schedules_need_scaled_lr():
    cfg = load_config("train/demo_tiny")
    with pytest.raises(ValueError, match="apply_scaling_rules"):
        build_schedules(cfg)


def test_layer_ids_plain_and_chunked():
    assert vit_layer_id("pos_embed", 12) == 0
    assert vit_layer_id("patch_embed.proj.weight", 12) == 0
    assert vit_layer_id("register_tokens", 12) == 0
    assert vit_layer_id("blocks.3.attn.qkv.weight", 12) == 4
    assert vit_layer_id("blocks.1.7.mlp.fc1.weight", 12, chunked_blocks=True) == 8
    assert vit_layer_id("sem_embed.weight", 12) == 13
    assert vit_layer_id("norm.weight", 12) == 13


def _by_name(groups):
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize("chunks", [0, 2])
def test_backbone_groups_layer_decay_and_no_decay(chunks):
    bb = build_backbone(
        "vit_tiny",
        embed_dim=16,
        depth=4,
        num_heads=2,
        img_size=28,
        patch_size=14,
        init_values=1e-5,
        num_register_tokens=2,
        block_chunks=chunks,
        L=3,
        V=4,
    )
    groups = _by_name(param_groups_for_module(bb, lr_decay_rate=0.5, patch_embed_lr_mult=0.2))
    blk = "blocks.1.2" if chunks else "blocks.2"
    assert groups[f"{blk}.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (5 - 3))
    assert groups["blocks.0.0.mlp.fc1.weight" if chunks else "blocks.0.mlp.fc1.weight"]["lr_multiplier"] == (
        pytest.approx(0.5**4)
    )
    assert groups["pos_embed"]["lr_multiplier"] == pytest.approx(0.5**5)
    assert groups["cls_token"]["lr_multiplier"] == pytest.approx(0.5**5)
    assert groups["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5**5 * 0.2)
    for name in ("sem_embed.weight", "sem_out.weight", "sem_norm.weight", "norm.weight"):
        assert groups[name]["lr_multiplier"] == 1.0
    # no weight decay: biases, norms (incl. sem_norm), LayerScale gamma; decay on matrices
    for name in (
        f"{blk}.attn.qkv.bias",
        f"{blk}.norm1.weight",
        f"{blk}.ls1.gamma",
        "sem_norm.weight",
        "sem_norm.bias",
        "norm.bias",
    ):
        assert groups[name]["wd_multiplier"] == 0.0, name
    for name in (f"{blk}.attn.qkv.weight", "sem_embed.weight", "patch_embed.proj.weight"):
        assert groups[name]["wd_multiplier"] == 1.0, name
    assert not any(g["is_last_layer"] for g in groups.values())


def test_head_groups_and_fusing():
    cfg = _cfg("optim.layerwise_decay=0.9")
    bb = build_backbone("vit_tiny", embed_dim=16, depth=2, num_heads=2, img_size=28, patch_size=14)
    head = DINOHead(16, 32, hidden_dim=8, bottleneck_dim=4)
    student = torch.nn.ModuleDict({"backbone": bb, "dino_head": head})
    per_param = _by_name(param_groups_for_module(head, is_backbone=False, prefix="dino_head."))
    assert per_param["dino_head.last_layer.weight_v"]["is_last_layer"]
    assert per_param["dino_head.last_layer.weight_g"]["is_last_layer"]
    assert per_param["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    assert not per_param["dino_head.mlp.0.weight"]["is_last_layer"]
    assert per_param["dino_head.mlp.0.bias"]["wd_multiplier"] == 0.0

    fused = get_param_groups(student, cfg)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in fused]
    assert len(keys) == len(set(keys))
    n_params = sum(len(g["params"]) for g in fused)
    assert n_params == len([p for p in student.parameters() if p.requires_grad])
    assert fuse_param_groups([]) == []

    opt = build_optimizer(fused, cfg)
    apply_optim_schedule(opt, lr=1.0, wd=0.5, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.0 if g["is_last_layer"] else g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.5 * g["wd_multiplier"])
    assert opt.defaults["betas"] == (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2)
