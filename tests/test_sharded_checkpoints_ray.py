"""Kill, shrink, resume: sharded DCP checkpoints under Ray Train, 3 FSDP2 workers over gloo on CPU.

1. A 3-worker run of the tiny recipe (8 iterations, a checkpoint every 2) where rank 1 kills itself
   (``os._exit(1)``) when it fetches the batch of iteration 5: Ray restarts the group, which
   resumes from the last DCP checkpoint in Ray's storage and finishes.
2. The finished run's checkpoint is restored onto 2 workers (DCP reshards 3 -> 2): the state they
   gather equals the teacher that the 3 workers wrote at the last iteration (gathered from their
   live shards, not through DCP) and the single-process load of the same checkpoint (student,
   teacher, both centers and every AdamW moment).
3. Ray's checkpoint folder is per-rank shard files (``__<rank>_0.distcp``), none of which holds
   the full state, plus DCP's ``.metadata`` and ``trainer_state.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray_session import small_local_ray
from synthetic_batches import TINY_SSL_48

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ITERATIONS = 8
TINY = [
    *TINY_SSL_48,
    "train.num_workers=0",
    "train.batch_size_per_gpu=2",
    f"train.max_iterations={ITERATIONS}",
    "train.checkpoint_period_iterations=2",
    "evaluation.eval_period_iterations=8",
    "train.log_period_iterations=1",
    "evaluation.knn_dataset_train=",
    "evaluation.knn_dataset_val=",
    "mlflow.enabled=false",
    "ray.cpus_per_worker=0.5",
    "ray.num_to_keep=2",
    "ray.max_failures=1",
    # a 2x2 patch grid leaves some ranks without masked patches, and such a rank skips the iBOT term
    # (its loss dict then has other keys than the others' and their all-reduce deadlocks): no iBOT here
    "ibot.loss_weight=0.0",
    "ibot.mask_sample_probability=0.0",
]
WORKTREE = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def ray_cluster():
    with small_local_ray("semlab-dcp-"):
        yield


def _cfg(workers: int):
    from semlab.config import load_config

    return load_config("demo_tiny", [*TINY, f"ray.num_workers={workers}"])


@pytest.fixture(scope="module")
def killed_run(ray_cluster, tmp_path_factory):
    from semlab.orchestration.trainer import fit

    out = tmp_path_factory.mktemp("dcp") / "run3"
    result = fit(_cfg(3), out, name="run3", fault={"iteration": 5, "rank": 1}, mlflow=False, knn=False)
    return out, result


def test_killed_worker_run_completes_from_the_last_dcp_checkpoint(killed_run):
    out, result = killed_run
    assert result.error is None and result.metrics["iteration"] == ITERATIONS - 1
    marker = out / ".semlab_fault_injected_5"
    assert marker.is_file() and "rank 1" in marker.read_text(), "the fault was not injected"
    records = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(ITERATIONS)), "an iteration ran twice or never"
    storage = out / "ray_results" / "run3"
    stored = sorted(p.name for p in storage.glob("checkpoint_*") if p.is_dir())
    assert stored == ["checkpoint_0000005", "checkpoint_0000007"]
    assert Path(result.checkpoint.path).name == "checkpoint_0000007"
    # the local folder is a cache of the newest checkpoint only, and says so
    assert [p.name for p in (out / "checkpoints").glob("model_*")] == ["model_0000007"]
    assert "cache" in (out / "checkpoints" / "CACHE.txt").read_text()


def test_ray_checkpoint_is_per_rank_shards(killed_run):
    out, result = killed_run
    folder = Path(result.checkpoint.path)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "trainer_state.pt"]
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    assert state["iteration"] == ITERATIONS - 1 and state["data"]["world_size"] == 3
    shards = [folder / f"__{r}_0.distcp" for r in range(3)]
    total = sum(p.stat().st_size for p in shards)
    for shard in shards:  # FSDP2 shards dim 0 of every parameter and moment: about a third each
        assert shard.stat().st_size < 0.6 * total, {p.name: p.stat().st_size for p in shards}


def _gather_on_two_workers(config: dict) -> None:
    """Ray Train worker: build the model of the run, shard it (FSDP2 over gloo), restore the DCP
    checkpoint, gather the full state on rank 0 and save it."""
    import ray.train
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    import semlab
    from semlab.train.checkpointing import restore_checkpoint
    from semlab.train.meta_arch import SSLMetaArch
    from semlab.train.parallel import parallelize
    from semlab.train.param_groups import build_optimizer

    cfg = config["cfg"]
    model = SSLMetaArch(cfg)
    parallelize(model, cfg, torch.device("cpu"))
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    iteration = restore_checkpoint(model, optimizer, config["checkpoint"], restore_rng=False)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=full)
    if ray.train.get_context().get_world_rank() == 0:
        world = torch.distributed.get_world_size()
        torch.save({"model": model_sd, "optimizer": optim_sd, "iteration": iteration, "world": world,
                    "semlab_file": semlab.__file__}, config["result"])  # fmt: skip


def _single_process_state(cfg, checkpoint: Path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from semlab.train.checkpointing import restore_checkpoint
    from semlab.train.meta_arch import SSLMetaArch
    from semlab.train.param_groups import build_optimizer

    model = SSLMetaArch(cfg)
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    restore_checkpoint(model, optimizer, checkpoint, restore_rng=False)
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def test_checkpoint_resumes_onto_two_workers_with_the_same_state(killed_run, tmp_path):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    out, result = killed_run
    cfg = _cfg(2)
    target = tmp_path / "state_on_2.pt"
    TorchTrainer(
        _gather_on_two_workers,
        train_loop_config={"cfg": cfg, "checkpoint": result.checkpoint.path, "result": str(target)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="shrink", storage_path=str(tmp_path / "ray")),
    ).fit()
    got = torch.load(target, weights_only=True)
    assert got["world"] == 2 and got["iteration"] == ITERATIONS - 1
    assert got["semlab_file"].startswith(WORKTREE), f"workers imported {got['semlab_file']}"
    # the teacher the 3 workers gathered from their live shards at the last iteration
    teacher3 = torch.load(out / "eval" / f"training_{ITERATIONS - 1}" / "teacher_checkpoint.pth",
                          weights_only=True)["teacher"]  # fmt: skip
    teacher2 = {k.removeprefix("teacher."): v for k, v in got["model"].items() if k.startswith("teacher.")}
    assert teacher2.keys() == teacher3.keys()
    for key, value in teacher3.items():
        torch.testing.assert_close(teacher2[key], value, rtol=0, atol=0, msg=key)
    # student, centers and AdamW moments: the same as one process reads from the checkpoint
    model1, optim1 = _single_process_state(cfg, Path(result.checkpoint.path))
    assert got["model"].keys() == model1.keys()
    for key, value in model1.items():
        torch.testing.assert_close(got["model"][key], value, rtol=0, atol=0, msg=key)
    moments = {(k, s): v for k, st in optim1["state"].items() for s, v in st.items()}
    assert moments and any(s == "exp_avg_sq" for _, s in moments)
    for (key, slot), value in moments.items():
        torch.testing.assert_close(got["optimizer"]["state"][key][slot], value, rtol=0, atol=0,
                                   msg=f"{key}.{slot}")  # fmt: skip
    assert not torch.equal(model1["student.backbone.cls_token"], model1["teacher.backbone.cls_token"])
