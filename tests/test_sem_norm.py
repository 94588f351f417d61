"""``student.sem_norm``: LayerNorm per image (reference, default) or BatchNorm over the batch (SEM paper)."""

import pytest
import torch
from synthetic_batches import TINY_SSL, synthetic_batch
from torch import nn

from semlab.config import load_config
from semlab.models.sem import SimplicialEmbedding
from semlab.train.meta_arch import SSLMetaArch


def test_default_is_the_reference_layernorm() -> None:
    assert load_config(None).student.sem_norm == "layer"
    assert isinstance(SimplicialEmbedding(8, 4, L=2, V=3).sem_norm, nn.LayerNorm)
    assert load_config("train/vitl14_sem_L512").student.sem_norm == "layer"


def test_batch_norm_removes_the_image_independent_part_of_the_logits() -> None:
    """With a large input component shared by all images, LayerNorm gives every image the same
    argmax vertex; BatchNorm standardises each logit over the batch, so the codes vary."""
    torch.manual_seed(0)
    common, x = torch.randn(1, 16) * 30.0, torch.randn(64, 16)
    layer = SimplicialEmbedding(16, 8, L=4, V=8)
    batch = SimplicialEmbedding(16, 8, L=4, V=8, norm="batch")
    batch.sem_embed.weight.data.copy_(layer.sem_embed.weight.data)
    codes = {}
    for name, sem in (("layer", layer), ("batch", batch)):
        z = sem.sem_logits(x + common)
        codes[name] = z.view(64, 4, 8).argmax(-1)
    assert all(len(c.unique()) == 1 for c in codes["layer"].T)
    assert all(len(c.unique()) >= 4 for c in codes["batch"].T)
    z = batch.sem_logits(x + common)
    torch.testing.assert_close(z.mean(0), torch.zeros(32), atol=1e-5, rtol=0)


def test_unknown_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown SEM norm"):
        SimplicialEmbedding(8, 4, L=2, V=3, norm="group")


def test_teacher_gets_the_student_running_statistics() -> None:
    torch.manual_seed(0)
    model = SSLMetaArch(load_config("train/demo_tiny", [*TINY_SSL, "student.sem_norm=batch"]))
    model.train()
    s_bn, t_bn = model.student.backbone.sem_norm, model.teacher.backbone.sem_norm
    assert isinstance(s_bn, nn.BatchNorm1d) and not model.teacher.training
    model.forward_backward(synthetic_batch(model.cfg), teacher_temp=0.04)
    assert s_bn.running_mean.abs().sum() > 0 and t_bn.running_mean.abs().sum() == 0
    model.update_teacher(0.99)
    torch.testing.assert_close(t_bn.running_mean, s_bn.running_mean)
    torch.testing.assert_close(t_bn.running_var, s_bn.running_var)
