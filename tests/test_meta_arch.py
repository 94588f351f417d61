"""SSLMetaArch: init (pretrained backbone, teacher copy), EMA, the DINOv2 step on CPU."""

import pytest
import torch
import torch.nn.functional as F
from synthetic_batches import TINY_SSL, synthetic_batch

from semlab.config import load_config
from semlab.models import build_backbone
from semlab.train.meta_arch import SSLMetaArch

TINY = [
    *TINY_SSL,
    "student.layerscale=1e-5",
]


def tiny_cfg(*overrides):
    return load_config("train/demo_tiny", TINY + list(overrides))


def test_teacher_is_a_frozen_copy_in_eval_mode():
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_cfg())
    model.train()
    assert set(model.student.keys()) == {"backbone", "dino_head"}
    assert not model.teacher.training and model.student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    s_sd, t_sd = model.student.state_dict(), model.teacher.state_dict()
    assert s_sd.keys() == t_sd.keys()
    assert all(torch.equal(s_sd[k], t_sd[k]) for k in s_sd)
    sep = SSLMetaArch(tiny_cfg("ibot.separate_head=true"))
    assert set(sep.teacher.keys()) == {"backbone", "dino_head", "ibot_head"}


def test_pretrained_reference_layout_backbone_loads_into_student_and_teacher(tmp_path):
    # a released-style plain ViT (no SEM, unchunked blocks) loaded into a chunked SEM student
    torch.manual_seed(1)
    ref = build_backbone(
        "vit_tiny",
        embed_dim=24,
        depth=2,
        num_heads=2,
        img_size=28,
        patch_size=14,
        num_register_tokens=2,
        init_values=1e-5,
    )
    for p in ref.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "released.pth"
    torch.save(ref.state_dict(), path)
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_cfg(f"MODEL.pretrained_backbone={path}", "student.block_chunks=2"))
    s_sd, t_sd = model.student.backbone.state_dict(), model.teacher.backbone.state_dict()
    assert any(k.startswith("blocks.1.1.") for k in s_sd)  # chunked layout in the model
    assert torch.equal(s_sd["blocks.1.1.attn.qkv.weight"], ref.state_dict()["blocks.1.attn.qkv.weight"])
    assert torch.equal(s_sd["pos_embed"], ref.state_dict()["pos_embed"])
    assert all(torch.equal(s_sd[k], t_sd[k]) for k in s_sd)  # student == teacher at step 0


def test_ema_update_math():
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    s = [p.detach().clone() for p in model.student.parameters()]
    t = [p.detach().clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for ps, pt, new in zip(s, t, model.teacher.parameters()):
        torch.testing.assert_close(new, 0.9 * pt + 0.1 * ps)
    model.update_teacher(0.0)
    assert all(torch.equal(a, b) for a, b in zip(model.student.parameters(), model.teacher.parameters()))


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.centering=sinkhorn_knopp"],
        ["train.centering=centering"],
        ["train.centering=centering", "ibot.separate_head=true"],
    ],
)
@pytest.mark.slow
def test_two_steps_finite_losses_and_sem_grads(overrides):
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_cfg(*overrides))
    model.train()
    opt = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        losses = model.forward_backward(synthetic_batch(model.cfg, seed=step), teacher_temp=0.04)
        assert set(losses) == {
            "dino_local_crops_loss",
            "dino_global_crops_loss",
            "koleo_loss",
            "ibot_loss",
            "total",
        }
        assert all(torch.isfinite(v) for v in losses.values())
        bb = model.student.backbone
        for name in ("sem_embed.weight", "sem_norm.weight", "sem_out.weight"):
            grad = dict(bb.named_parameters())[name].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert all(p.grad is None for p in model.teacher.parameters())
        opt.step()
        model.update_teacher(0.99)
    if "train.centering=centering" in overrides:  # the EMA center moved away from zero
        model.dino_loss.apply_center_update()
        assert model.dino_loss.center.abs().sum() > 0


@pytest.mark.slow
def test_global_loss_matches_student_crop_to_other_teacher_crop():
    # no LayerScale: with gamma=1e-5 the CLS/SEM output barely depends on the image at init
    cfg = tiny_cfg(
        "ibot.loss_weight=0",
        "dino.koleo_loss_weight=0",
        "crops.local_crops_number=0",
        "student.layerscale=0",
        "train.centering=sinkhorn_knopp",
    )
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    with torch.no_grad():  # make student and teacher differ
        for p in model.student.parameters():
            p.add_(0.2 * torch.randn_like(p))
    batch = synthetic_batch(cfg, mask=False)
    losses = model.forward_backward(batch, teacher_temp=0.01)  # peaked targets
    g = batch["collated_global_crops"]
    with torch.no_grad():
        t = model.teacher.dino_head(model.teacher.backbone.forward_features(g)["x_norm_clstoken"])
        s = model.student.dino_head(model.student.backbone.forward_features(g)["x_norm_clstoken"])
        targets = model.dino_loss.sinkhorn_knopp_teacher(t, 0.01)

    def ce(targets_, student_):
        return -(targets_ * F.log_softmax(student_ / 0.1, dim=-1)).sum(-1).mean()

    t1, t2 = targets.chunk(2)
    s1, s2 = s.chunk(2)
    scale = 2 / (1 + 2)  # loss_scales / (n_local_terms (max(0, 1)) + n_global_terms)
    swapped = scale * (ce(t2, s1) + ce(t1, s2)) / 2
    straight = scale * (ce(t1, s1) + ce(t2, s2)) / 2
    torch.testing.assert_close(losses["dino_global_crops_loss"], swapped, rtol=1e-4, atol=1e-5)
    assert not torch.isclose(losses["dino_global_crops_loss"], straight, rtol=1e-3)
    torch.testing.assert_close(losses["total"], losses["dino_global_crops_loss"])


def test_bad_centering_name():
    with pytest.raises(ValueError, match="train.centering"):
        SSLMetaArch(tiny_cfg("train.centering=softmax"))
