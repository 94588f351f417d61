"""The progress line rank 0 logs every log period, readable in ``ray job logs --follow``.

One line per ``train.log_period_iterations``, through :mod:`logging` (logger ``semlab.progress``)
so that it shows wherever the process's log goes (a terminal, Ray's worker logs, the Ray dashboard),
whether or not a TTY is attached (tqdm's bar only draws on a TTY)::

    it 120/125000 (0.1%) | 512.3 img/s | loss 9.8120 (dino_local_crops_loss 5.1 ...) | lr 1.20e-05 |
    data 0.31 s (3%) | eta 1d 10:33:05
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger("semlab.progress")

_NOT_LOSSES = {"iteration", "total", "grad_norm", "images_per_s", "data_time_s", "window_time_s",
               "window_iterations", "eta_s", "lr", "wd", "mom", "teacher_temp", "last_layer_lr"}


def eta_seconds(iteration: int, max_iter: int, window_time_s: float, window_iterations: int) -> float:
    """Seconds left after ``iteration`` at the speed of the last window."""
    if window_iterations <= 0:
        return float("nan")
    return max(max_iter - 1 - iteration, 0) * window_time_s / window_iterations


def format_duration(seconds: float) -> str:
    """``1d 10:33:05`` / ``0:04:12`` (``?`` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def progress_line(record: dict[str, Any], max_iter: int) -> str:
    """The one-line summary of a metrics record of ``ThroughputWindow.record``."""
    it = int(record["iteration"])
    parts = [k for k in sorted(record) if k not in _NOT_LOSSES and isinstance(record[k], int | float)]
    losses = " ".join(f"{k.removesuffix('_loss')} {record[k]:.4f}" for k in parts)
    data_share = record["data_time_s"] / max(record["window_time_s"], 1e-9)
    return (
        f"it {it + 1}/{max_iter} ({100.0 * (it + 1) / max_iter:.1f}%) | "
        f"{record['images_per_s']:.1f} img/s | loss {record['total']:.4f} ({losses}) | "
        f"lr {record['lr']:.3g} | data wait {record['data_time_s']:.2f} s ({100.0 * data_share:.0f}%) | "
        f"eta {format_duration(record.get('eta_s', float('nan')))}"
    )


def log_progress(record: dict[str, Any], max_iter: int) -> None:
    """Log :func:`progress_line` at INFO on ``semlab.progress``."""
    logger.info("%s", progress_line(record, max_iter))
