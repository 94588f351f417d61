"""Reporter protocol: how the training loop tells the outside world what happened.

The loop knows nothing of MLflow or Ray; it calls a ``Reporter``. Subclass it and override
what you need: every hook has a default here (a no-op, except ``log_evaluation``, which hands the
metrics to ``on_metrics``), so callers never need to ask what a reporter can do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Reporter:
    """No-op base reporter; ``do_train`` calls the hooks on rank 0 only, or on every rank when the
    reporter sets ``all_ranks = True`` (e.g. a Ray Train reporter whose report is collective)."""

    all_ranks: bool = False

    def on_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        """Called every ``train.log_period_iterations`` iterations (and at the last one); on every rank
        for an ``all_ranks`` reporter (the losses are already averaged over ranks)."""

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        """Called after a full (resumable) checkpoint was written atomically at ``path``."""

    def on_eval_checkpoint(self, iteration: int, path: Path) -> None:
        """Called after a teacher eval checkpoint (``eval/training_<it>/teacher_checkpoint.pth``)."""

    def on_training_evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        """Called at each ``evaluation.eval_period_iterations`` with the in-training evaluation's metrics
        (e.g. ``accuracy/knn_top1``; ``{}`` off rank 0); here they go to :meth:`on_metrics`."""
        if metrics:
            self.on_metrics(iteration, metrics)

    def on_end(self, summary: dict[str, Any]) -> None:
        """Called once when training ends normally (``summary``: final iteration, losses, paths...)."""

    def log_evaluation(
        self,
        kind: str,
        metrics: dict[str, Any],
        step: int = 0,
        params: dict[str, Any] | None = None,
        artifacts: Sequence[str | os.PathLike] = (),
    ) -> str | None:
        """An evaluation (``kind`` = 'knn', 'linear', 'linear_sem'...) of the run's teacher at ``step``;
        here its metrics go to :meth:`on_metrics`. Returns an id of the record, if the reporter keeps one."""
        self.on_metrics(step, metrics)
        return None

    def close(self) -> None:
        """Release what the reporter holds (flush, finish a run); safe to call more than once."""


class ListReporter(Reporter):
    """Records every call in memory (tests, notebooks)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.eval_checkpoints: list[tuple[int, Path]] = []
        self.summary: dict[str, Any] | None = None

    def on_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        self.metrics.append((iteration, dict(metrics)))

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        self.checkpoints.append((iteration, Path(path)))

    def on_eval_checkpoint(self, iteration: int, path: Path) -> None:
        self.eval_checkpoints.append((iteration, Path(path)))

    def on_end(self, summary: dict[str, Any]) -> None:
        self.summary = dict(summary)
