"""Ray Train on a real local Ray cluster (2 CPUs): gradient sync, fault tolerance, elastic resume.

One local cluster for the module (``ray.init(num_cpus=2)``, no dashboard, small object store,
private temp dir). The demo pretraining (tiny ViT, the real Demo dataset, the local data backend)
runs as ``TorchTrainer`` fits:

1. baseline: 1 worker x 8 images, 30 iterations;
2. 2 workers x 4 images, 6 iterations, where rank 1 kills itself (``os._exit(1)``) when it fetches
   the batch of iteration 4, on the first attempt only (a fault injected through the trainer);
3. run 2 resubmitted under the same name with 1 worker x 8 images up to 30 iterations, during which
   the test itself SIGKILLs the worker process once the run has passed checkpoint 9.

The local loader interleaves one global sample stream over the ranks and seeds each sample's crops
by (seed, epoch, index), so 2 x 4 and 1 x 8 images see the same samples with the same crops at
every step; KoLeo (per rank by design) and iBOT masks (drawn per batch) are off so the comparison
is exact. With correct gradient averaging, exact checkpoint resume and exact data-stream resume,
every run's loss curve equals the baseline's to float32 rounding: that is what the tests check,
along with the checkpoints Ray kept and that every checkpoint file loads.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from ray_session import descendants, proc_table, small_local_ray
from synthetic_batches import TINY_SSL_48

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GLOBAL_BATCH = 8
LONG = 30  # iterations of the baseline and of the resumed run
TINY = [
    *TINY_SSL_48,
    "train.num_workers=0",
    "train.checkpoint_period_iterations=2",
    "evaluation.eval_period_iterations=4",
    "train.log_period_iterations=1",
    "evaluation.knn_dataset_train=",
    "evaluation.knn_dataset_val=",
    "mlflow.enabled=false",
    "ray.cpus_per_worker=0.5",
    "ray.num_to_keep=2",
    "ray.max_failures=2",
    # exact 1-vs-2-worker equivalence: no per-rank KoLeo, no iBOT masks
    "dino.koleo_loss_weight=0.0",
    "ibot.loss_weight=0.0",
    "ibot.mask_sample_probability=0.0",
]


@pytest.fixture(scope="module")
def ray_cluster():
    with small_local_ray("semlab-rt-"):
        yield


def _fit(workers: int, iterations: int, out: Path, name: str, fault: dict | None = None):
    from semlab.config import load_config
    from semlab.orchestration.trainer import fit

    cfg = load_config(
        "demo_tiny",
        [*TINY, f"ray.num_workers={workers}", f"train.batch_size_per_gpu={GLOBAL_BATCH // workers}",
         f"train.max_iterations={iterations}"],
    )  # fmt: skip
    return fit(cfg, out, name=name, fault=fault, mlflow=False, knn=False)


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    iterations = [r["iteration"] for r in lines]
    assert len(iterations) == len(set(iterations)), f"an iteration was logged twice: {iterations}"
    return {r["iteration"]: r["total"] for r in lines}


def _assert_curves_equal(got: dict[int, float], want: dict[int, float], its: range) -> None:
    torch.testing.assert_close(
        torch.tensor([got[i] for i in its], dtype=torch.float64),
        torch.tensor([want[i] for i in its], dtype=torch.float64),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def _stored(storage: Path) -> list[str]:
    return sorted(p.name for p in storage.glob("checkpoint_*") if p.is_dir())


def _assert_no_corrupt_checkpoints(out: Path, storage: Path) -> None:
    from semlab.train.checkpointing import load_checkpoint_file

    folders = sorted((out / "checkpoints").glob("model_*"))
    folders += sorted(p for p in storage.glob("checkpoint_*") if p.is_dir())
    assert folders
    for path in folders:
        ckpt = load_checkpoint_file(path)  # complete DCP folder + trainer_state.pt(weights_only=True)
        assert int(path.name.split("_")[1]) == ckpt["iteration"]
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def _train_workers() -> list[int]:
    """pids of the Ray Train worker processes of this test's cluster (descendants of this process)."""
    table = proc_table()
    return sorted(pid for pid in descendants(os.getpid()) if "RayTrainWorker" in table.get(pid, (0, ""))[1])


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_train")
    results = {"baseline": _fit(1, LONG, root / "baseline", "baseline")}
    results["fault"] = _fit(2, 6, root / "fault", "fault", fault={"iteration": 4, "rank": 1})
    return root, results


