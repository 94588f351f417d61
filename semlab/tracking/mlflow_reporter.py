"""``MLflowReporter``: the training loop's Reporter that records a pretraining as one MLflow run.

What one pretraining records:
- params: the flattened resolved config (``student.L``, ``student.temp``, ``optim.base_lr``...),
  credentials dropped and long values truncated (``semlab.tracking.sanitize``);
- tags: ``arch``, ``L``, ``V``, ``tau``, ``recipe``, ``semlab.version``, the git commit
  (``mlflow.source.git.commit``) when available, ``semlab.output_dir``, ``cfg.mlflow.tags``;
- metrics at each logged iteration (every loss part, lr, wd, mom, teacher_temp, images/s, ETA...),
  with system metrics (``system/cpu_percent``, memory, GPU memory; ``mlflow.system_metrics``,
  ``semlab.tracking.system_metrics``), batched with ``MlflowClient.log_batch``;
- dataset inputs: the training data and the evaluation sets (context ``training`` / ``evaluation``,
  ``semlab.tracking.dataset_inputs``), shown in the runs table's Dataset column;
- artifacts: the resolved config (``config.yaml``), and each teacher eval checkpoint: as an MLflow 3
  LoggedModel ``teacher_training_<it>`` with the file as its artifact and the iteration's metrics
  linked (``mlflow.log_checkpoints: model``, the default; ``semlab.tracking.teacher_models``),
  copied as a run artifact (``artifact``, up to ``mlflow.max_artifact_mb``), or recorded as a
  ``semlab.teacher_checkpoint.training_<it>`` tag holding its URI (``uri``);
- evaluations (k-NN, linear probes) as nested runs whose metrics are also written back onto the
  pretraining run (``knn_top1_k20``, ``linear_top1``, ``linear_sem_top1``...).

Only the global rank 0 process logs; on every other rank the reporter does nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from semlab.tracking.runs import LAST_CHECKPOINT_TAG, RunLogger, git_commit
from semlab.tracking.sanitize import scrub_value
from semlab.tracking.store import (
    TrackingTarget,
    TrackingUnavailableWarning,
    fallback_store,
    redact_uri,
    resolve_tracking,
)
from semlab.train.reporting import Reporter
from semlab.utils.distributed import launcher_rank

logger = logging.getLogger(__name__)


def semlab_version() -> str:
    """The installed semlab version (``importlib.metadata``), or ``semlab.__version__``, or 'unknown'."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("semlab")
    except (ImportError, PackageNotFoundError):
        import semlab

        return str(getattr(semlab, "__version__", "unknown"))


