"""Linear probe with augmentation of a teacher checkpoint (the DINOv2 protocol), as in the seed:

    python experiments/linear.py --config-file eval/vitl14_L512 \
        --pretrained-weights <OUT>/eval/training_24999/teacher_checkpoint.pth \
        --output-dir <OUT>/eval/training_24999/linear \
        --train-dataset ImageNet:split=TRAIN:root=<DATA>:extra=<DATA> \
        --val-dataset ImageNet:split=VAL:root=<DATA>:extra=<DATA> [key=value ...]

``--use-sem`` probes the raw L*V SEM output (at ``evaluation.sem_temp``) instead of CLS tokens.
Writes ``results_eval_linear.json`` and ``best_linear_classifier.pth`` in ``--output-dir``; when
the checkpoint belongs to a pretraining logged to MLflow (``mlflow_run.json`` above it), the
result is also recorded as a run linked to it (``--mlflow off`` to skip).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from semlab.config import ConfigError, load_config
from semlab.data import make_dataset
from semlab.eval.eval_datasets import resolve_eval_datasets
from semlab.eval.linear import build_eval_backbone, resolve_recipe, run_linear_probe
from semlab.eval.sem_temp import resolve_eval_sem_temp
from semlab.utils.output_dirs import ensure_writable_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="eval/vitl14_L512", help="eval recipe name or YAML path")
    p.add_argument("--pretrained-weights", default="", help="teacher_checkpoint.pth (or backbone weights)")
    p.add_argument("--output-dir", required=True, help="where results and the best classifier go")
    p.add_argument("--train-dataset", default=None, help="default: evaluation.knn_dataset_train")
    p.add_argument("--val-dataset", default=None, help="default: evaluation.knn_dataset_val")
    p.add_argument("--use-sem", action="store_true", help="probe the raw SEM simplex output")
    p.add_argument("--sem-temp", type=float, default=None,
                   help="SEM temperature of every feature (default: the evaluation recipe's, 1e-5)")
    p.add_argument("--epochs", type=int, default=None, help="linear.epochs")
    p.add_argument("--epoch-length", type=int, default=None, help="linear.epoch_length")
    p.add_argument("--batch-size", type=int, default=None, help="linear.batch_size")
    p.add_argument("--num-workers", type=int, default=None, help="linear.num_workers")
    p.add_argument("--learning-rates", type=float, nargs="+", default=None, help="linear.learning_rates")
    p.add_argument("--val-fraction", type=float, default=None, help="linear.val_fraction")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mlflow", choices=["auto", "off"], default="auto",
                   help="auto: link the result to the pretraining's MLflow run when one is recorded")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. linear.epochs=2")
    return p.parse_args(argv)


def overrides_from_flags(args: argparse.Namespace) -> list[str]:
    flags = {
        "epochs": "linear.epochs", "epoch_length": "linear.epoch_length", "batch_size": "linear.batch_size",
        "num_workers": "linear.num_workers", "val_fraction": "linear.val_fraction",
    }
    out = [f"{key}={getattr(args, attr)}" for attr, key in flags.items() if getattr(args, attr) is not None]
    if args.learning_rates:
        out.append(f"linear.learning_rates=[{','.join(repr(lr) for lr in args.learning_rates)}]")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(resolve_recipe(args.config_file), overrides_from_flags(args) + list(args.overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (args.train_dataset and args.val_dataset):
        print(resolve_eval_datasets(cfg))
    train_ds = args.train_dataset or cfg.evaluation.knn_dataset_train
    val_ds = args.val_dataset or cfg.evaluation.knn_dataset_val
    if not train_ds or not val_ds:
        print("error: give --train-dataset and --val-dataset (or set evaluation.knn_dataset_train/_val)",
              file=sys.stderr)
        return 2

    try:
        ensure_writable_dir(args.output_dir)  # inputs and outputs checked before any compute
        make_dataset(train_ds)
        make_dataset(val_ds)
        tau_line = resolve_eval_sem_temp(cfg, args.sem_temp, args.overrides)
        backbone = build_eval_backbone(cfg, args.pretrained_weights or None)
        if getattr(backbone, "has_sem", False):
            print(tau_line)
        results = run_linear_probe(backbone, cfg, train_ds, val_ds, args.output_dir, use_sem=args.use_sem,
                                   device=args.device, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = "linear_sem" if args.use_sem else "linear"
    print(f"{kind} [{results['selection_protocol']}]: best classifier {results['best_classifier']}: "
          f"val top-1 {results['val_top1']:.2f}%  top-5 {results['val_top5']:.2f}%  "
          f"({results['images_per_s']:.1f} images/s)")
    if args.mlflow == "auto" and args.pretrained_weights:
        log_to_pretraining_run(cfg, args, kind, results)
    return 0


def log_to_pretraining_run(cfg, args: argparse.Namespace, kind: str, results: dict) -> None:
    from semlab.eval.auto import iteration_of
    from semlab.tracking.runs import attach_to_run

    run = attach_to_run(args.pretrained_weights, cfg)
    if run is None:
        return
    step = iteration_of(args.pretrained_weights) or 0
    metrics = {f"{kind}_top1": results["val_top1"], f"{kind}_top5": results["val_top5"],
               f"{kind}_holdout_top1": results["holdout_top1"]}
    params = {"teacher_checkpoint": str(Path(args.pretrained_weights).resolve()),
              "train_dataset": args.train_dataset or "", "val_dataset": args.val_dataset or "",
              "best_classifier": results["best_classifier"], "iterations": results["iterations"],
              "config_file": args.config_file, "selection": results["selection"],
              "selection_protocol": results["selection_protocol"], "sem_temp": float(cfg.evaluation.sem_temp)}
    child = run.log_evaluation(kind, metrics, step=step, params=params,
                               artifacts=[Path(args.output_dir) / "results_eval_linear.json"])
    if child:
        print(f"logged to MLflow run {child} (linked to pretraining run {run.run_id})")


if __name__ == "__main__":
    sys.exit(main())
