"""A sweep's results on disk: the CSV of its trials and a PNG of accuracy against each swept key and
of the in-training k-NN curves over iterations, early stops marked.

``write_sweep_results(results, metric, mode, sweep_dir, name, keys)`` -> (rows best first, csv path,
png path). Both files are written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from semlab.utils.atomic import atomic_path, atomic_write_text

MARKERS = {"finished": ("o", "tab:green"), "early-stopped": ("x", "tab:red"), "failed": ("s", "tab:gray")}


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text (columns: the union of the rows' keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def trial_curves(results: Any, rows: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """``{trial name: [(iteration, metric)...]}`` from each trial's reports (Tune's progress)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for result, row in zip(results, rows, strict=True):
        frame = result.metrics_dataframe
        if frame is None or metric not in frame or "iteration" not in frame:
            curves[row["trial"]] = []
            continue
        known = frame[["iteration", metric]].dropna()
        curves[row["trial"]] = [(int(i), float(v)) for i, v in zip(known["iteration"], known[metric])]
    return curves


def plot_sweep(
    rows: list[dict[str, Any]],
    curves: dict[str, list[tuple[int, float]]],
    metric: str,
    keys: list[str],
    path: Path,
) -> None:
    """One panel per swept key (the metric against its values) and one of the curves over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.2 * (len(keys) + 1), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        for reason, (marker, color) in MARKERS.items():
            pts = [(r[key], r[metric]) for r in rows if r["stop_reason"] == reason and r[metric] is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=reason)
        if str(key).endswith(("temp", "lr")) and all(isinstance(r[key], float) and r[key] > 0 for r in rows):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    reasons = {r["trial"]: r["stop_reason"] for r in rows}
    for trial, points in curves.items():
        if not points:
            continue
        its, values = zip(*points)
        (line,) = ax.plot(its, values, marker=".", label=trial)
        if reasons.get(trial) == "early-stopped":
            ax.scatter([its[-1]], [values[-1]], marker="x", s=80, color="tab:red", zorder=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title("in-training k-NN (x: stopped early)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_sweep_results(
    results: Any, metric: str, mode: str, sweep_dir: str | Path, name: str, keys: list[str]
) -> tuple[list[dict[str, Any]], Path, Path]:
    """Rows best first (:func:`semlab.orchestration.tune.summarize`), ``<sweep_dir>/<name>_trials.csv``
    and ``<sweep_dir>/<name>_results.png``."""
    from semlab.orchestration.tune import rank_rows, trial_rows

    in_order = trial_rows(results, metric)
    rows = rank_rows(in_order, metric, mode)
    sweep_dir = Path(sweep_dir)
    csv_path, png_path = sweep_dir / f"{name}_trials.csv", sweep_dir / f"{name}_results.png"
    atomic_write_text(csv_path, rows_csv(rows))
    plot_sweep(rows, trial_curves(results, in_order, metric), metric, keys, png_path)
    return rows, csv_path, png_path
