"""A 4-trial ASHA sweep of the tiny recipe through ``experiments/sweep.py --sweep``, on a real local Ray
cluster (2 CPUs, dashboard on 127.0.0.1: the sweep needs the state API), with MLflow in a SQLite store.

Which trial ASHA must stop is fixed by construction, not by how the tiny model happens to train. The
sweep searches the labelled *bank* of the in-training k-NN (``evaluation.knn_during_training_train``);
its queries (``_val``) are one folder of a single class ``a``. A weighted k-NN can only predict a label
that its bank holds, so whatever the features are:

- bank = class ``a`` only (the query folder itself, or other images of ``a``): every prediction is
  ``a``, top-1 = 100 % exactly;
- bank = class ``b`` only (a folder whose ``a/`` is empty): every prediction is ``b``, top-1 = 0 %;
- bank = a folder that does not exist: the trial raises at its first evaluation (a failed trial).

Trials run one after another (grid order: a, missing, b, a') for 6 iterations with the k-NN at iterations
1, 3, 5; ASHA (grace period 2, reduction factor 2) decides at the reports of iterations 3 and 5. At 3 the
``b`` trial (0 %) is below the cutoff of the ``a`` trial (100 %) and must be stopped; ``a'`` (100 %) is
above the median 50 % of the two and equal to 100 % at 5, so it must run to the end. A broken scheduler,
a broken report of the metric to Tune or a broken k-NN would change those outcomes and fail the test.
Also, on the same cluster: a 2-trial sweep searched by Optuna (the ``optuna`` extra, part of ``dev``),
whose study must hold both trials with the in-training k-NN as their values; and without a cluster: the
sweep file's validation, trial names and the ranking of trials.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import import_experiment
from mlflow import MlflowClient
from PIL import Image
from test_ray_train import TINY
from test_tracking import fresh_store, template_db  # noqa: F401 (fixture)

from semlab.config import load_config
from semlab.orchestration.sweep_spec import SweepSpecError, parse_sweep_spec
from semlab.orchestration.tune import trial_name

KEY = "evaluation.knn_during_training_train"
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




def image_folder(root: Path, counts: dict[str, int], seed: int) -> str:
    """``ImageFolder:root=<root>`` with ``counts[c]`` random 16x16 RGB images in ``root/<c>/`` (0: empty)."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{cls}_{i}.png")
    return f"ImageFolder:root={root}"


@pytest.fixture(scope="module")
def local_cluster():
    from ray_session import ray_session

    from semlab.orchestration.cluster import start_local

    with ray_session(lambda temp_dir: start_local(2, None, 0.3, temp_dir), "semlab-asha-"):
        yield


@pytest.fixture(scope="module")
def asha_sweep(local_cluster, tmp_path_factory, template_db):  # noqa: F811
    """The sweep run twice in one directory; what the tests read of both invocations."""
    tmp = tmp_path_factory.mktemp("asha")
    query = image_folder(tmp / "knn_val", {"a": 4}, seed=0)
    banks = {
        "a": query,
        "missing": f"ImageFolder:root={tmp / 'knn_missing'}",
        "b": image_folder(tmp / "knn_other", {"a": 0, "b": 4}, seed=1),
        "a2": image_folder(tmp / "knn_same", {"a": 4}, seed=2),
    }
    names = {label: trial_name({KEY: bank}) for label, bank in banks.items()}
    sweep_spec = {**SWEEP, "search_space": {KEY: {"grid": list(banks.values())}}}
    uri = fresh_store(template_db, tmp / "mlflow.db")
    sweep_file = tmp / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep_spec))
    out = tmp / "sweep"
    argv = ["--config-file", "demo_tiny", "--sweep", str(sweep_file), "--output-dir", str(out),
            *TINY, *SMALL, f"evaluation.knn_during_training_val={query}", "ray.max_failures=0",
            "mlflow.enabled=true", f"mlflow.tracking_uri={uri}"]  # fmt: skip
    sweep = import_experiment("sweep")
    prefix = KEY.rsplit(".", 1)[-1]

    def trial_files() -> list[Path]:
        files = [p for p in out.glob(f"{prefix}*/**/*") if p.is_file()]
        return files + [p for p in out.glob(f"ray_results/{prefix}*/**/*") if p.is_file()]

    def read_rows() -> list[dict[str, str]]:
        with open(out / "t_asha_trials.csv") as f:
            return list(csv.DictReader(f))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEMLAB_CACHE", str(tmp / "cache"))
        rc = sweep.main(argv)
        rows = read_rows()
        written = {p: p.stat().st_mtime_ns for p in trial_files()}
        # the second invocation restores the sweep: no trial trains, evaluates or is retried
        # (Tune's own experiment state under ray_results/t_asha is rewritten by the restore, as it should be)
        rerun_rc = sweep.main(argv)
    return SimpleNamespace(
        rc=rc, rows=rows, names=names, out=out, uri=uri, written=written, rerun_rc=rerun_rc,
        rerun_rows=read_rows(), mtimes_after={p: p.stat().st_mtime_ns for p in written},
        new_files=[p for p in trial_files() if p not in written and "ray_results" not in p.parts],
    )  # fmt: skip


