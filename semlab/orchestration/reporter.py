"""``RayTrainReporter``: the training loop's Reporter inside a Ray Train worker.

Ray Train V2 requires every worker to call ``ray.train.report`` the same number of times (the
call is a barrier). The loop therefore calls this reporter's checkpoint hooks on every rank
(``all_ranks = True``; ``on_metrics`` stays rank 0 only). At each full checkpoint:

- rank 0 reports the latest logged metrics with a ``ray.train.Checkpoint`` made from a temporary
  directory that hard-links the checkpoint file (``model_<it>.pth``, no copy on the same disk);
  Ray uploads it to ``<storage_path>/<run name>/checkpoint_<it>``;
- every other rank reports ``{"iteration": it}`` without a checkpoint.

Ray only attaches rank 0's metrics to a checkpoint, and ``Result.metrics`` only holds metrics
reported with a checkpoint, so per-iteration metrics go to the inner reporter (MLflow) and the
metrics log file; Ray sees them at checkpoint granularity.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semlab.train.reporting import Reporter

RAY_CHECKPOINT_PREFIX = "checkpoint_"
UPLOAD_PREFIX = ".ray-upload-"


def ray_checkpoint_name(iteration: int) -> str:
    """Directory name of the Ray checkpoint of iteration ``iteration`` in the run's storage."""
    return f"{RAY_CHECKPOINT_PREFIX}{int(iteration):07d}"


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The finite int/float entries of ``metrics`` (what Ray and Tune can compare)."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[key] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[key] = value
        elif hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            item = value.item()
            if isinstance(item, int | float) and math.isfinite(float(item)):
                out[key] = item
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


class RayTrainReporter(Reporter):
    """Reports checkpoints to Ray Train from every rank; forwards hooks to ``inner`` on rank 0."""

    all_ranks = True  # read by semlab.train.loop.do_train: call checkpoint/end hooks on every rank

    def __init__(self, rank: int, inner: Reporter | None = None, report_fn: Any = None) -> None:
        self.rank = int(rank)
        self.inner = inner if self.rank == 0 else None
        self.last_metrics: dict[str, float | int] = {}
        self.last_evaluation: dict[str, float | int] = {}  # the latest in-training evaluation (rank 0)
        self.reported: list[int] = []
        self._report = report_fn

    def _ray_report(self, metrics: dict[str, Any], checkpoint: Any = None, name: str | None = None) -> None:
        if self._report is not None:
            self._report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            return
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def on_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        self.last_metrics = scalar_metrics(metrics)
        if self.inner is not None:
            self.inner.on_metrics(iteration, metrics)

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        metrics = {**self.last_metrics, "iteration": int(iteration)}
        name = ray_checkpoint_name(iteration)
        if self.rank == 0:
            from ray.train import Checkpoint

            path = Path(path)
            with tempfile.TemporaryDirectory(prefix=UPLOAD_PREFIX, dir=path.parent) as tmp:
                _link_or_copy(path, Path(tmp) / path.name)
                self._ray_report(metrics, Checkpoint.from_directory(tmp), name)
            if self.inner is not None:
                self.inner.on_checkpoint(iteration, path)
        else:
            self._ray_report(metrics, None, name)
        self.reported.append(int(iteration))

    def on_eval_checkpoint(self, iteration: int, path: Path) -> None:
        if self.inner is not None:
            self.inner.on_eval_checkpoint(iteration, path)

    def on_training_evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        """All ranks report (Ray's report is collective), rank 0 with the in-training evaluation's
        metrics and ``iteration``, without a checkpoint: Tune and its schedulers (ASHA) see them at
        that iteration. The metrics also go to ``inner`` (MLflow)."""
        values = {**scalar_metrics(metrics), "iteration": int(iteration)} if self.rank == 0 else {}
        self.last_evaluation = {k: v for k, v in values.items() if k != "iteration"}
        self._ray_report(values, None, None)
        if self.inner is not None and metrics:
            self.inner.on_metrics(iteration, metrics)

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.on_end(summary)

    def log_evaluation(
        self,
        kind: str,
        metrics: dict[str, Any],
        step: int = 0,
        params: dict[str, Any] | None = None,
        artifacts: Sequence[str | os.PathLike] = (),
    ) -> str | None:
        """Forwarded to ``inner`` (Ray sees evaluations through :meth:`report_final`)."""
        if self.inner is None:
            return None
        return self.inner.log_evaluation(kind, metrics, step=step, params=params, artifacts=artifacts)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()

    def report_final(self, metrics: dict[str, Any]) -> None:
        """A last report without checkpoint (all ranks), e.g. the k-NN accuracy after training, with
        the latest in-training evaluation (so that a sweep's last result holds its metric too);
        Ray Tune sees it (``TuneReportCallback``)."""
        final = {**self.last_metrics, **self.last_evaluation, **scalar_metrics(metrics)}
        self._ray_report(final if self.rank == 0 else {}, None, None)
