"""Teacher eval checkpoints as MLflow LoggedModels, against a real ``mlflow server`` on 127.0.0.1.

A tiny pretraining logs with ``mlflow.log_checkpoints=model``; through MLflow's client API alone the
test finds the run's logged model of the teacher checkpoint, sees the metrics of that iteration
linked to it, downloads the checkpoint and loads it into a fresh teacher backbone.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from test_mlflow_server_e2e import mlflow_server, one_thread  # noqa: F401 - fixtures

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]


def test_teacher_checkpoint_is_a_logged_model_that_downloads_and_loads(
    tmp_path, mlflow_server, monkeypatch, one_thread  # noqa: F811
):
    import mlflow
    from mlflow import MlflowClient

    from semlab.config import load_config
    from semlab.eval.linear import build_eval_backbone
    from semlab.tracking import MLflowReporter
    from semlab.train.pretraining import run_pretraining

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = load_config("train/demo_tiny", [
        f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment_name=models",
        "mlflow.log_checkpoints=model",
        "train.dataset_path=Demo:split=TRAIN:n_per_class=4", "train.batch_size_per_gpu=4",
        "train.max_iterations=4", "train.num_workers=0", "train.log_period_iterations=1",
        "evaluation.eval_period_iterations=2", "train.checkpoint_period_iterations=4",
        "crops.local_crops_number=2", "evaluation.knn_dataset_train=", "evaluation.knn_dataset_val=",
    ])  # fmt: skip
    out = tmp_path / "outputs" / "tiny"
    reporter = MLflowReporter(cfg, out, recipe="train/demo_tiny")
    summary = run_pretraining(cfg, out, resume=False, reporter=reporter)
    reporter.close()
    assert [Path(p).parent.name for p in summary["eval_checkpoints"]] == ["training_1", "training_3"]

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(reporter.run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    by_name = {m.name: m for m in models}
    assert set(by_name) == {"teacher_training_1", "teacher_training_3"}
    model = by_name["teacher_training_3"]
    assert model.source_run_id == run.info.run_id and str(model.status).endswith("READY")
    assert run.data.tags["semlab.teacher_checkpoint.training_3"] == f"models:/{model.model_id}"
    assert run.data.tags["semlab.teacher_checkpoint_file.training_3"] == (
        f"{model.artifact_location}/teacher_checkpoint.pth"
    )
    # the metrics of iteration 3 are linked to the model, at step 3
    linked = {m.key: m for m in model.metrics or []}
    assert "total" in linked and linked["total"].step == 3
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "total")}
    assert linked["total"].value == pytest.approx(history[3])
    assert "system/cpu_percent" not in linked  # only the training metrics of that iteration
    system = client.get_metric_history(run.info.run_id, "system/memory_used_gb")
    assert sorted(m.step for m in system) == [0, 1, 2, 3]  # with every log period
    assert all(m.value > 0 for m in system)

    # download through MLflow (the server's proxied artifact store) and load
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}/teacher_checkpoint.pth", dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_server,
    )  # fmt: skip
    assert Path(local).read_bytes() == (out / "eval" / "training_3" / "teacher_checkpoint.pth").read_bytes()
    backbone = build_eval_backbone(cfg, local)
    saved = torch.load(local, weights_only=True)["teacher"]
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, saved[f"backbone.{key}"], msg=key)


def test_system_metrics_sample_cpu_memory_and_process():
    from semlab.tracking.system_metrics import SystemMetrics

    sampler = SystemMetrics()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.25:  # CPU time across several 10-ms /proc/stat ticks
        sum(i * i for i in range(20_000))
    first = sampler.sample()
    assert 0.0 <= first["system/cpu_percent"] <= 100.0
    assert 0.0 < first["system/memory_percent"] < 100.0 and first["system/memory_used_gb"] > 0
    # RSS counts mapped file pages (torch's libraries) that /proc/meminfo books as page cache, so it can
    # exceed "used" (MemTotal - MemAvailable); it never exceeds the machine's memory
    total_gb = first["system/memory_used_gb"] / (first["system/memory_percent"] / 100.0)
    assert 0.01 < first["system/process_rss_gb"] < total_gb
