"""Weighted k-NN of a teacher checkpoint:
``python experiments/knn.py --pretrained-weights eval/training_<it>/teacher_checkpoint.pth
--train-dataset ... --val-dataset ... [--config-file R] [--output-dir D] [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from semlab.config import ConfigError, load_config
from semlab.data import make_dataset
from semlab.eval.eval_datasets import resolve_eval_datasets
from semlab.eval.knn_report import knn_accuracy
from semlab.eval.linear import build_eval_backbone
from semlab.eval.sem_temp import resolve_eval_sem_temp
from semlab.utils.atomic import atomic_write_text
from semlab.utils.output_dirs import ensure_writable_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config-file", default="train/demo_tiny", help="recipe the checkpoint was trained with")
    p.add_argument(
        "--pretrained-weights", required=True, help="teacher checkpoint (.pth) or backbone weights"
    )
    p.add_argument("--train-dataset", default=None, help="default: evaluation.knn_dataset_train")
    p.add_argument("--val-dataset", default=None, help="default: evaluation.knn_dataset_val")
    p.add_argument("--feature", default="cls", choices=["cls", "sem", "avgpool"])
    p.add_argument("--sem-temp", type=float, default=None,
                   help="SEM temperature of every feature (default: the evaluation recipe's, 1e-5)")
    p.add_argument("--output-dir", default=None, help="writes knn.json there")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config_file, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (args.train_dataset and args.val_dataset):
        print(resolve_eval_datasets(cfg))
    train_ds = args.train_dataset or cfg.evaluation.knn_dataset_train
    val_ds = args.val_dataset or cfg.evaluation.knn_dataset_val
    if not train_ds or not val_ds:
        print(
            "error: give --train-dataset and --val-dataset (or set evaluation.knn_dataset_*)", file=sys.stderr
        )
        return 2
    try:
        if args.output_dir:
            ensure_writable_dir(args.output_dir)
        make_dataset(train_ds)  # both datasets are checked before any feature is extracted
        make_dataset(val_ds)
        tau_line = resolve_eval_sem_temp(cfg, args.sem_temp, args.overrides)
        backbone = build_eval_backbone(cfg, args.pretrained_weights)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(backbone, "has_sem", False):
        print(tau_line)
    backbone.to("cuda" if torch.cuda.is_available() else "cpu")
    res = knn_accuracy(cfg, backbone, args.feature, train_dataset=train_ds, val_dataset=val_ds)
    for k, acc in res.items():
        print(f"k={k}: top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}%")
    if args.output_dir:
        out = Path(args.output_dir) / "knn.json"
        payload = {str(k): v for k, v in res.items()}
        payload["sem_temp"] = float(cfg.evaluation.sem_temp)
        atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
