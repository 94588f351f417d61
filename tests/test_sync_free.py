"""train.sync_free_step: the step reads nothing back to the host; non-finite losses are still caught.

On CPU a host sync cannot be observed directly, so the test watches for the calls that would be one
on CUDA: reading a tensor's value in Python (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/
``float``/``int`` of a tensor: all reach ``aten._local_scalar_dense`` or a copy to the host) and the
ops whose output size depends on tensor values (``nonzero``, ``masked_select``). The eager step is the
negative control: the same watcher must see its syncs. benchmarks/gpu_check.sh runs the real check on
CUDA (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import pytest
import torch
from synthetic_batches import synthetic_batch
from test_train_loop import checkpoint_path, data_factory, list_checkpoints, tiny_cfg
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from semlab.train.loop import NonFiniteLossError, do_train, train_step, train_step_sync_free
from semlab.train.meta_arch import SSLMetaArch
from semlab.train.param_groups import build_optimizer

_HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}
_VALUE_SIZED_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero")




class _FunctionWatch(TorchFunctionMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.seen.append(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


class _DispatchWatch(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() in _VALUE_SIZED_OPS:
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))


def syncs_of(step) -> list[str]:
    # fused AdamW keeps its step counter on the parameters' device; the default (foreach) AdamW keeps it
    # on the host and reads it with .item() every step: a host tensor, so no GPU sync, but this
    # watcher cannot tell it from one on a CPU-only machine
    cfg = tiny_cfg("optim.fused=true")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    batch = synthetic_batch(cfg)
    sched = {"lr": 1e-3, "wd": 0.04, "last_layer_lr": 1e-3, "mom": 0.99, "teacher_temp": 0.07}
    step(model, optimizer, batch, sched, 3.0)  # warm-up: first-call work (lazy state) is not the step's
    seen: list[str] = []
    with _FunctionWatch(seen), _DispatchWatch(seen):
        step(model, optimizer, batch, sched, 3.0)
    return seen


def test_sync_free_step_reads_nothing_back_and_the_eager_step_does():
    assert syncs_of(train_step_sync_free) == []
    eager = syncs_of(train_step)
    assert "Tensor.cpu" in eager or "aten::_local_scalar_dense" in eager, eager


def test_sync_free_training_stops_at_the_first_non_finite_iteration(tmp_path):
    # log every 2 iterations, checkpoint every 2: the NaN at iteration 2 is found at iteration 3
    cfg = tiny_cfg("train.sync_free_step=true", "train.log_period_iterations=2")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    with pytest.raises(NonFiniteLossError, match="iteration 2") as info:
        do_train(cfg, model, data_factory(cfg, nan_at=2), tmp_path)
    assert info.value.iteration == 2 and "total" in info.value.losses
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1]  # none written after the bad step
    assert info.value.checkpoint == checkpoint_path(tmp_path, 1)


def test_sync_free_training_logs_the_same_losses_as_the_eager_loop(tmp_path):
    def run(flag: str, out):
        cfg = tiny_cfg(f"train.sync_free_step={flag}", "train.checkpoint_period_iterations=0")
        torch.manual_seed(0)
        return do_train(cfg, SSLMetaArch(cfg), data_factory(cfg), out, resume=False)["losses"]

    eager, sync_free = run("false", tmp_path / "a"), run("true", tmp_path / "b")
    assert eager.keys() == sync_free.keys()
    for key in eager:
        assert sync_free[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6)
