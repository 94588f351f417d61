"""Each speed option of the training step computes what the eager step computes (CPU, float32).

Compile runs with the ``aot_eager`` backend here (dynamo + AOTAutograd, fullgraph: a graph break fails
the test) because inductor's CPU code generation takes minutes on a 2-core machine; the inductor test
is marked slow, and benchmarks/gpu_check.sh checks inductor on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from equivalence import assert_close_to_scale, assert_dicts_close
from synthetic_batches import TINY_SSL, synthetic_batch

from semlab.config import load_config
from semlab.train.loop import train_step
from semlab.train.meta_arch import SSLMetaArch
from semlab.train.param_groups import build_optimizer
from semlab.train.speed import SpeedOptionError, apply_speed_options

# drop path 0.3 (the recipe's): the batch-subset stochastic depth draws random samples, so equality
# also shows that recomputation and compiled graphs replay the same draws
BASE = [*TINY_SSL, "student.drop_path_rate=0.3"]


def forward_backward(overrides, backend="aot_eager", seed=0):
    cfg = load_config("train/demo_tiny", [*BASE, *overrides])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    apply_speed_options(model, cfg, compile_backend=backend)
    torch.manual_seed(seed)
    losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.07)
    grads = {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}
    return losses, grads, model


@pytest.fixture(scope="module")
def eager():
    losses, grads, _ = forward_backward([])
    return losses, grads


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.activation_checkpointing=full"],
        ["train.activation_checkpointing=selective"],
        ["train.compile=true"],
        ["train.compile=true", "train.activation_checkpointing=selective"],
    ],
    ids=["ac-full", "ac-selective", "compile", "compile+ac-selective"],
)
def test_speed_option_equals_eager(eager, overrides):
    losses, grads, _ = forward_backward(overrides)
    assert_dicts_close(losses, eager[0], rel=1e-5)
    assert_dicts_close(grads, eager[1], rel=1e-4)


def test_compiled_packed_step_with_chunked_loss_equals_eager_packed_step():
    """Packed crops draw the drop-path subsets in another order than the per-size path (their
    equality with the same subsets is in test_attention_kernels.py): compare with eager packed."""
    ref_losses, ref_grads, _ = forward_backward(["student.pack_crops=true"])
    losses, grads, _ = forward_backward(
        ["student.pack_crops=true", "train.compile=true", "train.activation_checkpointing=full",
         "train.loss_chunk_rows=5"]
    )
    assert_dicts_close(losses, ref_losses, rel=1e-5)
    assert_dicts_close(grads, ref_grads, rel=1e-4)


def test_equality_test_sees_a_different_random_draw(eager):
    """The comparison above is not vacuous: another drop-path draw gives other losses."""
    losses, _, _ = forward_backward([], seed=1)
    assert abs(float(losses["total"]) - float(eager[0]["total"])) > 1e-4


def test_speed_options_keep_parameter_names_and_are_applied_once():
    _, _, plain = forward_backward([])
    _, _, fast = forward_backward(["train.compile=true", "train.activation_checkpointing=full"])
    assert fast.state_dict().keys() == plain.state_dict().keys()
    block = next(fast.student.backbone.iter_blocks())
    wrapped = block.forward
    apply_speed_options(fast, fast.cfg)
    assert block.forward is wrapped


def test_unknown_checkpointing_mode_is_refused():
    cfg = load_config("train/demo_tiny", [*BASE, "train.activation_checkpointing=some"])
    with pytest.raises(SpeedOptionError, match="none, selective, full"):
        apply_speed_options(SSLMetaArch(cfg), cfg)


def test_fused_adamw_step_equals_foreach_step():
    def one_step(fused: bool):
        cfg = load_config("train/demo_tiny", [*BASE, f"optim.fused={str(fused).lower()}"])
        torch.manual_seed(0)
        model = SSLMetaArch(cfg)
        optimizer = build_optimizer(model.get_params_groups(), cfg)
        assert optimizer.defaults["fused"] is (True if fused else None)
        sched = {"lr": 1e-3, "wd": 0.04, "last_layer_lr": 1e-3, "mom": 0.99, "teacher_temp": 0.07}
        torch.manual_seed(0)
        train_step(model, optimizer, synthetic_batch(cfg), sched, clip_grad=3.0)
        return dict(model.student.named_parameters())

    plain, fused = one_step(False), one_step(True)
    for name, p in plain.items():
        assert_close_to_scale(fused[name].detach(), p.detach(), rel=1e-6, what=name)


@pytest.mark.slow
def test_inductor_compile_equals_eager(eager):
    """Inductor (the GPU's backend) on CPU; its random ops fall back to eager's RNG for the comparison."""
    import torch._inductor.config as inductor_config

    old, inductor_config.fallback_random = inductor_config.fallback_random, True
    try:
        losses, grads, _ = forward_backward(["train.compile=true"], backend="inductor")
    finally:
        inductor_config.fallback_random = old
    assert_dicts_close(losses, eager[0], rel=1e-5)
    assert_dicts_close(grads, eager[1], rel=1e-4)
