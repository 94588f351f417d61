"""A 3-trial ASHA sweep of the tiny recipe through ``experiments/sweep.py --sweep``, on a real local Ray
cluster (2 CPUs, dashboard on 127.0.0.1: the sweep needs the state API), with MLflow in a SQLite store.

Trials run one after another for 6 iterations with the in-training k-NN at iterations 1, 3, 5; ASHA
(grace period 2, reduction factor 2) decides at the reports of iterations 3 and 5, so a trial below
the ones before it at a rung is stopped. The tiny model trains deterministically on CPU, so which
trial stops is the same at every run. Also: the sweep file's validation (no cluster).
"""

from __future__ import annotations

import csv

import pytest
import yaml
from conftest import import_experiment
from mlflow import MlflowClient
from test_ray_train import TINY
from test_tracking import fresh_store, template_db  # noqa: F401 (fixture)

from semlab.config import load_config
from semlab.orchestration.sweep_spec import SweepSpecError, parse_sweep_spec

SMALL = [
    "train.dataset_path=Demo:split=TRAIN:n_per_class=4",
    "evaluation.knn_dataset_train=Demo:split=TRAIN:n_per_class=10",
    "evaluation.knn_dataset_val=Demo:split=VAL:n_per_class=5",
    "knn.nb_knn=[2]",
    "knn.batch_size=32",
    "train.batch_size_per_gpu=4",
    "train.max_iterations=6",
    "evaluation.eval_period_iterations=2",
    "train.checkpoint_period_iterations=3",
    "ray.num_workers=1",
]
SWEEP = {
    "name": "t_asha",
    "search_space": {"student.temp": {"grid": [1.0, 0.1, 0.5]}},
    "max_concurrent_trials": 1,
    "resources_per_trial": {"num_workers": 1, "cpus_per_worker": 0.5},
    "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
}


def test_sweep_file_errors_name_the_entry():
    cfg = load_config("demo_tiny")
    spec = parse_sweep_spec(SWEEP, cfg)
    assert spec.metric == "accuracy/knn_top1" and spec.mode == "max" and spec.is_pure_grid()
    bad = {
        "student.tmp": "no such config key",
        "student.temp": ("loguniform: low must be > 0", {"loguniform": [0, 1]}),
    }
    with pytest.raises(SweepSpecError, match=bad["student.tmp"]):
        parse_sweep_spec({"search_space": {"student.tmp": {"grid": [1]}}}, cfg)
    with pytest.raises(SweepSpecError, match=bad["student.temp"][0]):
        parse_sweep_spec({"search_space": {"student.temp": bad["student.temp"][1]}}, cfg)
    with pytest.raises(SweepSpecError, match="uniform: low must be < high"):
        parse_sweep_spec({"search_space": {"optim.base_lr": {"uniform": [2, 1]}}}, cfg)
    with pytest.raises(SweepSpecError, match="grace_period"):
        parse_sweep_spec({**SWEEP, "scheduler": {"type": "asha", "grace_period": 0}}, cfg)
    with pytest.raises(SweepSpecError, match="unknown sweep keys"):
        parse_sweep_spec({**SWEEP, "schedular": {}}, cfg)
    with pytest.raises(SweepSpecError, match="resources_per_trial"):
        parse_sweep_spec({**SWEEP, "resources_per_trial": {"gpus": 1}}, cfg)


@pytest.fixture(scope="module")
def local_cluster():
    from ray_session import ray_session

    from semlab.orchestration.cluster import start_local

    with ray_session(lambda temp_dir: start_local(2, None, 0.3, temp_dir), "semlab-asha-"):
        yield


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.mlflow
def test_asha_sweep_stops_a_trial_records_mlflow_and_reruns_nothing(
    local_cluster,
    tmp_path,
    template_db,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    uri = fresh_store(template_db, tmp_path / "mlflow.db")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    out = tmp_path / "sweep"
    argv = ["--config-file", "demo_tiny", "--sweep", str(sweep_file), "--output-dir", str(out),
            *TINY, *SMALL, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}"]  # fmt: skip
    sweep = import_experiment("sweep")
    assert sweep.main(argv) == 0

    with open(out / "t_asha_trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in rows) == ["temp0.1", "temp0.5", "temp1"]
    reasons = {r["trial"]: r["stop_reason"] for r in rows}
    assert "early-stopped" in reasons.values(), rows
    assert reasons["temp1"] == "finished"  # the first trial: nothing to compare it with at its rungs
    for r in rows:
        stopped_at = int(r["iteration"])
        assert (stopped_at < 5) if r["stop_reason"] == "early-stopped" else stopped_at == 5
    png = out / "t_asha_results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("semlab")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parents = client.search_runs([exp.experiment_id], "tags.`semlab.kind` = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert (
        parent.info.status == "FINISHED"
        and parent.data.params["search.student.temp"] == "grid [1.0, 0.1, 0.5]"
    )
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == ["temp0.1", "temp0.5", "temp1"]
    assert {n: c.data.tags["semlab.stop_reason"] for n, c in by_name.items()} == reasons
    status = {"finished": "FINISHED", "early-stopped": "KILLED"}
    assert {n: c.info.status for n, c in by_name.items()} == {n: status[r] for n, r in reasons.items()}
    best = [n for n, c in by_name.items() if c.data.tags["semlab.best_trial"] == "true"]
    assert best == [parent.data.tags["semlab.best_trial"]] == [rows[0]["trial"]]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "t_asha_trials.csv", "t_asha_results.png"} <= artifacts
    history = client.get_metric_history(by_name["temp1"].info.run_id, "accuracy/knn_top1")
    assert sorted(m.step for m in history) == [1, 3, 5]

    # the second invocation restores the sweep: no trial trains or evaluates again
    # (Tune's own experiment state under ray_results/t_asha is rewritten by the restore, as it should be)
    trial_files = [p for p in out.glob("temp*/**/*") if p.is_file()]
    trial_files += [p for p in out.glob("ray_results/temp*/**/*") if p.is_file()]
    written = {p: p.stat().st_mtime_ns for p in trial_files}
    assert any(p.suffix == ".pth" for p in written) and any(p.name == "knn_results.json" for p in written)
    assert sweep.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert not [p for p in out.glob("temp*/**/*") if p.is_file() and p not in written]
    with open(out / "t_asha_trials.csv") as f:
        assert {r["trial"]: r["stop_reason"] for r in csv.DictReader(f)} == reasons
    assert len(client.search_runs([exp.experiment_id], "tags.`semlab.kind` = 'sweep'")) == 1


def test_trial_names_and_a_changed_sweep_under_the_same_name_is_refused(tmp_path):
    from semlab.orchestration.tune import check_same_sweep, trial_name

    assert trial_name({"student.L": 8, "student.temp": 0.5}) == "L8_temp0.5"
    assert trial_name({"student.temp": 0.123456}, "abc_00001") == "temp0.1235_abc_00001"
    cfg = load_config("demo_tiny")
    check_same_sweep(tmp_path, parse_sweep_spec(SWEEP, cfg))
    check_same_sweep(tmp_path, parse_sweep_spec(SWEEP, cfg))  # the same sweep again: restored
    changed = {**SWEEP, "search_space": {"student.temp": {"grid": [1.0, 0.2]}}}
    with pytest.raises(SweepSpecError, match="give the changed sweep a new name"):
        check_same_sweep(tmp_path, parse_sweep_spec(changed, cfg))
