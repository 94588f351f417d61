"""Single-process pretraining: build the model and the data stream, train, then evaluate by k-NN.

``run_pretraining`` is what ``experiments/pretrain.py`` calls for one process (the 2-core demo or a
single GPU). The final k-NN (``evaluation.knn_dataset_train`` / ``_val``) compares three
feature extractors on the same held-out split, so that a run shows whether it learned anything:

- the trained teacher (``x_norm_clstoken``, i.e. the SEM vector for SEM backbones; and the raw SEM
  simplex at ``evaluation.sem_temp`` as an extra line),
- the same architecture freshly initialised with the same seed (what training started from),
- raw pixels (the eval crop average-pooled to 16 x 16, L2-normalised).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from semlab.config import apply_scaling_rules, save_config
from semlab.eval.features import extract_features
from semlab.eval.knn import knn_classify
from semlab.train.loop import do_train
from semlab.train.meta_arch import SSLMetaArch
from semlab.train.reporting import Reporter
from semlab.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

KNN_RESULTS = "knn_results.json"
PIXEL_SIZE = 16


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def random_init_backbone(cfg: DictConfig) -> nn.Module:
    """The student backbone as ``SSLMetaArch`` initialises it after ``seed_everything(train.seed)``,
    without the pretrained weights; the global RNG state is left untouched."""
    from semlab.models import build_model_from_cfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.train.seed))
        student, _, _ = build_model_from_cfg(cfg)
    return student


def _primary_k(nb_knn: list[int]) -> int:
    return 20 if 20 in nb_knn else nb_knn[0]


def knn_report(
    cfg: DictConfig, teacher_backbone: nn.Module, output_dir: str | Path | None = None, baselines: bool = True
) -> dict[str, Any]:
    """k-NN of the teacher (CLS, and SEM raw if any) and, with ``baselines``, of a random-init
    backbone and of raw pixels; written to ``<output_dir>/knn_results.json`` when given.

    Returns ``{"k": primary k, "top1": {name: %}, "results": {name: {k: {"top1", "top5"}}}, ...}``.
    """
    train_ds, val_ds = str(cfg.evaluation.knn_dataset_train), str(cfg.evaluation.knn_dataset_val)
    if not train_ds or not val_ds:
        raise ValueError("set evaluation.knn_dataset_train and evaluation.knn_dataset_val to run the k-NN")
    nb_knn = [int(k) for k in cfg.knn.nb_knn]
    device = next(teacher_backbone.parameters()).device
    common = dict(
        batch_size=int(cfg.knn.batch_size),
        num_workers=0,
        resize_size=int(cfg.linear.resize_size),
        crop_size=int(cfg.linear.crop_size),
    )

    def run(model: nn.Module | None, kind: str, dev: torch.device) -> dict[int, dict[str, float]]:
        (xtr, ytr), (xva, yva) = (
            extract_features(
                model,
                ds,
                kind=kind,
                sem_temp=float(cfg.evaluation.sem_temp),
                device=dev,
                pixel_size=PIXEL_SIZE,
                **common,
            )
            for ds in (train_ds, val_ds)
        )
        return knn_classify(xtr, ytr, xva, yva, nb_knn=nb_knn, temperature=float(cfg.knn.temperature))

    results: dict[str, dict[int, dict[str, float]]] = {"teacher": run(teacher_backbone, "cls", device)}
    if getattr(teacher_backbone, "has_sem", False):
        results["teacher_sem_raw"] = run(teacher_backbone, "sem", device)
    if baselines:
        results["random_init"] = run(random_init_backbone(cfg).to(device), "cls", device)
        results["raw_pixels"] = run(None, "pixels", torch.device("cpu"))
    k = _primary_k(nb_knn)
    report = {
        "k": k,
        "top1": {name: res[k]["top1"] for name, res in results.items()},
        "results": {name: {str(kk): v for kk, v in res.items()} for name, res in results.items()},
        "nb_knn": nb_knn,
        "temperature": float(cfg.knn.temperature),
        "train_dataset": train_ds,
        "val_dataset": val_ds,
        "sem_temp": float(cfg.evaluation.sem_temp),
    }
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / KNN_RESULTS, json.dumps(report, indent=2) + "\n")
    return report


def format_knn_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines: SEM raw (if any) first, then teacher, random init, raw pixels."""
    k, top1 = report["k"], report["top1"]
    labels = {
        "teacher_sem_raw": f"trained teacher, SEM raw (tau={report.get('sem_temp')})",
        "teacher": "trained teacher",
        "random_init": "random-init backbone",
        "raw_pixels": "raw pixels",
    }
    return [
        f"k-NN top-1 (k={k}) {labels[name]}: {top1[name]:.2f}%"
        for name in ("teacher_sem_raw", "teacher", "random_init", "raw_pixels")
        if name in top1
    ]


def run_pretraining(
    cfg: DictConfig, output_dir: str | Path, resume: bool = True, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Train in this process (CUDA if available, else CPU) and run the final k-NN.

    Saves the resolved config to ``<output_dir>/config.yaml``; returns ``do_train``'s summary with
    ``knn`` (see ``knn_report``) when the k-NN datasets are set.
    """
    from semlab.data.loaders import make_local_data_iterator

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.output_dir = str(output_dir)
    apply_scaling_rules(cfg, 1)
    save_config(cfg, output_dir / "config.yaml")
    if int(cfg.train.num_threads) > 0:
        torch.set_num_threads(int(cfg.train.num_threads))
    seed_everything(int(cfg.train.seed))
    model = SSLMetaArch(cfg).to(default_device())

    def data(start_iter: int):
        return make_local_data_iterator(cfg, rank=0, world_size=1, start_iter=start_iter)

    summary = do_train(cfg, model, data, output_dir, reporter=reporter, resume=resume)
    if cfg.evaluation.knn_dataset_train and cfg.evaluation.knn_dataset_val:
        report = knn_report(cfg, model.teacher.backbone, output_dir)
        summary["knn"] = report
        if reporter is not None:
            reporter.on_metrics(
                summary["iteration"], {f"knn_top1_{name}": v for name, v in report["top1"].items()}
            )
    return summary
