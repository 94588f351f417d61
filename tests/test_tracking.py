"""MLflow tracking: store choice, credential scrubbing, the Reporter, resume, fallback, sync, compare."""

from __future__ import annotations

import json
import shutil
import socket
import warnings
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from semlab.config import load_config
from semlab.tracking import MLflowReporter, TrackingUnavailableWarning, resolve_tracking
from semlab.tracking.runs import PARENT_TAG, PRETRAIN_TAG, RUN_RECORD, UNSENT_METRICS
from semlab.tracking.sanitize import MAX_PARAM_VALUE, is_secret_key, sanitize_params
from semlab.tracking.store import default_store, redact_uri, sqlite_uri


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow SQLite store, copied wherever a test needs a fresh one (the schema
    migrations take seconds; copying takes none)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    MlflowClient(sqlite_uri(path)).search_experiments()
    return path


def fresh_store(template: Path, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, path)
    return sqlite_uri(path)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg_with(*overrides: str):
    return load_config("train/demo_tiny", list(overrides))


# ----------------------------------------------------------------------------- sanitizing
def test_credentials_are_dropped_or_redacted_and_long_values_truncated():
    flat = {
        "student.num_register_tokens": 4,
        "mlflow.tags.hf_token": "abc",
        "aws.secret_access_key": "s3cr3t",
        "db.password": "pw",
        "mlflow.tracking_uri": "https://alice:hunter2@mlflow.example.com:5000",
        "train.dataset_path": "Parquet:path=s3://bucket/shards",
        "long": "x" * 10_000,
    }
    params = sanitize_params(flat)
    assert params["student.num_register_tokens"] == "4"
    assert not any(is_secret_key(k) for k in params)
    assert "mlflow.tags.hf_token" not in params and "db.password" not in params
    assert "hunter2" not in params["mlflow.tracking_uri"] and "alice" not in params["mlflow.tracking_uri"]
    assert params["mlflow.tracking_uri"].endswith("@mlflow.example.com:5000")
    assert params["train.dataset_path"] == flat["train.dataset_path"]
    assert len(params["long"]) <= MAX_PARAM_VALUE and "truncated" in params["long"]
    assert redact_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
    assert "s3cr3t" not in redact_uri("https://h/api?token=s3cr3t&x=1")


# ----------------------------------------------------------------------------- store choice
def test_store_resolution_order(tmp_path, monkeypatch):
    out = tmp_path / "outputs" / "run_a"
    target = resolve_tracking(cfg_with(), out)
    assert target.source == "default"
    assert target.uri == sqlite_uri(tmp_path / "outputs" / "mlflow.db") == default_store(out)[0]
    assert target.artifact_location == (tmp_path / "outputs" / "mlartifacts").as_uri()

    env_db = tmp_path / "env" / "e.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(env_db))
    assert resolve_tracking(cfg_with(), out).uri == sqlite_uri(env_db)

    cfg_db = tmp_path / "cfg" / "c.db"
    target = resolve_tracking(cfg_with(f"mlflow.tracking_uri={sqlite_uri(cfg_db)}"), out)
    assert (target.uri, target.source) == (sqlite_uri(cfg_db), "config")


