"""Faults as MLflow sees them: no secret in the run folder or the store, a failed start ends FAILED and
its corrected rerun records the params it trained with, and a resumed run never logs a step twice."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_tracking import cfg_with, closed_port, fresh_store, template_db  # noqa: F401 (fixture)
from test_train_loop import TINY

from semlab.data.datasets.image_folder import DatasetError
from semlab.tracking import MLflowReporter
from semlab.tracking.runs import RUN_RECORD, read_run_record
from semlab.tracking.store import sqlite_uri

pytestmark = [pytest.mark.slow, pytest.mark.mlflow]

SECRETS = ("SIGsecret3", "HFsecret1", "PWsecret4", "TOKsecret11", "AMZsecret5")


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def pretrain_entry():
    path = Path(__file__).resolve().parents[1] / "experiments" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("pretrain_entry_faults", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(out: Path, root: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(out), "--local", "train.num_workers=0", *TINY,
            f"train.dataset_path=Demo:split=TRAIN:root={root}:n_per_class=2", "train.batch_size_per_gpu=4",
            "train.max_iterations=2", "evaluation.linear_after_train=false", *extra]


def test_no_secret_reaches_the_run_folder_or_the_mlflow_store(tmp_path, template_db, caplog, capsys):  # noqa: F811
    out = tmp_path / "out" / "x" / "run"
    fresh_store(template_db, out / "mlflow_fallback.db")  # the server below is down: the run logs here
    port = closed_port()
    secrets = [
        "ray.storage_path=https://a.blob.core.windows.net/c?sv=1&sig=SIGsecret3",
        "mlflow.tags.hf_token=HFsecret1",
        "mlflow.tags.source=s3://bkt/o?X-Amz-Credential=AK&X-Amz-Signature=AMZsecret5",
        f"mlflow.tracking_uri=http://b:PWsecret4@127.0.0.1:{port}/?token=TOKsecret11",
        "mlflow.log_checkpoints=artifact",
        "evaluation.eval_period_iterations=1",
    ]
    with caplog.at_level(logging.INFO):
        assert pretrain_entry().main(tiny_args(out, tmp_path / "demo", *secrets)) == 0
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert (out / "config.yaml") in files and (out / "eval" / "training_1" / "config.yaml") in files
    assert any(p.name == "config.yaml" and "mlflow_fallback_artifacts" in str(p) for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret} found in {path}"
    client = MlflowClient(sqlite_uri(out / "mlflow_fallback.db"))
    run = client.get_run(read_run_record(out)["run_id"])
    recorded = str(run.data.params) + str(run.data.tags)
    assert not any(secret in recorded for secret in SECRETS)
    assert run.data.params["ray.storage_path"].endswith("?sv=1&sig=***") and run.data.tags["source"]
    printed = caplog.text + "".join(capsys.readouterr())
    assert not any(secret in printed for secret in SECRETS)


def test_failed_start_ends_failed_and_the_corrected_rerun_records_its_params(tmp_path, template_db):  # noqa: F811
    root = tmp_path / "outputs"
    uri = fresh_store(template_db, root / "mlflow.db")
    out = root / "p5"
    entry = pretrain_entry()
    # a bad value is refused before anything starts: no MLflow run, nothing in the output dir
    assert entry.main(tiny_args(out, tmp_path / "demo", "student.V=0")) == 2
    assert not (out / RUN_RECORD).exists()
    # a failure after the run started (here: a dataset folder that does not exist) ends the run FAILED
    missing = f"train.dataset_path=ImageFolder:root={tmp_path / 'missing'}"
    with pytest.raises(DatasetError, match="missing"):
        entry.main([*tiny_args(out, tmp_path / "demo"), missing])
    client = MlflowClient(uri)
    failed = read_run_record(out)["run_id"]
    assert client.get_run(failed).info.status == "FAILED"
    # the corrected rerun trains from scratch: a new run holding the params it trained with
    assert entry.main(tiny_args(out, tmp_path / "demo")) == 0
    rerun = read_run_record(out)["run_id"]
    assert rerun != failed
    run = client.get_run(rerun)
    assert run.info.status == "FINISHED" and run.data.tags["semlab.previous_run_id"] == failed
    assert run.data.params["train.dataset_path"].startswith("Demo:split=TRAIN")


def test_a_resumed_run_logs_each_step_once(tmp_path, template_db):  # noqa: F811
    root = tmp_path / "outputs"
    uri = fresh_store(template_db, root / "mlflow.db")
    out = root / "run"
    cfg = cfg_with()
    first = MLflowReporter(cfg, out, flush_every_n=1)
    for it in range(20):  # checkpoint at 14, metrics of 15-19 flushed, then a kill -9 (no close)
        first.on_metrics(it, {"total": 100.0 - it, "lr": 0.1, "iteration": it})
        if it == 14:
            first.on_checkpoint(14, out / "checkpoints" / "model_0000014.pth")
    first.flush()
    second = MLflowReporter(cfg_with(), out, flush_every_n=1)  # the resumed training restarts at 15
    assert second.resumed and second.run_id == first.run_id
    for it in range(15, 30):
        second.on_metrics(it, {"total": 100.0 - it, "lr": 0.1, "iteration": it})
    second.on_end({"iteration": 29})
    for key in ("total", "lr"):
        steps = sorted(m.step for m in MlflowClient(uri).get_metric_history(first.run_id, key))
        assert steps == list(range(30)), key