def _mlflow_sweep(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("semlab")
    parents = client.search_runs([exp.experiment_id], "tags.`semlab.kind` = 'sweep'")
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    ) if parents else []  # fmt: skip
    return client, exp, parents, {c.info.run_name: c for c in children}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.mlflow
def test_asha_stops_the_trial_below_its_rung_records_mlflow_and_reruns_nothing(asha_sweep):
    sw, names = asha_sweep, asha_sweep.names
    reasons = {r["trial"]: r["stop_reason"] for r in sw.rows}
    assert sorted(reasons) == sorted(names.values())
    assert reasons == {
        names["a"]: "finished",  # the first trial: nothing to compare it with at its rungs
        names["missing"]: "failed",
        names["b"]: "early-stopped",  # 0 % < 100 % at the rung of iteration 2 (reported at 3)
        names["a2"]: "finished",  # 100 % >= 50 % at that rung, = 100 % at the next
    }, sw.rows
    by_trial = {r["trial"]: r for r in sw.rows}
    assert int(by_trial[names["b"]]["iteration"]) == 3
    assert float(by_trial[names["b"]]["accuracy/knn_top1"]) == 0.0
    for label in ("a", "a2"):
        row = by_trial[names[label]]
        assert int(row["iteration"]) == 5 and float(row["accuracy/knn_top1"]) == 100.0
    png = sw.out / "t_asha_results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    client, exp, parents, by_name = _mlflow_sweep(sw.uri)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params[f"search.{KEY}"].startswith("grid [")
    assert sorted(by_name) == sorted(names.values())
    assert {n: c.data.tags["semlab.stop_reason"] for n, c in by_name.items()} == reasons
    status = {"finished": "FINISHED", "early-stopped": "KILLED", "failed": "FAILED"}
    assert {n: c.info.status for n, c in by_name.items()} == {n: status[r] for n, r in reasons.items()}
    best = [n for n, c in by_name.items() if c.data.tags["semlab.best_trial"] == "true"]
    assert best == [parent.data.tags["semlab.best_trial"]] == [sw.rows[0]["trial"]]
    assert best[0] in (names["a"], names["a2"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "t_asha_trials.csv", "t_asha_results.png"} <= artifacts
    # MLflow's chart view makes one section per metric prefix ("Model metrics" for names without one) in
    # the order of the sorted metric names: accuracy must sort first, before final/ and the losses
    keys = sorted(by_name[names["a"]].data.metrics)
    assert keys[0] == "accuracy/knn_top1" and "final/iteration" in keys, keys[:3]
    for label, steps in (("a", [1, 3, 5]), ("a2", [1, 3, 5]), ("b", [1, 3])):
        history = client.get_metric_history(by_name[names[label]].info.run_id, "accuracy/knn_top1")
        assert sorted(m.step for m in history) == steps, label

    # the rerun: nothing trained or evaluated again, the same table, still one parent run
    assert any(p.suffix == ".pth" for p in sw.written)
    assert any(p.name == "knn_results.json" for p in sw.written)
    assert sw.mtimes_after == sw.written
    assert sw.new_files == []
    assert {r["trial"]: r["stop_reason"] for r in sw.rerun_rows} == reasons
    assert len(client.search_runs([exp.experiment_id], "tags.`semlab.kind` = 'sweep'")) == 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.mlflow
def test_a_failed_trial_is_reported_with_its_error_tagged_failed_and_the_sweep_goes_on(asha_sweep):
    sw, names = asha_sweep, asha_sweep.names
    failed = {r["trial"]: r for r in sw.rows if r["stop_reason"] == "failed"}
    assert list(failed) == [names["missing"]]
    assert "knn_missing" in failed[names["missing"]]["error"]  # the error names the missing folder
    assert all(not r["error"] for r in sw.rows if r["trial"] != names["missing"])
    # the trials after it (b, a2) ran: the sweep went on
    went_on = {r["trial"] for r in sw.rows if r["stop_reason"] != "failed"}
    assert went_on == {names["a"], names["b"], names["a2"]}
    assert sw.rc == 1 and sw.rerun_rc == 1  # sweep.py exits 1 when a trial failed
    _, _, _, by_name = _mlflow_sweep(sw.uri)
    run = by_name[names["missing"]]
    assert run.data.tags["semlab.stop_reason"] == "failed" and run.info.status == "FAILED"
    assert "knn_missing" in run.data.tags["semlab.error"]
    assert {r["trial"]: r["stop_reason"] for r in sw.rerun_rows}[names["missing"]] == "failed"  # not retried


@pytest.mark.ray
@pytest.mark.slow
def test_optuna_proposes_the_trials_and_learns_from_the_in_training_knn(local_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    spec = {**SWEEP, "name": "t_optuna", "search_space": {"student.temp": {"uniform": [0.5, 1.0]}},
            "num_samples": 2, "scheduler": {"type": "none"},
            "search_alg": {"type": "optuna", "seed": 0}}  # fmt: skip
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    argv = ["--config-file", "demo_tiny", "--sweep", str(sweep_file), "--output-dir", str(out), "--no-mlflow",
            *TINY, *SMALL, "train.max_iterations=4"]  # fmt: skip
    assert import_experiment("sweep").main(argv) == 0

    with open(out / "t_optuna_trials.csv") as f:
        rows = {float(r["student.temp"]): r for r in csv.DictReader(f)}
    assert len(rows) == 2 and all(0.5 <= t < 1.0 for t in rows)
    assert all(r["stop_reason"] == "finished" for r in rows.values())
    # the searcher's state as Tune saved it (OptunaSearch.save pickles its attributes, the study among them)
    (state_file,) = (out / "ray_results" / "t_optuna").glob("searcher-state-*.pkl")
    study = pickle.loads(state_file.read_bytes())["_ot_study"]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        row = rows[t.params["student.temp"]]
        assert t.value == float(row["accuracy/knn_top1"])
        # the k-NN reports of iterations 1 and 3 (Tune hands the last report to on_trial_complete, as the
        # value); the k-NN-less reports in between were skipped (Ray's OptunaSearch raises on them)
        assert len(t.intermediate_values) == 2
        assert t.value == t.intermediate_values[max(t.intermediate_values)]


def test_trial_names_and_a_changed_sweep_under_the_same_name_is_refused(tmp_path):
    from semlab.orchestration.tune import check_same_sweep

    assert trial_name({"student.L": 8, "student.temp": 0.5}) == "L8_temp0.5"
    assert trial_name({"student.temp": 0.123456}, "abc_00001") == "temp0.1235_abc_00001"
    # a dataset string: a file name (no / or :), its last path part, distinct for distinct values
    one, two = (trial_name({"train.dataset_path": f"ImageFolder:root=/data/{d}/val"}) for d in ("x", "y"))
    assert one.startswith("dataset_pathval-") and len(one) == len("dataset_pathval-") + 6 and one != two
    assert trial_name({"train.dataset_path": "Demo:split=TRAIN"}).startswith("dataset_pathDemo-split-TRAIN-")
    cfg = load_config("demo_tiny")
    check_same_sweep(tmp_path, parse_sweep_spec(SWEEP, cfg))
    check_same_sweep(tmp_path, parse_sweep_spec(SWEEP, cfg))  # the same sweep again: restored
    changed = {**SWEEP, "search_space": {"student.temp": {"grid": [1.0, 0.2]}}}
    with pytest.raises(SweepSpecError, match="give the changed sweep a new name"):
        check_same_sweep(tmp_path, parse_sweep_spec(changed, cfg))


def test_ranking_breaks_ties_by_trial_name_whatever_the_order_of_results():
    from semlab.orchestration.tune import rank_rows

    m = "accuracy/knn_top1"
    rows = [{"trial": "b", m: 50.0}, {"trial": "z", m: None}, {"trial": "c", m: 90.0}]
    rows.append({"trial": "a", m: 90.0})
    for order in (rows, rows[::-1]):
        assert [r["trial"] for r in rank_rows(order, m, "max")] == ["a", "c", "b", "z"]
        assert [r["trial"] for r in rank_rows(order, m, "min")] == ["b", "a", "c", "z"]
