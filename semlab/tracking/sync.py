"""Copy a run logged to the local fallback store (server was down) to a tracking server.

``semlab sync --output-dir <run dir> --to <tracking uri>`` reads ``<run dir>/mlflow_run.json``,
copies the run (params, tags, full metric histories, artifacts, and its linked evaluation runs)
plus any metrics kept in ``mlflow_unsent.jsonl`` into the same experiment on the target store,
then points ``mlflow_run.json`` at the copy, so a resumed pretraining continues there. The copy
carries the tag ``semlab.synced_from`` = the source run id; syncing twice does not copy twice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from semlab.tracking.runs import (
    PARENT_TAG,
    PRETRAIN_TAG,
    RUN_RECORD,
    UNSENT_METRICS,
    get_or_create_experiment,
    read_run_record,
)
from semlab.tracking.store import TrackingTarget, check_reachable, redact_uri

logger = logging.getLogger(__name__)
SYNC_TAG = "semlab.synced_from"
_SKIP_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.log-model.history")


def _copy_run(src: Any, dst: Any, run_id: str, experiment_id: str, parent: str | None,
              extra_metrics: list[dict[str, Any]]) -> str:
    from mlflow.entities import Metric, Param

    run = src.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if k not in _SKIP_TAGS and k != "mlflow.runName"}
    tags[SYNC_TAG] = run_id
    if parent is not None:
        tags[PARENT_TAG] = parent
        tags[PRETRAIN_TAG] = parent
    new = dst.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name, tags=tags)
    new_id = new.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):
        dst.log_batch(new_id, params=params[i : i + 100])
    metrics: dict[tuple[str, int, int], Metric] = {}
    for key in run.data.metrics:
        for m in src.get_metric_history(run_id, key):
            metrics[(m.key, m.step, m.timestamp)] = Metric(m.key, m.value, m.timestamp, m.step)
    for m in extra_metrics:
        key = (m["key"], int(m["step"]), int(m["timestamp"]))
        metrics[key] = Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]))
    batch = list(metrics.values())
    for i in range(0, len(batch), 1000):
        dst.log_batch(new_id, metrics=batch[i : i + 1000])
    with tempfile.TemporaryDirectory(prefix="semlab_sync_") as tmp:
        if src.list_artifacts(run_id):
            local = src.download_artifacts(run_id, "", tmp)
            dst.log_artifacts(new_id, local)
    dst.set_terminated(new_id, status=run.info.status if run.info.status != "RUNNING" else "FINISHED",
                       end_time=run.info.end_time)
    return new_id


def _unsent(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / UNSENT_METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sync_run(output_dir: str | os.PathLike, to_uri: str, source_uri: str | None = None) -> str:
    """Copy the run recorded in ``output_dir`` to ``to_uri``; returns the id of the copy."""
    from mlflow import MlflowClient

    from semlab.utils.atomic import atomic_write_text

    output_dir = Path(output_dir)
    record = read_run_record(output_dir)
    if record is None:
        raise ValueError(f"no {RUN_RECORD} in {output_dir}: nothing to sync (not a pretraining output dir?)")
    src_uri = source_uri or record["tracking_uri"]
    if "***" in src_uri:
        raise ValueError(f"the recorded store {src_uri} needs credentials: pass --from <tracking uri>")
    ok, reason = check_reachable(to_uri)
    if not ok:
        raise ConnectionError(f"target store {redact_uri(to_uri)} is not available: {reason}")
    if redact_uri(to_uri) == record["tracking_uri"]:
        logger.info("run %s is already in %s", record["run_id"], redact_uri(to_uri))
        return record["run_id"]
    src, dst = MlflowClient(tracking_uri=src_uri), MlflowClient(tracking_uri=to_uri)
    exp_id = get_or_create_experiment(dst, record.get("experiment_name") or "semlab", None)
    found = dst.search_runs([exp_id], filter_string=f"tags.`{SYNC_TAG}` = '{record['run_id']}'")
    if found:
        new_id = found[0].info.run_id
        logger.info("run %s was already synced to %s as %s", record["run_id"], redact_uri(to_uri), new_id)
    else:
        unsent = [m for m in _unsent(output_dir) if m.get("run_id") == record["run_id"]]
        new_id = _copy_run(src, dst, record["run_id"], exp_id, None, unsent)
        children = src.search_runs([record["experiment_id"]],
                                   filter_string=f"tags.`{PARENT_TAG}` = '{record['run_id']}'")
        for child in children:
            _copy_run(src, dst, child.info.run_id, exp_id, new_id, [])
        logger.info("copied run %s (+%d evaluation runs) to %s as %s", record["run_id"], len(children),
                    redact_uri(to_uri), new_id)
    target = TrackingTarget(uri=to_uri, artifact_location=None, source="sync", intended_uri=to_uri)
    new_record = {
        **record,
        "run_id": new_id,
        "experiment_id": exp_id,
        "tracking_uri": redact_uri(target.uri),
        "intended_tracking_uri": redact_uri(target.uri),
        "fallback": False,
        "synced_from": {"run_id": record["run_id"], "tracking_uri": record["tracking_uri"]},
        "artifact_uri": dst.get_run(new_id).info.artifact_uri,
    }
    atomic_write_text(output_dir / RUN_RECORD, json.dumps(new_record, indent=2) + "\n")
    unsent_path = output_dir / UNSENT_METRICS
    if unsent_path.is_file():
        unsent_path.replace(unsent_path.with_suffix(".jsonl.synced"))
    return new_id