def run_tags(
    cfg: Any, recipe: str | None = None, output_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The tags that identify a pretraining at a glance (arch, L, V, tau, recipe, version, commit)."""
    student = cfg.student
    tags: dict[str, Any] = {
        "arch": student.arch,
        "L": student.L,
        "V": student.V,
        "tau": student.temp,
        "recipe": recipe or "",
        "semlab.version": semlab_version(),
    }
    if output_dir is not None:
        tags["semlab.output_dir"] = str(Path(output_dir).resolve())
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    user_tags = cfg.mlflow.get("tags") if "tags" in cfg.mlflow else None
    if user_tags:
        tags.update({str(k): v for k, v in dict(user_tags).items()})
    return {k: v for k, v in tags.items() if v != ""}


class MLflowReporter(Reporter):
    """Reporter that logs a pretraining in ``output_dir`` to MLflow (see the module docstring).

    ``cfg.mlflow.enabled = false`` or a rank other than 0 makes every hook a no-op
    (``self.active`` is False). Metrics are flushed every ``flush_every_s`` seconds or
    ``flush_every_n`` values, and at checkpoints and at the end.
    """

    def __init__(
        self,
        cfg: Any,
        output_dir: str | os.PathLike,
        *,
        recipe: str | None = None,
        run_name: str | None = None,
        resume: bool = True,
        rank: int | None = None,
        flush_every_s: float = 10.0,
        flush_every_n: int = 500,
        check_timeout_s: float = 5.0,
    ) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.flush_every_s = float(flush_every_s)
        self.flush_every_n = int(flush_every_n)
        self.rank = launcher_rank() if rank is None else int(rank)
        self.active = bool(cfg.mlflow.enabled) and self.rank == 0
        self.run: RunLogger | None = None
        self.target: TrackingTarget | None = None
        self.resumed = False
        self.closed = False
        self.eval_checkpoints: dict[int, str] = {}
        self._logged_through = -1  # a resumed run already holds training metrics up to this step
        self.teacher_models: Any = None  # TeacherModelUploader, made at the first eval checkpoint
        self._last_metrics: tuple[int, dict[str, float]] = (-1, {})
        self.system_metrics: Any = None
        self._last_flush = time.monotonic()
        if not self.active:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.target = resolve_tracking(cfg, self.output_dir, timeout=check_timeout_s)
        name = run_name or cfg.mlflow.run_name or self.output_dir.resolve().name
        tags = run_tags(cfg, recipe, self.output_dir)
        from semlab.config import config_to_flat_dict

        params = config_to_flat_dict(cfg)
        try:
            self.run, self.resumed = RunLogger.open(
                self.target, cfg.mlflow.experiment_name, self.output_dir, name, tags, resume, params
            )
        except Exception as exc:  # answered /health but failed to create the run: still never stop training
            if self.target.is_fallback:
                raise
            uri, artifacts = fallback_store(self.output_dir)
            message = scrub_value(f"MLflow store {redact_uri(self.target.uri)} failed to start the run "
                                  f"({exc!r}); logging locally to {uri} (copy later with `semlab sync`)")
            warnings.warn(message, TrackingUnavailableWarning, stacklevel=2)
            logger.warning(message)
            self.target = TrackingTarget(uri=uri, artifact_location=artifacts, source="fallback",
                                         intended_uri=self.target.uri, reason=repr(exc))
            self.run, self.resumed = RunLogger.open(
                self.target, cfg.mlflow.experiment_name, self.output_dir, name, tags, resume, params
            )
        self._logged_through = self.run.last_logged_step(_STEP_METRIC) if self.resumed else -1
        self._log_config()
        from semlab.tracking.dataset_inputs import log_dataset_inputs

        log_dataset_inputs(self.run.client, self.run.run_id, cfg)
        if bool(cfg.mlflow.get("system_metrics", True)):
            from semlab.tracking.system_metrics import SystemMetrics

            self.system_metrics = SystemMetrics()
        atexit.register(self._at_exit)

    # ------------------------------------------------------------------ properties
    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

    @property
    def tracking_uri(self) -> str | None:
        return self.target.uri if self.target is not None else None

    # ------------------------------------------------------------------ Reporter hooks
    def on_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        if self.run is None:
            return
        if iteration <= self._logged_through and not self.closed:
            return  # logged before a crash, recomputed identically after the resume: keep one value
        values = {k: v for k, v in metrics.items() if k not in _NOT_METRICS}
        self._last_metrics = (int(iteration), {k: v for k, v in values.items() if _is_number(v)})
        if self.system_metrics is not None and not self.closed:
            values.update(self.system_metrics.sample())
        self.run.add_metrics(iteration, values)
        if self.closed:  # e.g. the final k-NN, reported after on_end: send now, keep what fails
            self.flush()
            self.run.dump_unsent()
            return
        due = time.monotonic() - self._last_flush >= self.flush_every_s
        if due or self.run.pending >= self.flush_every_n:
            self.flush()

    def on_training_evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        """The in-training evaluation (``accuracy/knn_top1``...) at ``iteration``, sent at once: a sweep's
        scheduler may stop the trial right after it, before the next periodic flush."""
        if self.run is None or not metrics:
            return
        self.on_metrics(iteration, metrics)
        self.flush()

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        if self.run is None:
            return
        self.flush()
        self.run.set_tags({
            LAST_CHECKPOINT_TAG: Path(path).resolve().as_uri(),
            "semlab.last_checkpoint_iteration": int(iteration),
        })

    def on_eval_checkpoint(self, iteration: int, path: Path) -> None:
        """Copy the teacher checkpoint into the run's artifacts, or record its URI when it is large
        (``mlflow.log_checkpoints: uri``, or bigger than ``mlflow.max_artifact_mb``)."""
        if self.run is None:
            return
        self.flush()
        path = Path(path)
        key = f"training_{int(iteration)}"
        mode = str(self.cfg.mlflow.log_checkpoints)
        if mode not in ("model", "artifact", "uri"):
            raise ValueError(f"mlflow.log_checkpoints must be 'model', 'artifact' or 'uri', got {mode!r}")
        if mode == "model":
            self._log_teacher_model(path, int(iteration), key)
            return
        size_mb = path.stat().st_size / 2**20 if path.is_file() else float("inf")
        uri = path.resolve().as_uri()
        if mode == "artifact" and size_mb <= float(self.cfg.mlflow.max_artifact_mb):
            artifact_dir = f"checkpoints/eval/{key}"
            if self.run.log_artifact(path, artifact_path=artifact_dir):
                uri = f"runs:/{self.run.run_id}/{artifact_dir}/{path.name}"
        elif mode == "artifact":
            logger.info("teacher checkpoint %s is %.0f MB > mlflow.max_artifact_mb: recording its URI",
                        path, size_mb)
        self.eval_checkpoints[int(iteration)] = uri
        self.run.set_tags({
            f"semlab.teacher_checkpoint.{key}": uri,
            "semlab.teacher_checkpoint.latest": uri,
        })

    def _log_teacher_model(self, path: Path, iteration: int, key: str) -> None:
        from semlab.tracking.teacher_models import TeacherModelUploader

        assert self.run is not None
        try:
            if self.teacher_models is None:
                self.teacher_models = TeacherModelUploader(self.run.client, self.run.experiment_id,
                                                           self.run.run_id)
            it, metrics = self._last_metrics
            model = self.teacher_models.submit(path, iteration, metrics if it == iteration else {})
        except Exception as exc:  # the store is out of our hands: never crash training
            logger.warning("could not record the teacher checkpoint %s in MLflow: %r", path, exc)
            return
        uri = f"models:/{model.model_id}"
        self.eval_checkpoints[iteration] = uri
        self.run.set_tags({
            f"semlab.teacher_checkpoint.{key}": uri,
            "semlab.teacher_checkpoint.latest": uri,
            f"semlab.teacher_checkpoint_file.{key}": f"{model.artifact_location}/{path.name}",
        })

    def on_end(self, summary: dict[str, Any]) -> None:
        """Flush, record the summary (numbers as ``final/<key>`` metrics, the rest as tags), finish."""
        if self.run is None or self.closed:
            return
        step = int(summary.get("iteration", summary.get("final_iteration", 0)) or 0)
        flat: dict[str, Any] = {}
        for k, v in summary.items():  # one level of nesting: {"losses": {"total": ...}} -> losses.total
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        summary = flat
        numbers = {f"final/{k}": v for k, v in summary.items() if _is_number(v)}
        others = {f"semlab.summary.{k}": v for k, v in summary.items()
                  if not _is_number(v) and isinstance(v, str | Path | int | float)}
        self.run.add_metrics(step, numbers)
        if others:
            self.run.set_tags(others)
        self.close("FINISHED")

    # ------------------------------------------------------------------ evaluation + lifecycle
    def log_evaluation(
        self,
        kind: str,
        metrics: dict[str, Any],
        step: int = 0,
        params: dict[str, Any] | None = None,
        artifacts: tuple[str | os.PathLike, ...] | list[str | os.PathLike] = (),
    ) -> str | None:
        """Record an evaluation (``kind`` = 'knn', 'linear', 'linear_sem'...) as a nested run linked
        to this pretraining and copy its metrics onto the pretraining run. Returns the child run id."""
        if self.run is None:
            return None
        tags = {k: v for k, v in run_tags(self.cfg).items() if k in ("arch", "L", "V", "tau")}
        child = self.run.log_evaluation(kind, metrics, step=step, params=params, tags=tags,
                                        artifacts=artifacts)
        if self.closed:
            self.run.dump_unsent()
        return child

    def flush(self) -> bool:
        self._last_flush = time.monotonic()
        return self.run.flush() if self.run is not None else True

    def close(self, status: str = "FINISHED") -> None:
        """Flush (unsent metrics go to ``mlflow_unsent.jsonl``) and mark the run ``status``."""
        if self.run is None or self.closed:
            return
        if self.teacher_models is not None:
            self.teacher_models.wait()  # the uploads of teacher checkpoints still running
        self.flush()
        self.run.dump_unsent()
        self.run.terminate(status)
        self.closed = True
        atexit.unregister(self._at_exit)

    def __enter__(self) -> MLflowReporter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")

    def _at_exit(self) -> None:
        if self.run is not None and not self.closed:
            self.flush()
            self.run.dump_unsent()

    def _log_config(self) -> None:
        from semlab.config import config_to_flat_dict, config_yaml
        from semlab.utils.atomic import atomic_write_text

        assert self.run is not None
        changed = self.run.log_params(config_to_flat_dict(self.cfg))
        if changed:
            logger.warning(
                "resumed MLflow run %s keeps its first values of params %s (MLflow params are immutable)",
                self.run.run_id, ", ".join(changed[:10]),
            )
            self.run.set_tags({"semlab.changed_params_on_resume": ",".join(changed)})
        with tempfile.TemporaryDirectory(prefix="semlab_mlflow_") as tmp:
            text = config_yaml(self.cfg)  # credential-named keys and URI secrets redacted
            self.run.log_artifact(atomic_write_text(Path(tmp) / "config.yaml", text))


_NOT_METRICS = frozenset({"iteration", "step"})
_STEP_METRIC = "lr"  # in every training metrics line (losses vary by config, the schedule does not)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
