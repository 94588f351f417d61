"""Compare pretraining runs of an MLflow experiment in one chart (``semlab report``).

The chart (PNG, matplotlib Agg) has three panels:

1. probe accuracy against L (``student.L``), one line per tau (``student.temp``);
2. probe accuracy against tau (log scale), one line per L;
3. the loss curves (metric history of ``total`` by default) of every run.

Accuracy is the first metric present among ``linear_sem_top1``, ``linear_top1``,
``knn_top1_k20``, ``knn_top1_teacher`` (the k-NN a Ray run reports; or those given); each gets its own
marker so mixed runs stay readable.
Evaluation child runs (tag ``mlflow.parentRunId``) are not drawn: their metrics are already on
their pretraining run.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semlab.tracking.runs import PARENT_TAG
from semlab.tracking.store import redact_uri
from semlab.utils.atomic import atomic_path

DEFAULT_ACCURACY_METRICS = ("linear_sem_top1", "linear_top1", "knn_top1_k20", "knn_top1_teacher")
DEFAULT_LOSS_METRIC = "total"
MARKERS = ("o", "s", "^", "D", "v")


@dataclasses.dataclass
class RunPoint:
    """One pretraining run as the chart sees it."""

    run_id: str
    name: str
    L: float | None
    V: float | None
    tau: float | None
    metrics: dict[str, float]
    loss: list[tuple[int, float]] = dataclasses.field(default_factory=list)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def fetch_runs(
    tracking_uri: str, experiment_name: str, loss_metric: str = DEFAULT_LOSS_METRIC, max_results: int = 1000
) -> list[RunPoint]:
    """The experiment's pretraining runs (not their evaluation children), with the loss history."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(
            f"no MLflow experiment '{experiment_name}' in {redact_uri(tracking_uri)}; "
            f"experiments there: {names or 'none'}"
        )
    runs = client.search_runs(
        [exp.experiment_id], max_results=max_results, order_by=["attributes.start_time ASC"]
    )
    points = []
    for run in runs:
        if PARENT_TAG in run.data.tags:
            continue
        params = run.data.params
        history = []
        if loss_metric in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, loss_metric)
        points.append(RunPoint(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id[:8],
            L=_float(params.get("student.L")),
            V=_float(params.get("student.V")),
            tau=_float(params.get("student.temp")),
            metrics=dict(run.data.metrics),
            loss=sorted((m.step, m.value) for m in history),
        ))
    return points


def _accuracy(point: RunPoint, metrics: Sequence[str]) -> tuple[str, float] | None:
    for name in metrics:
        if name in point.metrics and _float(point.metrics[name]) is not None:
            return name, point.metrics[name]
    return None


def draw_comparison(
    points: Sequence[RunPoint],
    output: str | Path,
    accuracy_metrics: Sequence[str] = DEFAULT_ACCURACY_METRICS,
    loss_metric: str = DEFAULT_LOSS_METRIC,
    title: str = "",
) -> Path:
    """Draw the three panels (module docstring) for ``points`` and save the PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_t, ax_loss) = plt.subplots(1, 3, figsize=(16, 4.6))
    by_metric: dict[str, list[tuple[RunPoint, float]]] = defaultdict(list)
    for p in points:
        acc = _accuracy(p, accuracy_metrics)
        if acc is not None:
            by_metric[acc[0]].append((p, acc[1]))
    for m_i, (metric, items) in enumerate(sorted(by_metric.items())):
        marker = MARKERS[m_i % len(MARKERS)]
        for group_key, x_key, ax, label_fmt in (
            ("tau", "L", ax_l, "tau={:g}"),
            ("L", "tau", ax_t, "L={:g}"),
        ):
            groups: dict[float | None, list[tuple[float, float]]] = defaultdict(list)
            for p, acc in items:
                x = getattr(p, x_key)
                if x is not None:
                    groups[getattr(p, group_key)].append((x, acc))
            for g, xy in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0.0)):
                xy.sort()
                label = f"{metric}, " + (label_fmt.format(g) if g is not None else f"{group_key}=?")
                ax.plot([a for a, _ in xy], [b for _, b in xy], marker=marker, ls="-" if len(xy) > 1 else "",
                        label=label)
    for ax, xlabel in ((ax_l, "L (number of simplices)"), (ax_t, "tau (SEM softmax temperature)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no runs with accuracy metrics\n" + ", ".join(accuracy_metrics),
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax_l.set_xscale("log", base=2)
    ax_t.set_xscale("log")
    ax_l.set_title("probe accuracy vs L")
    ax_t.set_title("probe accuracy vs tau")
    drawn = 0
    for p in points:
        if p.loss:
            ax_loss.plot([s for s, _ in p.loss], [v for _, v in p.loss],
                         label=f"{p.name} (L={_g(p.L)}, tau={_g(p.tau)})")
            drawn += 1
    ax_loss.set_title(f"training loss ({loss_metric})")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel(loss_metric)
    ax_loss.grid(alpha=0.3)
    if drawn:
        ax_loss.legend(fontsize=7)
    else:
        ax_loss.text(0.5, 0.5, f"no '{loss_metric}' history", ha="center", va="center",
                     transform=ax_loss.transAxes)
    fig.suptitle(title or f"{len(points)} pretraining runs")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return output


def _g(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def report(
    tracking_uri: str,
    experiment_name: str,
    output: str | Path,
    accuracy_metrics: Sequence[str] = DEFAULT_ACCURACY_METRICS,
    loss_metric: str = DEFAULT_LOSS_METRIC,
) -> tuple[Path, list[RunPoint]]:
    """Fetch the runs of ``experiment_name`` and draw the comparison chart to ``output``."""
    points = fetch_runs(tracking_uri, experiment_name, loss_metric)
    if not points:
        raise ValueError(f"experiment '{experiment_name}' has no pretraining runs to compare")
    path = draw_comparison(points, output, accuracy_metrics, loss_metric,
                           title=f"semlab: experiment '{experiment_name}' ({len(points)} runs)")
    return path, points
