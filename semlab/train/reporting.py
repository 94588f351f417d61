"""Reporter protocol: how the training loop tells the outside world what happened.

The loop knows nothing of MLflow or Ray; it calls a ``Reporter``. Subclass it and override
what you need (all hooks are no-ops here). ``CompositeReporter`` fans out to several.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class Reporter:
    """No-op base reporter; ``do_train`` calls the hooks on rank 0 only, or on every rank when the
    reporter sets ``all_ranks = True`` (e.g. a Ray Train reporter whose report is collective)."""

    all_ranks: bool = False

    def on_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        """Called every ``train.log_period_iterations`` iterations (and at the last one)."""

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        """Called after a full (resumable) checkpoint was written atomically at ``path``."""

    def on_eval_checkpoint(self, iteration: int, path: Path) -> None:
        """Called after a teacher eval checkpoint (``eval/training_<it>/teacher_checkpoint.pth``)."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """Called once when training ends normally (``summary``: final iteration, losses, paths...)."""


class CompositeReporter(Reporter):
    """Forwards every hook to each reporter in order."""

    def __init__(self, reporters: Iterable[Reporter | None]) -> None:
        self.reporters = [r for r in reporters if r is not None]

    def on_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        for r in self.reporters:
            r.on_metrics(iteration, metrics)

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        for r in self.reporters:
            r.on_checkpoint(iteration, path)

    def on_eval_checkpoint(self, iteration: int, path: Path) -> None:
        for r in self.reporters:
            r.on_eval_checkpoint(iteration, path)

    def on_end(self, summary: dict[str, Any]) -> None:
        for r in self.reporters:
            r.on_end(summary)


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
