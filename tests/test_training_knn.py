"""The in-training k-NN: the teacher's top-1 at every ``evaluation.eval_period_iterations``, reported
to MLflow (in-process path) and to Ray and MLflow (Ray Train path) at that iteration.

Tiny 48-d model, 4 iterations, evaluation every 2 (iterations 1 and 3) on small Demo splits.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from ray_session import ray_session
from test_ray_train import TINY
from test_tracking import fresh_store, template_db  # noqa: F401 (fixture)

from semlab.config import load_config
from semlab.eval.training_knn import TRAINING_KNN_METRIC, training_knn, training_knn_datasets
from semlab.tracking.runs import read_run_record

SMALL = [
    "train.dataset_path=Demo:split=TRAIN:n_per_class=4",
    "evaluation.knn_during_training_train=Demo:split=TRAIN:n_per_class=3",
    "evaluation.knn_during_training_val=Demo:split=VAL:n_per_class=2",
    "knn.nb_knn=[2]",
    "knn.batch_size=32",
    "train.batch_size_per_gpu=4",
    "train.max_iterations=4",
    "evaluation.eval_period_iterations=2",
    "ray.num_workers=1",
]


def _cfg(uri: str, *extra: str):
    return load_config(
        "demo_tiny", [*TINY, *SMALL, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}", *extra]
    )


def _history(uri: str, out) -> dict[int, float]:
    run_id = read_run_record(out)["run_id"]
    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, TRAINING_KNN_METRIC)}


def test_datasets_default_to_the_final_knn_and_none_switches_off():
    cfg = load_config("demo_tiny", ["evaluation.knn_dataset_train=A", "evaluation.knn_dataset_val=B"])
    assert training_knn_datasets(cfg) == ("A", "B")
    cfg.evaluation.knn_during_training_val = "none"
    assert training_knn_datasets(cfg) is None and training_knn(cfg) is None
    cfg = load_config("demo_tiny", ["evaluation.knn_dataset_train=", "evaluation.knn_dataset_val="])
    assert training_knn(cfg) is None


def test_each_set_is_capped_by_an_evenly_spaced_subset_that_keeps_every_class(tmp_path, monkeypatch):
    from semlab.eval.training_knn import TrainingKnn, evenly_spaced_subset

    assert evenly_spaced_subset(list(range(10)), 0) == list(range(10))  # 0 = all
    assert evenly_spaced_subset(list(range(10)), 10) == list(range(10))
    assert list(evenly_spaced_subset(list(range(10)), 4)) == [0, 2, 5, 7]  # floor(i * 10 / 4)

    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    cfg = load_config("demo_tiny", [*SMALL, "evaluation.knn_during_training_max_train=16",
                                    "evaluation.knn_during_training_max_val=0"])  # fmt: skip
    train, val = TrainingKnn(cfg).datasets()
    assert len(train) == 16 and len(val) == 16  # 8 classes x 3 capped at 16; 8 x 2 uncapped
    assert {label for _, label in train} == set(range(8))  # class-sorted folder: every class kept
    assert tuple(train[0][0].shape) == (3, int(cfg.linear.crop_size), int(cfg.linear.crop_size))
    seed_recipe = load_config("train/vitl14_sem_L512")
    assert seed_recipe.evaluation.knn_during_training_max_train == 10000
    assert seed_recipe.evaluation.knn_during_training_max_val == 5000


@pytest.mark.mlflow
def test_in_process_run_logs_the_knn_at_each_eval_period(tmp_path, template_db, monkeypatch):  # noqa: F811
    from semlab.orchestration.launch import run_local

    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    uri = fresh_store(template_db, tmp_path / "mlflow.db")
    out = tmp_path / "run"
    run_local(_cfg(uri), out, resume=False, recipe="demo_tiny")
    history = _history(uri, out)
    assert sorted(history) == [1, 3]
    assert all(0.0 <= v <= 100.0 for v in history.values())


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    def start(temp_dir: str) -> None:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, _temp_dir=temp_dir)

    with ray_session(start, "semlab-tk-"):
        yield


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.mlflow
def test_ray_run_reports_the_knn_to_ray_and_mlflow_at_each_eval_period(
    ray_cluster,
    tmp_path,
    template_db,  # noqa: F811
    monkeypatch,
):
    from ray.train import UserCallback

    from semlab.orchestration.trainer import fit

    reports = tmp_path / "reports.jsonl"

    class RecordReports(UserCallback):  # defined here: Ray pickles it by value into the controller
        def after_report(self, run_context, metrics, checkpoint):
            with open(reports, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")  # rank 0's metrics, as Tune receives them

    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    uri = fresh_store(template_db, tmp_path / "mlflow.db")
    out = tmp_path / "run"
    fit(_cfg(uri), out, name="tk", mlflow=True, knn=False, callbacks=[RecordReports()])
    seen = [json.loads(line) for line in reports.read_text().splitlines()]
    ray_values = {r["iteration"]: r[TRAINING_KNN_METRIC] for r in seen if TRAINING_KNN_METRIC in r}
    assert sorted(ray_values) == [1, 3]
    assert any("iteration" in r and TRAINING_KNN_METRIC not in r for r in seen)  # checkpoint reports
    assert _history(uri, out) == pytest.approx(ray_values)
