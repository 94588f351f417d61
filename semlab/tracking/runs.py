"""One MLflow run, written through ``MlflowClient``: create or resume, batched metrics, linked eval runs.

The run of a pretraining is recorded in ``<output_dir>/mlflow_run.json`` (run id, experiment,
store), so a resumed pretraining continues the same MLflow run. Metrics are buffered and sent
with ``log_batch`` (up to 1000 per request). A store that fails mid-run does not stop
training: the metrics stay buffered, are retried at the next flush, and whatever could not be
sent when the run closes is written to ``<output_dir>/mlflow_unsent.jsonl`` (``semlab sync``
replays it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from semlab.tracking.sanitize import metric_name, numeric_metrics, sanitize_params, sanitize_tags
from semlab.tracking.store import TrackingTarget, check_reachable, redact_uri
from semlab.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

RUN_RECORD = "mlflow_run.json"
UNSENT_METRICS = "mlflow_unsent.jsonl"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's kind for model training (vs genai_development)
PRETRAIN_TAG = "semlab.pretrain_run_id"
LAST_CHECKPOINT_TAG = "semlab.last_checkpoint"
_BATCH = 1000  # MLflow's limit of metrics per log_batch
_PARAM_BATCH = 100  # MLflow's limit of params/tags per log_batch


def read_run_record(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``mlflow_run.json`` of a run directory, or None when there is none (or it is unreadable)."""
    path = Path(output_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None
    return record if isinstance(record, dict) and record.get("run_id") else None


def find_run_record(path: str | os.PathLike, max_up: int = 4) -> tuple[Path, dict[str, Any]] | None:
    """Walk up from ``path`` (e.g. ``<out>/eval/training_99/teacher_checkpoint.pth``) to the run
    directory holding ``mlflow_run.json``; returns ``(run_dir, record)`` or None."""
    here = Path(path).expanduser().resolve()
    candidates = [here] if here.is_dir() else []
    candidates += list(here.parents)[:max_up]
    for folder in candidates:
        record = read_run_record(folder)
        if record is not None:
            return folder, record
    return None


def git_commit() -> str | None:
    """The commit of the source tree semlab is imported from, when it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


class RunLogger:
    """Writes to one MLflow run; every write is best effort (a failing store warns, never raises)."""

    def __init__(self, client: Any, run_id: str, experiment_id: str, target: TrackingTarget,
                 output_dir: str | os.PathLike | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.target = target
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._pending: list[Any] = []
        self._failures = 0
        self._last_error = ""

    # ------------------------------------------------------------------ creation
    @classmethod
    def open(
        cls,
        target: TrackingTarget,
        experiment_name: str,
        output_dir: str | os.PathLike,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        resume: bool = True,
        params: Mapping[str, Any] | None = None,
    ) -> tuple[RunLogger, bool]:
        """Continue the run recorded in ``output_dir/mlflow_run.json`` (same store) or create one.

        A recorded run that never reached a checkpoint (no ``semlab.last_checkpoint`` tag: e.g. a
        start that failed on a bad value) is not continued when ``params`` differ from its logged
        params: the rerun trains from scratch with other settings, so it gets a new run (tagged
        ``semlab.previous_run_id``) whose params are the ones it trains with.
        Returns ``(logger, resumed)`` and (re)writes the run record atomically.
        """
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=target.uri)
        experiment_id = get_or_create_experiment(client, experiment_name, target.artifact_location)
        record = read_run_record(output_dir) if resume else None
        run_id, resumed = None, False
        if record is not None:
            same_store = record.get("tracking_uri") == redact_uri(target.uri)
            if same_store and _run_exists(client, record["run_id"]) and params is not None and \
                    _restarts_with_other_params(client, record["run_id"], params):
                logger.warning("the MLflow run %s never reached a checkpoint and this run's params differ; "
                               "starting a new run", record["run_id"])
            elif same_store and _run_exists(client, record["run_id"]):
                run_id, resumed = record["run_id"], True
                client.update_run(run_id, status="RUNNING")
                logger.info("continuing MLflow run %s in %s", run_id, redact_uri(target.uri))
            else:
                logger.warning(
                    "the MLflow run %s recorded in %s is not in the store %s; starting a new run%s",
                    record.get("run_id"), Path(output_dir) / RUN_RECORD, redact_uri(target.uri),
                    " (copy the old one with `semlab sync`)" if record.get("fallback") else "",
                )
        if run_id is None:
            all_tags = sanitize_tags(dict(tags or {}))
            if record is not None:
                all_tags["semlab.previous_run_id"] = str(record["run_id"])
            run = client.create_run(experiment_id, run_name=run_name or None, tags=all_tags)
            run_id = run.info.run_id
        run_logger = cls(client, run_id, experiment_id, target, output_dir)
        run_logger.write_record(experiment_name)
        return run_logger, resumed

    def write_record(self, experiment_name: str) -> None:
        if self.output_dir is None:
            return
        record = {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "experiment_name": experiment_name,
            "tracking_uri": redact_uri(self.target.uri),
            "intended_tracking_uri": redact_uri(self.target.intended_uri),
            "fallback": self.target.is_fallback,
            "artifact_uri": self._safe(lambda: self.client.get_run(self.run_id).info.artifact_uri),
        }
        atomic_write_text(self.output_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")

    # ------------------------------------------------------------------ writes
    def log_params(self, params: Mapping[str, Any]) -> list[str]:
        """Log params not yet on the run; returns the keys whose logged value differs (params are
        immutable in MLflow, so a resumed run keeps its first values)."""
        clean = sanitize_params(params)
        existing = self._safe(lambda: self.client.get_run(self.run_id).data.params) or {}
        changed = [k for k, v in clean.items() if k in existing and existing[k] != v]
        new = [(k, v) for k, v in clean.items() if k not in existing]
        from mlflow.entities import Param

        for i in range(0, len(new), _PARAM_BATCH):
            chunk = [Param(k, v) for k, v in new[i : i + _PARAM_BATCH]]
            self._safe(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))
        return changed

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in sanitize_tags(tags).items()]
        for i in range(0, len(items), _PARAM_BATCH):
            chunk = items[i : i + _PARAM_BATCH]
            self._safe(lambda chunk=chunk: self.client.log_batch(run_id or self.run_id, tags=chunk))

    def add_metrics(self, step: int, metrics: Mapping[str, Any], timestamp_ms: int | None = None) -> int:
        """Buffer the numeric entries of ``metrics`` at ``step``; returns how many were buffered."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        values = numeric_metrics(metrics)
        self._pending.extend(Metric(k, v, ts, int(step)) for k, v in values.items())
        return len(values)

    def last_logged_step(self, key: str) -> int:
        """The largest step of metric ``key`` on the run (-1: none, or the store failed)."""
        history = self._safe(lambda: self.client.get_metric_history(self.run_id, key)) or []
        return max((int(m.step) for m in history), default=-1)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> bool:
        """Send buffered metrics; True when nothing is left. A failure keeps them for the next try."""
        if not self._pending:
            return True
        if self.target.uri.startswith(("http://", "https://")):
            ok, reason = check_reachable(self.target.uri, timeout=2.0)
            if not ok:
                self._note_failure(f"tracking server unavailable: {reason}")
                return False
        while self._pending:
            chunk = self._pending[:_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # the store is out of our hands: never crash training
                self._note_failure(repr(exc))
                return False
            del self._pending[: len(chunk)]
        if self._failures:
            logger.warning("MLflow logging recovered after %d failed attempt(s)", self._failures)
            self._failures = 0
        return True

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
            return True
        except Exception as exc:
            self._note_failure(f"artifact {path}: {exc!r}")
            return False

    def terminate(self, status: str = "FINISHED") -> None:
        self._safe(lambda: self.client.set_terminated(self.run_id, status=status))

    def dump_unsent(self) -> Path | None:
        """Append unsent metrics to ``<output_dir>/mlflow_unsent.jsonl`` (atomically) and clear them."""
        if not self._pending or self.output_dir is None:
            return None
        path = self.output_dir / UNSENT_METRICS
        old = path.read_text() if path.is_file() else ""
        lines = [
            json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp,
                        "step": m.step})
            for m in self._pending
        ]
        atomic_write_text(path, old + "\n".join(lines) + "\n")
        logger.warning(
            "%d MLflow metric values could not be sent (%s); kept in %s, replay them with `semlab sync`",
            len(lines), self._last_error, path,
        )
        self._pending.clear()
        return path

    # ------------------------------------------------------------------ linked evaluation runs
    def log_evaluation(
        self,
        kind: str,
        metrics: Mapping[str, Any],
        step: int = 0,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        artifacts: Iterable[str | os.PathLike] = (),
        write_back: bool = True,
    ) -> str | None:
        """Record an evaluation as a nested run of this run and copy its metrics onto this run.

        The child run carries ``mlflow.parentRunId`` and ``semlab.pretrain_run_id`` = this run's id,
        ``semlab.eval_kind`` = ``kind``, the given params, metrics (at ``step``) and artifacts.
        With ``write_back`` the same metrics are logged on this (pretraining) run at ``step``, so
        runs compare in one table. Returns the child run id (None when the store failed).
        """
        from mlflow.entities import Metric, Param

        parent_name = self._safe(lambda: self.client.get_run(self.run_id).info.run_name) or self.run_id
        child_tags = {PARENT_TAG: self.run_id, PRETRAIN_TAG: self.run_id, "semlab.eval_kind": kind}
        child_tags.update(dict(tags or {}))
        child = self._safe(
            lambda: self.client.create_run(
                self.experiment_id, run_name=f"{parent_name}/{kind}", tags=sanitize_tags(child_tags)
            )
        )
        values = numeric_metrics(metrics)
        ts = int(time.time() * 1000)
        child_id = None
        if child is not None:
            child_id = child.info.run_id
            batch = [Metric(k, v, ts, int(step)) for k, v in values.items()]
            plist = [Param(k, v) for k, v in sanitize_params(dict(params or {})).items()]
            for i in range(0, max(len(batch), len(plist)), _PARAM_BATCH):
                self._safe(lambda i=i: self.client.log_batch(
                    child_id, metrics=batch[i : i + _PARAM_BATCH], params=plist[i : i + _PARAM_BATCH]))
            for art in artifacts:
                if Path(art).exists():
                    self._safe(lambda art=art: self.client.log_artifact(child_id, str(art)))
            self._safe(lambda: self.client.set_terminated(child_id, status="FINISHED"))
        if write_back:
            self.add_metrics(step, values, ts)
            self.flush()
        return child_id

    # ------------------------------------------------------------------ helpers
    def _note_failure(self, reason: str) -> None:
        self._failures += 1
        self._last_error = reason
        if self._failures == 1:
            logger.warning(
                "MLflow logging failed (%s); training goes on, metrics are kept and retried", reason
            )

    def _safe(self, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:
            self._note_failure(repr(exc))
            return None


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``) when missing.

    A deleted experiment of that name is restored; two processes creating it at once is fine.
    The experiment is tagged ``mlflow.experimentKind=custom_model_development`` (when it has no
    kind yet), so that the MLflow UI opens it on its training runs, not on the GenAI trace overview.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
            return exp_id
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _run_exists(client: Any, run_id: str) -> bool:
    try:
        run = client.get_run(run_id)
    except Exception:
        return False
    return run.info.lifecycle_stage == "active"


