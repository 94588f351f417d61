"""One MLflow parent run per sweep; every trial's pretraining run is its child.

- :func:`open_sweep_parent` creates (or, for a rerun of the same sweep directory, continues) the
  parent run named after the sweep, in the store the trials log to (by default
  ``<sweep dir>/mlflow.db``). It records the sweep file (artifact ``sweep.yaml``) and the search
  space as params (``search.<key>`` = ``grid [8, 16]``...). The trials tag their runs
  ``mlflow.parentRunId`` = its id, so the MLflow UI nests them under it.
- :func:`finish_sweep_parent` tags each child ``semlab.stop_reason`` (finished, early-stopped,
  failed) and ``semlab.best_trial`` (true on the best one), ends every early-stopped trial's run KILLED
  (whether the scheduler killed it while RUNNING or its worker ended it FAILED when the stop interrupted
  it) and a failed trial's run left RUNNING FAILED, and writes onto the parent the best
  trial (``semlab.best_trial``, ``semlab.best_run_id``), the best value of the sweep metric under the
  metric's own name, and the results CSV and PNG as artifacts.

The run record of the parent lives in ``<sweep dir>/mlflow_parent/mlflow_run.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from semlab.tracking.runs import PARENT_TAG, RunLogger, metric_key
from semlab.tracking.store import resolve_tracking
from semlab.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

PARENT_DIR = "mlflow_parent"
STOP_TAG = "semlab.stop_reason"
BEST_TAG = "semlab.best_trial"


def open_sweep_parent(
    cfg: Any,
    sweep_dir: str | Path,
    name: str,
    spec_text: str,
    search_space: dict[str, dict[str, list[Any]]],
    settings: dict[str, Any],
) -> RunLogger:
    """The sweep's parent run (created or continued), with the sweep file and search space logged."""
    folder = Path(sweep_dir) / PARENT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = resolve_tracking(cfg, folder)
    tags = {"semlab.kind": "sweep", "semlab.sweep": name}
    run, _ = RunLogger.open(target, str(cfg.mlflow.experiment_name), folder, run_name=name, tags=tags)
    params = {
        f"search.{key}": f"{kind} {values}"
        for key, dim in search_space.items()
        for kind, values in dim.items()
    }
    run.log_params({**params, **{f"sweep.{k}": v for k, v in settings.items()}})
    sweep_file = atomic_write_text(folder / "sweep.yaml", spec_text)
    run.log_artifact(sweep_file)
    run.flush()
    return run


def child_runs(run: RunLogger) -> dict[str, Any]:
    """``{run name: run}`` of the parent's children (the trials' pretraining runs)."""
    found = run.client.search_runs(
        [run.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run.run_id}'", max_results=1000
    )
    return {r.info.run_name: r for r in found}


def finish_sweep_parent(run: RunLogger, rows: list[dict[str, Any]], metric: str, files: list[Path]) -> None:
    """Tag the children with their stop reason and the best trial; best trial, best value and the
    result files onto the parent; end the parent run FINISHED. ``rows``: best first."""
    children = child_runs(run)
    best = next((r for r in rows if r.get(metric) is not None and not r.get("error")), None)
    for row in rows:
        child = children.get(row["trial"])
        if child is None:
            logger.warning("no MLflow run of the trial %s under the sweep's parent run", row["trial"])
            continue
        tags = {STOP_TAG: row["stop_reason"], BEST_TAG: str(row is best).lower()}
        if row.get("error"):
            tags["semlab.error"] = str(row["error"])[:4000]
        run.set_tags(tags, run_id=child.info.run_id)
        stopped = row["stop_reason"] == "early-stopped"
        # Killed by the scheduler (or failed) before it could end its run, the run is still RUNNING. A
        # trial the scheduler stopped may also have ended its own run FAILED first, when the stop
        # interrupted its training loop (the worker ends its run FAILED on any exception): the scheduler's
        # verdict wins, so that every early-stopped trial reads KILLED.
        if child.info.status == "RUNNING" or (stopped and child.info.status == "FAILED"):
            status = "KILLED" if stopped else "FAILED"
            run._safe(lambda c=child, s=status: _end_run(run, c.info.run_id, s, metric))
    if best is not None:
        best_child = children.get(best["trial"])
        run.set_tags(
            {BEST_TAG: best["trial"], "semlab.best_run_id": best_child.info.run_id if best_child else ""}
        )
        run.add_metrics(0, {metric_key(metric): float(best[metric])})
    for path in files:
        run.log_artifact(path)
    run.flush()
    run.terminate("FINISHED")


def _end_run(run: RunLogger, run_id: str, status: str, metric: str) -> None:
    """End a run (left RUNNING, or ended FAILED by a scheduler's stop) at the time of its last ``metric``
    value (when it stopped), not now."""
    history = run.client.get_metric_history(run_id, metric_key(metric))
    end_ms = max((m.timestamp for m in history), default=None)
    run.client.set_terminated(run_id, status=status, end_time=end_ms)
