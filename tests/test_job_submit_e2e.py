"""End to end through a real Ray head: ``ray start --head`` + ``ray job submit`` of the pretraining.

The head is started from this test's Python environment (its ``bin`` first on PATH, so the job's
``python`` has semlab), bound to 127.0.0.1 with free ports and a private temp dir, with 2 CPUs. The
job runs ``python experiments/pretrain.py`` with a tiny config and 2 Ray Train workers; inside the
job ``RAY_ADDRESS`` points at this head, so the launcher joins it instead of starting its own
cluster. The test checks the job SUCCEEDED, that ``ray job logs`` showed rank 0's progress line of
every log period while the job was still running, and that the run left its checkpoints (Ray's
sharded ones and the local cache), its metrics and its config.

Clean-up: ``ray stop`` would stop every Ray process on the machine, other users' clusters
included. The head is stopped instead by terminating exactly the processes of this head (those
whose command line names its private temp dir, and their descendants), in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from ray_session import is_loopback, listening_sockets, processes_naming
from synthetic_batches import TINY_SSL_48

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "experiments" / "pretrain.py"
JOB_TIMEOUT_S = 300
TINY = [
    *TINY_SSL_48,
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.max_iterations=4",
    "train.checkpoint_period_iterations=2",
    "evaluation.eval_period_iterations=2",
    "train.log_period_iterations=1",
    "evaluation.knn_dataset_train=none",
    "evaluation.knn_dataset_val=none",
    "mlflow.enabled=false",
    "ray.cpus_per_worker=0.5",
    "ray.num_to_keep=2",
]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every service of the head on 127.0.0.1 (docs/cluster.md)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _ray(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("ray", path=env["PATH"])
    assert exe, "the 'ray' CLI is not on this environment's PATH"
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _stop_head(temp_dir: str) -> None:
    """Terminate the processes of the head started with ``--temp-dir temp_dir`` and their descendants."""
    own = processes_naming(temp_dir)
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in own:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in own):
            time.sleep(0.2)
        own = {pid for pid in own if os.path.exists(f"/proc/{pid}")}
        if not own:
            return


def _head_logs(temp_dir: str, names: tuple[str, ...] = ("dashboard_agent", "dashboard", "raylet")) -> str:
    """The tails of the head's service logs (for failure messages)."""
    logs = Path(temp_dir) / "session_latest" / "logs"
    parts = []
    for name in names:
        for path in sorted(logs.glob(f"{name}*.log"))[:2]:
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


