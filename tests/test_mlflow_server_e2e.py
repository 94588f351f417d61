"""End to end against a real ``mlflow server``: a tiny pretraining, k-NN and linear probes log to it,
and MLflow's REST API finds the run, its params, the probe metrics and the checkpoint artifact."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode() or "{}")


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free 127.0.0.1 port, in its own process group (uvicorn and its workers
    are children), killed as a group at teardown."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port",
           str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server_artifacts"), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n"
                                   f"{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not answer /health within 90 s")
            time.sleep(0.3)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture
def one_thread():
    """A tiny model: one intra-op thread is fastest, above all on a loaded 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_pretraining_and_probes_log_to_a_real_server(tmp_path, mlflow_server, monkeypatch, one_thread):
    from semlab.config import load_config
    from semlab.eval.auto import evaluate_after_pretraining
    from semlab.eval.knn_report import FinalKnn
    from semlab.tracking import MLflowReporter
    from semlab.train.pretraining import run_pretraining

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    train_ds, val_ds = "Demo:split=TRAIN:n_per_class=6", "Demo:split=VAL:n_per_class=3"
    cfg = load_config("train/demo_tiny", [
        f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment_name=e2e", "mlflow.run_name=tiny_L16",
        "mlflow.log_checkpoints=artifact", "mlflow.max_artifact_mb=100",
        f"train.dataset_path={train_ds}", "train.batch_size_per_gpu=4", "train.max_iterations=3",
        "train.num_workers=0", "train.log_period_iterations=1", "evaluation.eval_period_iterations=2",
        "train.checkpoint_period_iterations=3", "crops.local_crops_number=2",
        f"evaluation.knn_dataset_train={train_ds}", f"evaluation.knn_dataset_val={val_ds}",
        "evaluation.linear_after_train=true", "knn.nb_knn=[5]",
        "linear.epochs=1", "linear.epoch_length=3", "linear.batch_size=16", "linear.num_workers=0",
        "linear.learning_rates=[0.01,0.1]", "linear.n_last_blocks=[1]",
    ])
    out = tmp_path / "outputs" / "tiny_L16"
    reporter = MLflowReporter(cfg, out, recipe="train/demo_tiny")
    assert reporter.tracking_uri == mlflow_server and not reporter.target.is_fallback
    summary = run_pretraining(cfg, out, resume=False, reporter=reporter, evaluate=FinalKnn(cfg, out))
    teacher_ckpt = Path(summary["eval_checkpoints"][-1])
    metrics = evaluate_after_pretraining(cfg, out, teacher_ckpt, reporter)
    assert {"knn_top1_k5", "linear_top1", "linear_sem_top1"} <= set(metrics)

    # ---- everything below goes through MLflow's REST API only
    api = f"{mlflow_server}/api/2.0/mlflow"
    exp = http_json(f"{api}/experiments/get-by-name?experiment_name=e2e")["experiment"]
    search = {"experiment_ids": [exp["experiment_id"]], "max_results": 50}
    runs = http_json(f"{api}/runs/search", search)["runs"]

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    assert len(parents) == 1
    run = parents[0]
    run_id = run["info"]["run_id"]
    assert run_id == reporter.run_id == json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tiny_L16"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["student.L"] == "16" and params["student.temp"] == "1.0" and params["student.V"] == "16"
    assert tags(run)["L"] == "16" and tags(run)["tau"] == "1.0" and tags(run)["recipe"] == "train/demo_tiny"
    run_metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    for key in ("linear_top1", "linear_top5", "linear_sem_top1", "knn_top1_k5", "knn_sem_top1_k5", "total",
                "lr", "images_per_s", "knn_top1_teacher"):
        assert key in run_metrics, key
    assert run_metrics["linear_top1"] == pytest.approx(metrics["linear_top1"])
    history = http_json(f"{api}/metrics/get-history?run_id={run_id}&metric_key=total")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1, 2]

    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == run_id]
    kinds = {tags(c)["semlab.eval_kind"]: c for c in children}
    assert set(kinds) == {"knn", "linear", "linear_sem"}
    assert all(tags(c)["semlab.pretrain_run_id"] == run_id for c in children)
    lin_metrics = {m["key"]: m["value"] for m in kinds["linear"]["data"]["metrics"]}
    assert lin_metrics["linear_top1"] == pytest.approx(metrics["linear_top1"])

    it = teacher_ckpt.parent.name  # training_1
    listing = http_json(f"{api}/artifacts/list?run_id={run_id}&path="
                        + urllib.parse.quote(f"checkpoints/eval/{it}"))
    files = {f["path"]: f for f in listing.get("files", [])}
    ckpt_artifact = f"checkpoints/eval/{it}/teacher_checkpoint.pth"
    assert ckpt_artifact in files
    assert int(files[ckpt_artifact]["file_size"]) == teacher_ckpt.stat().st_size
    top = http_json(f"{api}/artifacts/list?run_id={run_id}")
    assert "config.yaml" in {f["path"] for f in top.get("files", [])}
