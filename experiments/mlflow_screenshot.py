"""Screenshot of the MLflow UI comparing a sweep's trials, taken with headless Chromium.

    python experiments/mlflow_screenshot.py --store sqlite:///outputs/sweep_demo/mlflow.db \
        --output docs/images/mlflow_sweep_compare.png

Starts ``mlflow ui`` on a free port of 127.0.0.1 for the store, finds the newest sweep parent run
(tag ``semlab.kind=sweep``, or ``--parent-run-id``) and its child runs, opens one view in Debian's
``chromium`` (``apt-get install chromium``) with ``--headless --screenshot``, writes the PNG and stops
the server it started. Views:

- ``compare``: the UI's compare view of the sweep's trials;
- ``run-metrics``: the best trial's "Model metrics" tab, its charts in sections by metric prefix
  (``accuracy`` first);
- ``chart``: the experiment's runs page in chart mode (MLflow 3.17 shows the sweep's parent run
  there, its trials folded under it).

The experiment is opened at ``#/experiments/<id>/runs``: ``#/experiments/<id>`` opens MLflow 3.17's
GenAI overview of traces whatever the experiment's kind. Every page gets ``workflowType=machine_learning``
too, the query parameter that switches the UI's browser-wide mode from "GenAI" to "Model training"
(a fresh browser profile starts in GenAI mode).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the MLflow UI did not answer at {url} within {timeout_s:.0f} s")


def view_url(base: str, store: str, parent_run_id: str | None, view: str = "compare") -> str:
    """The URL of ``view`` (see the module doc) for the sweep parent (the newest one when not given)."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("semlab")
    if exp is None:
        raise SystemExit(f"error: no experiment 'semlab' in {store}")
    if parent_run_id is None:
        parents = client.search_runs(
            [exp.experiment_id], "tags.`semlab.kind` = 'sweep'", order_by=["attributes.start_time DESC"]
        )
        if not parents:
            raise SystemExit(f"error: no sweep parent run (tag semlab.kind=sweep) in {store}")
        parent_run_id = parents[0].info.run_id
    experiment = f"{base}/#/experiments/{exp.experiment_id}"
    mode = "workflowType=machine_learning"
    if view == "chart":
        return f"{experiment}/runs?compareRunsMode=CHART&{mode}"
    if view == "run-metrics":
        best = client.get_run(parent_run_id).data.tags.get("semlab.best_run_id")
        if not best:
            raise SystemExit(f"error: the sweep parent run {parent_run_id} has no semlab.best_run_id tag")
        return f"{experiment}/runs/{best}/model-metrics?{mode}"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    runs = json.dumps([c.info.run_id for c in children if c.data.tags.get("semlab.stop_reason")])
    query = urllib.parse.urlencode(
        {"runs": runs, "experiments": json.dumps([exp.experiment_id]), "workflowType": "machine_learning"}
    )
    return f"{base}/#/compare-runs?{query}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="tracking URI, e.g. sqlite:///outputs/sweep_demo/mlflow.db")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--parent-run-id", default=None, help="the sweep's parent run (default: the newest)")
    p.add_argument(
        "--view",
        choices=("compare", "run-metrics", "chart"),
        default="compare",
        help="compare: the trials side by side; run-metrics: the best trial's metric charts; "
        "chart: the experiment's chart view",
    )
    p.add_argument("--size", default="1600,1100", help="window size W,H")
    p.add_argument(
        "--wait-ms", type=int, default=60000, help="virtual time the page gets to render (charts load late)"
    )
    args = p.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print(
            "error: chromium not found; install Debian's package: apt-get install chromium", file=sys.stderr
        )
        return 2
    if args.store.startswith("sqlite:///") and not Path(args.store[len("sqlite:///") :]).is_file():
        print(
            f"error: {args.store}: no such SQLite store (MLflow would create an empty one)", file=sys.stderr
        )
        return 2
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(mlflow_bin), "ui", "--backend-store-uri", args.store, "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    profile = tempfile.mkdtemp(prefix="semlab-chromium-")
    try:
        wait_for(f"{base}/health", 120)
        url = view_url(base, args.store, args.parent_run_id, args.view)
        output = Path(args.output).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={args.size}",
            f"--virtual-time-budget={args.wait_ms}",
            f"--screenshot={output}",
        ]
        # twice: on the first load after the server starts, the charts are still waiting for the metric
        # histories when the page's virtual time runs out (empty chart cards); the second load has them
        for _ in range(2):
            subprocess.run(
                [browser, *flags, url],
                check=True,
                timeout=300,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        print(f"{url}\n-> {output}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server this script started, and its workers
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
