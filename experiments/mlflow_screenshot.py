"""Screenshot of the MLflow UI comparing a sweep's trials, taken with headless Chromium.

    python experiments/mlflow_screenshot.py --store sqlite:///outputs/sweep_demo/mlflow.db \
        --output docs/images/mlflow_sweep_compare.png

Starts ``mlflow ui`` on a free port of 127.0.0.1 for the store, finds the newest sweep parent run
(tag ``semlab.kind=sweep``, or ``--parent-run-id``) and its child runs, opens the UI's compare view
of the children (``--view chart``: the experiment's chart view) in Debian's ``chromium``
(``apt-get install chromium``) with ``--headless --screenshot``, writes the PNG and stops the server
it started.
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


def compare_url(base: str, store: str, parent_run_id: str | None) -> str:
    """The UI's compare view of the children of the sweep parent (newest one when not given)."""
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
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    runs = json.dumps([c.info.run_id for c in children if c.data.tags.get("semlab.stop_reason")])
    query = urllib.parse.urlencode({"runs": runs, "experiments": json.dumps([exp.experiment_id])})
    return f"{base}/#/compare-runs?{query}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="tracking URI, e.g. sqlite:///outputs/sweep_demo/mlflow.db")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--parent-run-id", default=None, help="the sweep's parent run (default: the newest)")
    p.add_argument(
        "--view",
        choices=("compare", "chart"),
        default="compare",
        help="compare: the trials side by side; chart: the experiment's chart view",
    )
    p.add_argument("--size", default="1600,1100", help="window size W,H")
    p.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to render")
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
        url = compare_url(base, args.store, args.parent_run_id)
        if args.view == "chart":
            experiment = json.loads(urllib.parse.parse_qs(url.split("?", 1)[1])["experiments"][0])[0]
            url = f"{base}/#/experiments/{experiment}?compareRunsMode=CHART"
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