def _restarts_with_other_params(client: Any, run_id: str, params: Mapping[str, Any]) -> bool:
    """True when run ``run_id`` has no checkpoint tag and a logged param differs from ``params``."""
    run = client.get_run(run_id)
    if run.data.tags.get(LAST_CHECKPOINT_TAG):
        return False
    clean = sanitize_params(params)
    return any(k in clean and clean[k] != v for k, v in run.data.params.items())


def metric_key(name: str) -> str:
    """Public alias of the metric-name sanitizer (for modules that name metrics)."""
    return metric_name(name)


def attach_to_run(path: str | os.PathLike, cfg: Any = None) -> RunLogger | None:
    """A ``RunLogger`` on the pretraining run recorded above ``path`` (a checkpoint or run dir).

    Used by standalone evaluations (``experiments/linear.py``) to link their results to the
    pretraining. Returns None (with a log line) when there is no record or its store is down.
    """
    from semlab.tracking.store import requested_uri

    found = find_run_record(path)
    if found is None:
        logger.info("no %s above %s: results are not linked to a pretraining run", RUN_RECORD, path)
        return None
    from mlflow import MlflowClient
    run_dir, record = found
    uri = record.get("tracking_uri", "")
    if not uri or "***" in uri:  # the record never holds credentials: take the URI from cfg / env
        uri = requested_uri(cfg, run_dir)[0] if cfg is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    ok, reason = check_reachable(uri, timeout=3.0)
    if not ok:
        logger.warning("MLflow store %s of run %s is not available (%s): results are not logged there",
                       redact_uri(uri), record["run_id"], reason)
        return None
    target = TrackingTarget(uri=uri, artifact_location=None, source="record", intended_uri=uri)
    client = MlflowClient(tracking_uri=uri)
    if not _run_exists(client, record["run_id"]):
        logger.warning("MLflow run %s recorded in %s is not in %s", record["run_id"], run_dir,
                       redact_uri(uri))
        return None
    return RunLogger(client, record["run_id"], record["experiment_id"], target, run_dir)
