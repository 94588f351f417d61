"""``RayTrainReporter``: the training loop's Reporter inside a Ray Train worker.

Ray Train V2 requires every worker to call ``ray.train.report`` the same number of times (the
call is a barrier), so the loop calls this reporter's metrics and checkpoint hooks on every rank
(``all_ranks = True``):

- every log period, ``ray.train.report(metrics)`` without a checkpoint (rank 0's metrics; the
  other ranks report ``{"iteration": it}``): the Ray dashboard and ``Result.metrics_dataframe``
  follow the run live, not only at checkpoints;
- at each full checkpoint, every rank reports a ``ray.train.Checkpoint`` of a temporary folder
  that hard-links the files *it* wrote into the sharded checkpoint folder ``model_<it>/`` (its DCP
  shard; rank 0 also ``.metadata`` and ``trainer_state.pt``). Ray uploads every rank's folder into
  the same ``<storage_path>/<run name>/checkpoint_<it>``, asynchronously
  (``CheckpointUploadMode.ASYNC``: training goes on while the upload runs), deletes the temporary
  folder after the upload, and registers the checkpoint once all ranks' uploads are done.

Ray's storage is the one source of truth for checkpoints, with the one retention setting
``ray.num_to_keep``; the worker keeps only the newest local folder, as a cache.
"""

from __future__ import annotations

import math
import os
import shutil
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


def upload_folder(checkpoint: Path, iteration: int, rank: int) -> Path:
    """A fresh folder next to ``checkpoint`` holding hard links to the files ``rank`` wrote there."""
    from semlab.train.checkpointing import rank_files

    files = rank_files(checkpoint, rank)
    if not files:
        raise FileNotFoundError(f"rank {rank} wrote no files into the checkpoint folder {checkpoint}")
    folder = checkpoint.parent / f"{UPLOAD_PREFIX}{int(iteration):07d}-rank{int(rank)}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for src in files:
        _link_or_copy(src, folder / src.name)
    return folder


class RayTrainReporter(Reporter):
    """Reports checkpoints to Ray Train from every rank; forwards hooks to ``inner`` on rank 0."""

    all_ranks = True  # read by semlab.train.loop.do_train: call checkpoint/end hooks on every rank

    def __init__(
        self, rank: int, inner: Reporter | None = None, report_fn: Any = None, upload_async: bool = True
    ) -> None:
        self.rank = int(rank)
        self.inner = inner if self.rank == 0 else None
        self.last_metrics: dict[str, float | int] = {}
        self.last_evaluation: dict[str, float | int] = {}  # the latest in-training evaluation (rank 0)
        self.reported: list[int] = []
        self.upload_async = bool(upload_async)
        self._report = report_fn

    def _ray_report(self, metrics: dict[str, Any], checkpoint: Any = None, name: str | None = None) -> None:
        if self._report is not None:
            self._report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            return
        import ray.train

        kwargs: dict[str, Any] = {}
        if checkpoint is not None:
            mode = ray.train.CheckpointUploadMode
            kwargs = {
                "checkpoint_upload_mode": mode.ASYNC if self.upload_async else mode.SYNC,
                "delete_local_checkpoint_after_upload": True,  # only the hard-link folder
            }
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, **kwargs)

    def on_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        """Every rank: one ``ray.train.report`` without a checkpoint (rank 0's metrics)."""
        self.last_metrics = scalar_metrics(metrics)
        if self.inner is not None:
            self.inner.on_metrics(iteration, metrics)
        payload = {**self.last_metrics, "iteration": int(iteration)} if self.rank == 0 else {}
        self._ray_report({**payload, "iteration": int(iteration)})

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        """Every rank: report the files it wrote into the checkpoint folder ``path``."""
        from ray.train import Checkpoint

        metrics = {**self.last_metrics, "iteration": int(iteration)} if self.rank == 0 else {
            "iteration": int(iteration)
        }
        folder = upload_folder(Path(path), iteration, self.rank)
        self._ray_report(metrics, Checkpoint.from_directory(str(folder)), ray_checkpoint_name(iteration))
        if self.inner is not None:
            self.inner.on_checkpoint(iteration, Path(path))
        self.reported.append(int(iteration))

    def on_eval_checkpoint(self, iteration: int, path: Path) -> None:
        if self.inner is not None:
            self.inner.on_eval_checkpoint(iteration, path)

    def on_training_evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        """All ranks report (Ray's report is collective), rank 0 with the in-training evaluation's
        metrics and ``iteration``, without a checkpoint: Tune and its schedulers (ASHA) see them at
        that iteration. The metrics go to ``inner`` (MLflow, which sends them at once) *before* the
        Ray report: a scheduler may stop the trial on that report, and its MLflow run must then
        still hold the value it was stopped on."""
        values = {**scalar_metrics(metrics), "iteration": int(iteration)} if self.rank == 0 else {}
        self.last_evaluation = {k: v for k, v in values.items() if k != "iteration"}
        if self.inner is not None and metrics:
            self.inner.on_training_evaluation(iteration, metrics)
        self._ray_report(values, None, None)

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