def test_two_workers_match_one_worker(runs):
    root, results = runs
    base, two = _losses(root / "baseline"), _losses(root / "fault")
    assert sorted(base) == list(range(LONG)) and sorted(two) == list(range(6))
    assert base[LONG - 1] < base[0] - 0.1, "the loss did not move: the comparison would be vacuous"
    # iterations 0-3 ran on 2 FSDP2 workers before the fault
    _assert_curves_equal(two, base, range(4))
    # the teacher eval checkpoint of the sharded run is one full, unsharded file written by rank 0
    teacher = torch.load(root / "fault" / "eval" / "training_3" / "teacher_checkpoint.pth", weights_only=True)
    assert set(teacher) == {"teacher"}
    assert {k.split(".")[0] for k in teacher["teacher"]} == {"backbone", "dino_head"}
    assert teacher["teacher"]["backbone.pos_embed"].shape == (1, 1 + (28 // 14) ** 2, 48)


def test_injected_worker_death_resumes_from_last_checkpoint(runs):
    root, results = runs
    out, result = root / "fault", results["fault"]
    assert result.error is None and result.metrics["iteration"] == 5
    assert Path(result.checkpoint.path).name == "checkpoint_0000005"
    marker = out / ".semlab_fault_injected_4"
    assert marker.is_file() and "rank 1" in marker.read_text(), "the fault was not injected"
    assert _stored(out / "ray_results" / "fault") == ["checkpoint_0000003", "checkpoint_0000005"]
    _assert_no_corrupt_checkpoints(out, out / "ray_results" / "fault")
    # restarted from checkpoint 3: iterations 4, 5 continue exactly as the uninterrupted run would
    _assert_curves_equal(_losses(out), _losses(root / "baseline"), range(6))


def test_resume_on_one_worker_survives_a_killed_worker(runs):
    """Resubmit the 2-worker run with 1 worker; SIGKILL that worker mid-run from here."""
    root, _ = runs
    out, storage = root / "fault", root / "fault" / "ray_results" / "fault"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = _fit(1, LONG, out, "fault")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed = None
    deadline = time.monotonic() + 150
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        if "checkpoint_0000009" in _stored(storage):
            workers = _train_workers()
            if workers:
                killed = (workers[0], _stored(storage)[-1])
                os.kill(workers[0], signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=max(deadline - time.monotonic(), 1))
    assert not thread.is_alive(), "the resumed run did not finish"
    assert "error" not in outcome, f"the run failed: {outcome.get('error')}"
    assert killed is not None, "the worker could not be killed mid-run (it finished first)"
    assert killed[1] < f"checkpoint_{LONG - 1:07d}", f"the kill came after the last checkpoint: {killed}"
    result = outcome["result"]
    assert result.error is None and result.metrics["iteration"] == LONG - 1
    from semlab.train.checkpointing import load_checkpoint_file

    assert load_checkpoint_file(storage / f"checkpoint_{LONG - 1:07d}")["data"]["world_size"] == 1
    # 2 workers (0-5, with a restart) then 1 worker (6-29, with a restart): the baseline's curve
    losses = _losses(out)
    assert sorted(losses) == list(range(LONG))
    _assert_curves_equal(losses, _losses(root / "baseline"), range(LONG))
    _assert_no_corrupt_checkpoints(out, storage)


def test_ray_data_backend_trains_across_epoch_ends(ray_cluster, tmp_path):
    """The recipe's data path end to end: Parquet shards streamed by Ray Data into 2 Ray Train workers
    (iter_torch_batches + collate_fn, recut across epoch ends, masks in the background thread), with iBOT
    masks and KoLeo on. 16 TRAIN rows, 8 per worker, batches of 3: every epoch ends in a partial batch."""
    from semlab.config import load_config
    from semlab.data.datasets.shards import prepare_shards
    from semlab.orchestration.trainer import fit

    shards = tmp_path / "shards"
    demo = f"Demo:root={tmp_path / 'demo'}:n_per_class=2"
    prepare_shards(demo, str(shards), rows_per_shard=5, progress=False)
    cfg = load_config(
        "demo_tiny",
        [*TINY[: TINY.index("dino.koleo_loss_weight=0.0")], "ray.num_workers=2", "train.batch_size_per_gpu=3",
         "train.max_iterations=12", f"train.dataset_path=Parquet:path={shards}", "data.backend=ray",
         "data.map_num_cpus=0.5", "data.shuffle_buffer_size=4", "data.map_batch_size=4"],
    )  # fmt: skip
    result = fit(cfg, tmp_path / "out", name="ray-data", mlflow=False, knn=False)
    assert result.error is None and result.metrics["iteration"] == 11
    metrics = (tmp_path / "out" / "training_metrics.json").read_text()
    lines = [json.loads(line) for line in metrics.splitlines()]
    assert [r["iteration"] for r in lines] == list(range(12))
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in lines)
    assert any(r.get("ibot_loss", 0.0) > 0 for r in lines), "no iBOT loss: the masks did not reach the step"


# --------------------------------------------------------------------------- no cluster needed
def test_ray_report_lines_are_quieted_in_workers():
    """Ray Train's per-report INFO line (the whole metrics dict, from every rank) goes; its warnings stay."""
    import logging

    import ray.train.v2._internal.execution.context as ray_context

    from semlab.orchestration.worker import quiet_ray_report_lines

    ray_logger = logging.getLogger(ray_context.__file__)  # the name Ray logs that line under
    saved = ray_logger.level
    try:
        ray_logger.setLevel(logging.DEBUG)
        quiet_ray_report_lines()
        assert not ray_logger.isEnabledFor(logging.INFO)
        assert ray_logger.isEnabledFor(logging.WARNING)
    finally:
        ray_logger.setLevel(saved)


def test_command_line_flags_map_to_ray_keys():
    from semlab.orchestration.launch import build_parser, load_run_config

    def cfg_of(*argv: str):
        return load_run_config(build_parser().parse_args(list(argv)))

    cfg = cfg_of("--nodes", "2", "--ngpus", "4")
    assert cfg.ray.num_workers == 8 and cfg.ray.use_gpu is True
    cfg = cfg_of("--config-file", "train/vitl14_sem_L512", "--nodes", "2")  # recipe: 4 workers per node
    assert cfg.ray.num_workers == 8
    cfg = cfg_of("--num-workers", "3", "--no-use-gpu", "student.L=8")
    assert cfg.ray.num_workers == 3 and cfg.ray.use_gpu is False and cfg.student.L == 8
    with pytest.raises(ValueError, match="--ngpus"):
        cfg_of("--ngpus", "0")


def test_trainer_configs_follow_the_ray_section(tmp_path):
    from semlab.config import load_config
    from semlab.orchestration.trainer import run_config, scaling_config

    cfg = load_config(
        "demo_tiny", ["ray.num_workers=4", "ray.use_gpu=true", "ray.cpus_per_worker=8", "ray.max_failures=3",
                      "ray.num_to_keep=5", "ray.run_name=exp1", f"ray.storage_path={tmp_path}/store"],
    )  # fmt: skip
    sc = scaling_config(cfg)
    assert sc.num_workers == 4 and sc.use_gpu and sc.resources_per_worker == {"CPU": 8.0, "GPU": 1.0}
    rc = run_config(cfg, tmp_path / "out")
    assert rc.name == "exp1" and rc.storage_path == str(tmp_path / "store")
    assert rc.failure_config.max_failures == 3 and rc.checkpoint_config.num_to_keep == 5
    assert rc.failure_config.max_preemption_failures == -1  # preemptions are not failures
    default = run_config(load_config("demo_tiny"), tmp_path / "out")
    assert default.name == "out" and default.storage_path == str(tmp_path / "out" / "ray_results")


def test_reporter_reports_from_every_rank(tmp_path):
    """Metrics every log period and checkpoints from every rank; each rank hands Ray only the files
    it wrote into the sharded folder (hard links), under one checkpoint name."""
    from semlab.orchestration.reporter import RayTrainReporter

    ckpt = tmp_path / "checkpoints" / "model_0000009"
    ckpt.mkdir(parents=True)
    for name in (".metadata", "trainer_state.pt", "__0_0.distcp", "__1_0.distcp"):
        (ckpt / name).write_bytes(name.encode())
    calls = []

    def fake_report(metrics, checkpoint=None, checkpoint_dir_name=None):
        files = sorted(p.name for p in Path(checkpoint.path).iterdir()) if checkpoint else None
        calls.append((metrics, files, checkpoint_dir_name))

    rank0, rank1 = RayTrainReporter(0, report_fn=fake_report), RayTrainReporter(1, report_fn=fake_report)
    rank0.on_metrics(9, {"total": 1.5, "lr": 1e-3, "note": "text", "bad": float("nan")})
    rank1.on_metrics(9, {"total": 1.5})
    rank0.on_checkpoint(9, ckpt)
    rank1.on_checkpoint(9, ckpt)
    assert calls[0] == ({"total": 1.5, "lr": 1e-3, "iteration": 9}, None, None)
    assert calls[1] == ({"iteration": 9}, None, None)
    assert calls[2] == (
        {"total": 1.5, "lr": 1e-3, "iteration": 9},
        [".metadata", "__0_0.distcp", "trainer_state.pt"],
        "checkpoint_0000009",
    )
    assert calls[3] == ({"iteration": 9}, ["__1_0.distcp"], "checkpoint_0000009")
    linked = tmp_path / "checkpoints" / ".ray-upload-0000009-rank1" / "__1_0.distcp"
    assert linked.stat().st_ino == (ckpt / "__1_0.distcp").stat().st_ino  # a link, not a copy


def test_sweep_trial_configs():
    from omegaconf import OmegaConf

    from semlab.config import load_config
    from semlab.orchestration.tune import default_metric, trial_config, trial_dirname

    demo = load_config("demo_tiny", ["evaluation.knn_dataset_train=Demo:split=TRAIN",
                                      "evaluation.knn_dataset_val=Demo:split=VAL"])
    base = OmegaConf.to_container(demo, resolve=True)
    cfg = trial_config(base, 32, 0.5)
    assert cfg.student.L == 32 and cfg.student.temp == 0.5 and cfg.mlflow.run_name == "L32_temp0.5"
    assert trial_dirname(8, 1.0) == "L8_temp1" and default_metric(cfg) == ("knn_top1_teacher", "max")
    no_knn = load_config("demo_tiny", ["evaluation.knn_dataset_train=", "evaluation.knn_dataset_val="])
    assert default_metric(no_knn) == ("total", "min")