# ----------------------------------------------------------------------------- the reporter
@pytest.mark.slow
@pytest.mark.mlflow
def test_reporter_logs_params_tags_metrics_checkpoints_and_resumes(tmp_path, template_db):
    root = tmp_path / "outputs"
    uri = fresh_store(template_db, root / "mlflow.db")
    out = root / "run_a"
    cfg = cfg_with("mlflow.log_checkpoints=artifact", "mlflow.max_artifact_mb=1", "mlflow.tags.team=ssl")
    rep = MLflowReporter(cfg, out, recipe="train/demo_tiny", flush_every_n=3)
    assert rep.tracking_uri == uri and rep.target.source == "default"
    sent = [(it, {"total": 10.0 - it, "dino_local_crops_loss": 5.0 - it / 2, "lr": 1e-3 * it,
                  "images_per_s": 100.0 + it, "iteration": it}) for it in range(0, 10)]
    for it, m in sent[:5]:
        rep.on_metrics(it, m)
    small = out / "eval" / "training_4" / "teacher_checkpoint.pth"
    small.parent.mkdir(parents=True)
    torch.save({"teacher": {"w": torch.zeros(10)}}, small)
    rep.on_eval_checkpoint(4, small)
    big = out / "eval" / "training_9" / "teacher_checkpoint.pth"
    big.parent.mkdir(parents=True)
    torch.save({"teacher": {"w": torch.zeros(400_000)}}, big)  # 1.5 MB > max_artifact_mb
    rep.on_eval_checkpoint(9, big)
    run_id = rep.run_id
    # crash-free stop without on_end, then a resumed pretraining continues the same MLflow run
    rep.flush()
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["run_id"] == run_id and record["fallback"] is False

    rep2 = MLflowReporter(cfg, out, recipe="train/demo_tiny")
    assert rep2.run_id == run_id and rep2.resumed
    for it, m in sent[5:]:
        rep2.on_metrics(it, m)
    rep2.on_end({"iteration": 9, "losses": {"total": 1.0}, "output_dir": str(out)})

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["student.L"] == "16" and params["student.temp"] == "1.0" and params["student.V"] == "16"
    assert tags["arch"] == "vit_tiny" and tags["L"] == "16" and tags["tau"] == "1.0"
    assert tags["recipe"] == "train/demo_tiny" and tags["team"] == "ssl" and tags["semlab.version"]
    history = client.get_metric_history(run_id, "total")
    assert sorted((m.step, m.value) for m in history) == [(it, 10.0 - it) for it in range(10)]
    assert "iteration" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in artifacts
    ckpt_art = [a.path for a in client.list_artifacts(run_id, "checkpoints/eval/training_4")]
    assert ckpt_art == ["checkpoints/eval/training_4/teacher_checkpoint.pth"]
    assert client.list_artifacts(run_id, "checkpoints/eval/training_9") == []
    assert tags["semlab.teacher_checkpoint.training_9"] == big.resolve().as_uri()
    assert tags["semlab.teacher_checkpoint.training_4"].startswith(f"runs:/{run_id}/")

    # evaluations: a linked child run, metrics written back onto the pretraining run
    child = rep2.log_evaluation("linear", {"linear_top1": 42.5, "linear_top5": 80.0}, step=9,
                                params={"best_classifier": "blocks4"})
    crun = client.get_run(child)
    assert crun.data.tags[PARENT_TAG] == run_id and crun.data.tags[PRETRAIN_TAG] == run_id
    assert crun.data.metrics["linear_top1"] == 42.5
    assert client.get_run(run_id).data.metrics["linear_top1"] == 42.5

    # a standalone probe of one of its checkpoints finds the pretraining run through mlflow_run.json
    from semlab.tracking.runs import attach_to_run

    attached = attach_to_run(small)
    assert attached is not None and attached.run_id == run_id
    child = attached.log_evaluation("linear_sem", {"linear_sem_top1": 12.5}, step=4)
    assert client.get_run(child).data.tags[PARENT_TAG] == run_id
    assert client.get_run(run_id).data.metrics["linear_sem_top1"] == 12.5
    assert attach_to_run(tmp_path / "elsewhere" / "teacher_checkpoint.pth") is None


