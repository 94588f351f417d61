"""A real Ray Tune sweep over the SEM temperature on a private local Ray cluster (2 CPUs).

The cluster is started the way ``experiments/sweep.py`` starts one (``start_local``: loopback,
dashboard on 127.0.0.1): the sweep needs the dashboard's state API (see ``require_state_api``).
Each trial is a ``TorchTrainer`` fit of the tiny demo model for 4 iterations on a small Demo split,
followed by the k-NN that the sweep ranks by.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

from ray_session import descendants, is_loopback, listening_sockets, ray_session  # noqa: E402
from test_ray_train import TINY  # noqa: E402


def _sweep_in_subprocess(tmp_path: Path) -> subprocess.CompletedProcess:
    """Start a private Ray cluster without a dashboard in a subprocess and try a sweep on it."""
    code = (
        "import ray\n"
        "ray.init(num_cpus=1, include_dashboard=False)\n"
        "from semlab.config import load_config\n"
        "from semlab.orchestration.tune import run_sweep\n"
        f"run_sweep(load_config('demo_tiny'), {str(tmp_path / 'sweep')!r}, [4], [1.0])\n"
    )
    ray_tmp = tempfile.mkdtemp(prefix="semlab-nodash-", dir="/tmp")  # short: Ray's socket paths are limited
    try:
        env = dict(os.environ, RAY_TMPDIR=ray_tmp)
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sweep_without_state_api_is_a_clear_error(tmp_path):
    """On a cluster without a dashboard the sweep refuses to start instead of stalling later (runs first
    in this module, while no other Ray cluster is up)."""
    done = _sweep_in_subprocess(tmp_path)
    assert done.returncode != 0
    assert "no state API" in done.stderr and "dashboard" in done.stderr
    assert not (tmp_path / "sweep").exists()  # nothing was written


@pytest.fixture(scope="module")
def local_cluster():
    from semlab.orchestration.cluster import start_local

    with ray_session(lambda temp_dir: start_local(2, None, 0.3, temp_dir), "semlab-tune-"):
        yield


def test_local_cluster_listens_on_loopback_only(local_cluster):
    """The launcher's local cluster (``start_local`` defaults, dashboard included) is private to this
    machine: every TCP port its processes listen on (GCS, raylet, workers, dashboard and its agents)
    is bound to a loopback address, none to the machine's outward address or to all interfaces."""
    import ray

    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    sockets = listening_sockets(descendants(os.getpid()))
    commands = " ".join(command for *_, command in sockets)
    assert "gcs_server" in commands and "raylet" in commands and "dashboard" in commands.lower(), sockets
    assert [s for s in sockets if not is_loopback(s[0])] == []


def test_tune_sweep_runs_every_trial_and_resumes(local_cluster, tmp_path, monkeypatch):
    """Every trial finishes with its k-NN and trains the config it was given; running the same sweep
    again resumes the finished trials (same k-NN, no checkpoint rewritten) instead of training anew."""
    from semlab.config import load_config
    from semlab.orchestration.tune import KNN_METRIC, run_sweep, summarize

    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    small = ["train.dataset_path=Demo:split=TRAIN:n_per_class=4"]
    small += [f"evaluation.knn_dataset_{s.lower()}=Demo:split={s}:n_per_class=3" for s in ("TRAIN", "VAL")]
    cfg = load_config(
        "demo_tiny",
        [*TINY, *small, "ray.num_workers=1", "train.batch_size_per_gpu=4", "train.max_iterations=4",
         "knn.nb_knn=[2]", "knn.batch_size=32"],
    )  # fmt: skip
    sweep = tmp_path / "sweep"
    rows = summarize(run_sweep(cfg, sweep, [4], [0.5, 1.0], mlflow=False), KNN_METRIC)
    assert [r["error"] for r in rows] == [None, None]
    assert sorted(r["student.temp"] for r in rows) == [0.5, 1.0]
    assert all(0.0 <= r[KNN_METRIC] <= 100.0 for r in rows)
    for temp in ("0.5", "1"):
        trial = sweep / f"L4_temp{temp}"
        saved = load_config(str(trial / "config.yaml"))
        assert saved.student.temp == float(temp) and saved.student.L == 4
        stored = sorted(p.name for p in (sweep / "ray_results" / trial.name).glob("checkpoint_0*"))
        assert stored == ["checkpoint_0000001", "checkpoint_0000003"]
    first = {r["student.temp"]: r[KNN_METRIC] for r in rows}
    ckpts = sorted(sweep.glob("ray_results/L4_temp*/checkpoint_*/trainer_state.pt"))
    mtimes = {p: p.stat().st_mtime_ns for p in ckpts}
    assert len(ckpts) == 4  # 2 trials x checkpoints of iterations 1 and 3 (ray.num_to_keep=2)

    again = summarize(run_sweep(cfg, sweep, [4], [0.5, 1.0], mlflow=False), KNN_METRIC)
    assert [r["error"] for r in again] == [None, None]
    assert {r["student.temp"]: r[KNN_METRIC] for r in again} == first
    stored_again = sorted(sweep.glob("ray_results/L4_temp*/checkpoint_*/trainer_state.pt"))
    assert {p: p.stat().st_mtime_ns for p in stored_again} == mtimes


def test_sweep_with_two_clusters_on_the_machine_is_a_clear_error(local_cluster, tmp_path):
    """With this module's cluster up, a second one makes the state API ambiguous: refused, nothing written."""
    done = _sweep_in_subprocess(tmp_path)
    assert done.returncode != 0
    assert "several run on this machine" in done.stderr
    assert not (tmp_path / "sweep").exists()