@pytest.fixture
def ray_head():
    env = _env()
    temp_dir = tempfile.mkdtemp(prefix="semlab-rjs-", dir="/tmp")  # short: Ray's socket paths must fit
    ports = {
        "--port": _free_port(),
        "--dashboard-port": _free_port(),
        # every service with a fixed default port gets a free one (other Ray clusters may run here)
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    args = ["start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1"]
    for flag, port in ports.items():
        args += [flag, str(port)]
    args += ["--num-cpus", "2", "--num-gpus", "0", "--temp-dir", temp_dir]
    args += ["--object-store-memory", str(300 * 1024**2), "--disable-usage-stats"]
    try:
        started = _ray(*args, env=env, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield f"http://127.0.0.1:{ports['--dashboard-port']}", env, temp_dir
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _job_state(text: str, job_id: str) -> str | None:
    """The terminal state in the output of ``ray job status``, or None while the job runs."""
    text = _ANSI.sub("", text)
    for pattern, state in ((" succeeded", "SUCCEEDED"), (" failed", "FAILED"), (" was stopped", "STOPPED")):
        if f"Job '{job_id}'{pattern}" in text:
            return state
    return None


PROGRESS = re.compile(
    r"semlab\.progress: it (\d+)/(\d+) .* img/s \| loss .* \| lr .* \| data wait .* \| eta "
)


def _follow_progress(address: str, job_id: str, env: dict[str, str]) -> tuple[str, set[int]]:
    """Poll ``ray job logs`` and ``ray job status`` until the job ends; returns the final state and
    the iterations whose progress line the logs showed while the job was not finished yet."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    seen_running: set[int] = set()
    while time.monotonic() < deadline:
        logs = _ray("job", "logs", "--address", address, job_id, env=env, timeout=60).stdout
        lines = {int(m.group(1)) for m in PROGRESS.finditer(_ANSI.sub("", logs))}
        out = _ray("job", "status", "--address", address, job_id, env=env, timeout=60)
        state = _job_state(out.stdout + out.stderr, job_id)
        if state is not None:
            return state, seen_running
        seen_running |= lines  # seen in the logs before this status said the job still ran
        time.sleep(1)
    _ray("job", "stop", "--address", address, job_id, env=env, timeout=60)
    return "TIMEOUT", seen_running


def test_ray_job_submit_runs_the_pretraining(ray_head, tmp_path):
    address, env, temp_dir = ray_head
    out = tmp_path / "run"
    job_id = f"semlab-e2e-{uuid.uuid4().hex[:8]}"
    entry = [
        "python",
        str(PRETRAIN),
        "--config-file",
        "train/demo_tiny",
        "--output-dir",
        str(out),
        "--num-workers",
        "2",
        *TINY,
    ]
    submit = ["job", "submit", "--address", address, "--submission-id", job_id, "--no-wait", "--", *entry]
    deadline = time.monotonic() + 90
    while True:  # right after `ray start` the dashboard agent may not accept jobs yet
        submitted = _ray(*submit, env=env, timeout=120)
        not_ready = "No available agent" in submitted.stderr or "Connection refused" in submitted.stderr
        if submitted.returncode == 0 or not not_ready or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submitted.returncode == 0, (
        f"ray job submit failed:\n{submitted.stderr[-2000:]}\nhead logs:\n{_head_logs(temp_dir)}"
    )
    # the head, its job supervisor and the job's workers listen on loopback only, as docs/cluster.md says
    sockets = listening_sockets(processes_naming(temp_dir))
    assert "gcs_server" in {program for *_, program in sockets}, sockets
    assert [s for s in sockets if not is_loopback(s[0])] == []
    status, seen_running = _follow_progress(address, job_id, env)
    logs = _ANSI.sub("", _ray("job", "logs", "--address", address, job_id, env=env, timeout=60).stdout)
    assert status == "SUCCEEDED", f"job {job_id} ended {status}; logs:\n{logs[-6000:]}"
    assert "Started a local Ray instance" not in logs, "the job started its own cluster instead of joining"
    # one progress line per log period (1 iteration), from rank 0 only, visible while the job ran
    progress = [int(m.group(1)) for m in PROGRESS.finditer(logs)]
    assert progress == [1, 2, 3, 4], f"progress lines: {progress}\n{logs[-4000:]}"
    assert seen_running, f"no progress line showed before the job ended:\n{logs[-4000:]}"

    # Ray's sharded checkpoints (storage default: <output_dir>/ray_results/<run name>): one shard
    # file per worker; the local folder is a cache of the newest one
    from semlab.train.checkpointing import load_checkpoint_file

    storage = out / "ray_results" / out.name
    stored = sorted(p.name for p in storage.glob("checkpoint_*") if p.is_dir())
    assert stored == ["checkpoint_0000001", "checkpoint_0000003"]
    for name in stored:
        assert load_checkpoint_file(storage / name)["data"]["world_size"] == 2
    names = sorted(p.name for p in (storage / "checkpoint_0000003").iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.pt"]
    assert [p.name for p in (out / "checkpoints").glob("model_*")] == ["model_0000003"]
    assert (out / "checkpoints" / "last_checkpoint").read_text().strip() == "model_0000003"
    assert (out / "eval" / "training_3" / "teacher_checkpoint.pth").is_file()
    # metrics of every iteration, and the resolved config
    lines = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1, 2, 3]
    assert all(r["total"] == r["total"] for r in lines)  # finite (not NaN)
    assert (out / "config.yaml").is_file()