@pytest.mark.slow
@pytest.mark.mlflow
def test_only_rank_zero_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "outputs" / "run_r1"
    rep = MLflowReporter(cfg_with(), out)
    assert not rep.active and rep.run_id is None
    rep.on_metrics(0, {"total": 1.0})
    rep.on_end({"iteration": 0})
    assert not (out / RUN_RECORD).exists() and not (tmp_path / "outputs" / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.mlflow
def test_server_down_warns_falls_back_locally_and_loses_nothing(tmp_path, template_db):
    out = tmp_path / "outputs" / "run_down"
    fresh_store(template_db, out / "mlflow_fallback.db")  # skip schema migrations (speed only)
    cfg = cfg_with(f"mlflow.tracking_uri=http://127.0.0.1:{closed_port()}")
    with pytest.warns(TrackingUnavailableWarning, match="not available"):
        rep = MLflowReporter(cfg, out, check_timeout_s=2.0)
    assert rep.target.is_fallback and rep.tracking_uri == sqlite_uri(out / "mlflow_fallback.db")
    for it in range(25):
        rep.on_metrics(it, {"total": 1.0 / (it + 1), "lr": 0.1})
    rep.on_end({"iteration": 24})
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["fallback"] is True and record["intended_tracking_uri"].startswith("http://127.0.0.1:")
    client = MlflowClient(rep.tracking_uri)
    hist = client.get_metric_history(rep.run_id, "total")
    assert sorted((m.step, m.value) for m in hist) == [(it, 1.0 / (it + 1)) for it in range(25)]
    assert client.get_run(rep.run_id).data.params["student.L"] == "16"


@pytest.mark.slow
@pytest.mark.mlflow
def test_server_that_fails_after_health_check_still_falls_back(tmp_path, template_db, monkeypatch):
    """/health answers 200 but every API call fails: the run still starts, locally."""
    import http.server
    import threading

    class Broken(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            ok = self.path.startswith("/health")
            body = b"OK" if ok else b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "broken store"}'
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "text/plain" if ok else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "outputs" / "run_broken"
    fresh_store(template_db, out / "mlflow_fallback.db")
    try:
        cfg = cfg_with(f"mlflow.tracking_uri=http://127.0.0.1:{server.server_address[1]}")
        with pytest.warns(TrackingUnavailableWarning, match="failed to start the run"):
            rep = MLflowReporter(cfg, out)
    finally:
        server.shutdown()
    assert rep.target.is_fallback
    rep.on_metrics(0, {"total": 3.0})
    rep.on_end({"iteration": 0})
    assert MlflowClient(rep.tracking_uri).get_run(rep.run_id).data.metrics["total"] == 3.0


@pytest.mark.slow
@pytest.mark.mlflow
def test_failed_sends_are_kept_on_disk_and_sync_copies_the_run(tmp_path, template_db):
    out = tmp_path / "outputs" / "run_sync"
    fresh_store(template_db, out / "mlflow_fallback.db")
    cfg = cfg_with(f"mlflow.tracking_uri=http://127.0.0.1:{closed_port()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingUnavailableWarning)
        rep = MLflowReporter(cfg, out, check_timeout_s=2.0, flush_every_n=1000)
    for it in range(5):
        rep.on_metrics(it, {"total": float(it)})
    rep.flush()
    real_log_batch = rep.run.client.log_batch

    def broken(*args, **kwargs):
        raise ConnectionError("store went away")

    rep.run.client.log_batch = broken  # the store fails mid-run: training must go on
    for it in range(5, 8):
        rep.on_metrics(it, {"total": float(it)})
    rep.on_end({"iteration": 7})
    unsent = [json.loads(line) for line in (out / UNSENT_METRICS).read_text().splitlines()]
    assert sorted((m["step"], m["value"]) for m in unsent if m["key"] == "total") == [(5, 5.0), (6, 6.0),
                                                                                    (7, 7.0)]
    rep.run.client.log_batch = real_log_batch

    from semlab.cli import main

    target = fresh_store(template_db, tmp_path / "server" / "mlflow.db")
    assert main(["sync", "--output-dir", str(out), "--to", target]) == 0
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["synced_from"]["run_id"] == rep.run_id and record["tracking_uri"] == target
    client = MlflowClient(target)
    hist = client.get_metric_history(record["run_id"], "total")
    assert sorted((m.step, m.value) for m in hist) == [(it, float(it)) for it in range(8)]
    assert client.get_run(record["run_id"]).data.params["student.temp"] == "1.0"
    assert "config.yaml" in {a.path for a in client.list_artifacts(record["run_id"])}
    assert main(["sync", "--output-dir", str(out), "--to", target]) == 0  # idempotent
    assert len(client.search_runs([record["experiment_id"]])) == 1


# ----------------------------------------------------------------------------- compare chart
@pytest.mark.slow
@pytest.mark.mlflow
def test_compare_chart_from_runs(tmp_path, template_db):
    from semlab.cli import main
    from semlab.tracking.compare import fetch_runs

    uri = fresh_store(template_db, tmp_path / "outputs" / "mlflow.db")
    expected = {}
    for L in (8, 16):
        for tau in (0.1, 1.0):
            out = tmp_path / "outputs" / f"L{L}_tau{tau}"
            rep = MLflowReporter(cfg_with(f"student.L={L}", f"student.temp={tau}"), out)
            for it in range(4):
                rep.on_metrics(it, {"total": 5.0 - it + L / 100})
            rep.on_end({"iteration": 3})
            acc = 10 + L + 10 * tau
            rep.log_evaluation("linear_sem", {"linear_sem_top1": acc}, step=3)
            expected[rep.run_id] = (L, tau, acc)
    points = fetch_runs(uri, "semlab")
    assert {p.run_id: (p.L, p.tau, p.metrics["linear_sem_top1"]) for p in points} == expected
    assert all(len(p.loss) == 4 for p in points)
    png = tmp_path / "chart" / "compare.png"
    assert main(["report", "--output-root", str(tmp_path / "outputs"), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["report", "--output-root", str(tmp_path / "outputs"), "--experiment", "nope",
                 "--output", str(png)]) == 2
