"""finish_sweep_parent ends each trial's MLflow run with the scheduler's verdict (real MLflow, SQLite store).

An early-stopped trial reads KILLED whether the scheduler's stop killed it before it could end its run
(still RUNNING) or interrupted its training so that the worker ended the run FAILED first (a race the
ASHA sweep test met in CI); a failed trial reads FAILED; a finished run is left as it is.
"""

from __future__ import annotations

import pytest

from semlab.config import load_config
from semlab.tracking.runs import PARENT_TAG, metric_key
from semlab.tracking.sweep_parent import finish_sweep_parent, open_sweep_parent

METRIC = "knn_top1"

pytestmark = pytest.mark.mlflow


def test_stopped_trials_end_killed_whatever_their_worker_wrote(tmp_path):
    cfg = load_config("demo_tiny", [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    parent = open_sweep_parent(cfg, tmp_path, "s", "search: {}\n", {"student.L": {"grid": [8]}}, {})
    client = parent.client
    ended = {  # trial -> (status its own worker left, the sweep's stop reason)
        "stopped_running": (None, "early-stopped"),
        "stopped_failed": ("FAILED", "early-stopped"),
        "failed": ("FAILED", "failed"),
        "failed_running": (None, "failed"),
        "finished": ("FINISHED", "finished"),
    }
    for name, (status, _) in ended.items():
        child = client.create_run(parent.experiment_id, run_name=name, tags={PARENT_TAG: parent.run_id})
        client.log_metric(child.info.run_id, metric_key(METRIC), 50.0, step=1)
        if status is not None:
            client.set_terminated(child.info.run_id, status=status)
    rows = [
        {"trial": name, "stop_reason": reason, METRIC: 50.0, "error": "boom" if reason == "failed" else ""}
        for name, (_, reason) in ended.items()
    ]
    finish_sweep_parent(parent, rows, METRIC, [])
    runs = client.search_runs([parent.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.run_id}'")
    assert {r.info.run_name: r.info.status for r in runs} == {
        "stopped_running": "KILLED",
        "stopped_failed": "KILLED",
        "failed": "FAILED",
        "failed_running": "FAILED",
        "finished": "FINISHED",
    }
    assert client.get_run(parent.run_id).info.status == "FINISHED"
