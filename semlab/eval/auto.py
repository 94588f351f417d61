"""Automatic evaluation of a pretraining's teacher: k-NN and linear probes, reported to a Reporter.

``evaluate_after_pretraining(cfg, output_dir, teacher_checkpoint, reporter)``:

- k-NN (``semlab.eval.knn``, weighted, T = ``knn.temperature``) on
  ``evaluation.knn_dataset_train`` / ``_val`` when both are set: metrics ``knn_top1_k<k>`` and
  ``knn_top5_k<k>`` on the CLS output, and ``knn_sem_top1_k<k>`` on the raw SEM output for SEM models;
- the linear probe (``semlab.eval.linear``) when ``evaluation.linear_after_train``: metrics
  ``linear_top1``, ``linear_top5``, ``linear_holdout_top1``, and for SEM models (with
  ``linear.sem_after_train``) the SEM probe: ``linear_sem_top1``, ``linear_sem_top5``...

Results go to ``<output_dir>/eval/training_<it>/{knn.json, linear/, linear_sem/}``. Each
evaluation goes to ``reporter.log_evaluation``: ``semlab.tracking.MLflowReporter`` records it as a
run linked to the pretraining run; the base Reporter hands the metrics to ``on_metrics``.
This module knows nothing of MLflow.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from semlab.train.reporting import Reporter
from semlab.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)


def iteration_of(checkpoint: str | Path) -> int | None:
    """The iteration in ``.../training_<it>/teacher_checkpoint.pth`` (None when the path has none)."""
    for part in reversed(Path(checkpoint).parts):
        match = re.fullmatch(r"training_(\d+)", part)
        if match:
            return int(match.group(1))
    return None


def run_knn(cfg: Any, backbone: Any, out_dir: Path, sem: bool) -> dict[str, float]:
    """k-NN metrics of the CLS output (and of the raw SEM output when ``sem``); writes ``knn.json``."""
    from semlab.eval.knn_report import knn_accuracy

    metrics: dict[str, float] = {}
    raw: dict[str, Any] = {}
    for kind, prefix in (("cls", "knn"), ("sem", "knn_sem")):
        if kind == "sem" and not sem:
            continue
        res = knn_accuracy(cfg, backbone, kind)
        raw[kind] = {str(k): v for k, v in res.items()}
        for k, acc in res.items():
            metrics[f"{prefix}_top1_k{k}"] = acc["top1"]
            metrics[f"{prefix}_top5_k{k}"] = acc["top5"]
    atomic_write_text(out_dir / "knn.json", json.dumps(raw, indent=2) + "\n")
    return metrics


def evaluate_after_pretraining(
    cfg: Any,
    output_dir: str | Path,
    teacher_checkpoint: str | Path,
    reporter: Reporter | None = None,
    iteration: int | None = None,
    progress: bool = False,
    knn: bool = True,
) -> dict[str, float]:
    """Evaluate ``teacher_checkpoint`` as configured (see the module docstring); returns all metrics.

    ``iteration`` (default: read from the checkpoint path) is the step the metrics are logged at.
    ``knn=False`` skips the k-NN (e.g. when ``run_pretraining`` already ran it) but not the probes.
    """
    from semlab.eval.linear import build_eval_backbone, default_device, run_linear_probe

    reporter = reporter if reporter is not None else Reporter()
    ckpt = Path(teacher_checkpoint)
    step = iteration if iteration is not None else (iteration_of(ckpt) or 0)
    eval_dir = ckpt.parent if ckpt.parent.name.startswith("training_") else Path(output_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    backbone = build_eval_backbone(cfg, ckpt).to(default_device())
    sem = bool(getattr(backbone, "has_sem", False))
    all_metrics: dict[str, float] = {}
    params = {"teacher_checkpoint": str(ckpt.resolve()), "iteration": step,
              "sem_temp": float(cfg.evaluation.sem_temp)}

    train_ds, val_ds = cfg.evaluation.knn_dataset_train, cfg.evaluation.knn_dataset_val
    if not (train_ds and val_ds):
        logger.info("no evaluation.knn_dataset_train/_val: skipping the automatic k-NN and probes")
        return all_metrics
    if knn:
        metrics = run_knn(cfg, backbone, eval_dir, sem)
        knn_params = {**params, "train_dataset": train_ds, "val_dataset": val_ds,
                      "nb_knn": str(list(cfg.knn.nb_knn)), "temperature": float(cfg.knn.temperature)}
        reporter.log_evaluation("knn", metrics, step=step, params=knn_params,
                                artifacts=[eval_dir / "knn.json"])
        all_metrics.update(metrics)
        logger.info("k-NN after pretraining: %s", {k: round(v, 2) for k, v in metrics.items()})

    if bool(cfg.evaluation.linear_after_train):
        protocols = [False] + ([True] if sem and bool(cfg.linear.get("sem_after_train", True)) else [])
        for use_sem in protocols:
            kind = "linear_sem" if use_sem else "linear"
            out = eval_dir / kind
            res = run_linear_probe(backbone, cfg, train_ds, val_ds, out, use_sem=use_sem, progress=progress)
            metrics = {f"{kind}_top1": res["val_top1"], f"{kind}_top5": res["val_top5"],
                       f"{kind}_holdout_top1": res["holdout_top1"],
                       f"{kind}_images_per_s": res["images_per_s"]}
            lin_params = {
                **params, "train_dataset": train_ds, "val_dataset": val_ds,
                "best_classifier": res["best_classifier"], "iterations": res["iterations"],
                "selection": res["selection"], "selection_protocol": res["selection_protocol"],
                "batch_size": res["batch_size"], "learning_rates": str(list(cfg.linear.learning_rates)),
            }
            reporter.log_evaluation(kind, metrics, step=step, params=lin_params,
                                    artifacts=[out / "results_eval_linear.json"])
            all_metrics.update(metrics)
    atomic_write_text(eval_dir / "eval_results.json", json.dumps(all_metrics, indent=2) + "\n")
    return all_metrics
