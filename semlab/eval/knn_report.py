"""The k-NN evaluation of a backbone, written once: features -> weighted k-NN -> accuracies.

- :func:`knn_accuracy`: one feature kind of one model on the configured (or given) train/val
  datasets; what ``experiments/knn.py``, ``semlab.eval.auto`` and the final report all call.
- :func:`knn_report`: the end-of-pretraining report comparing three feature extractors on the same
  held-out split, so that a run shows whether it learned anything:

  - the trained teacher (``x_norm_clstoken``, i.e. the SEM vector for SEM backbones), with SEM read
    at the evaluation tau ``evaluation.sem_temp`` (1e-5, as the reference evaluates) and, as an extra
    line, at the training tau ``student.temp``; and the raw SEM simplex at the evaluation tau,
  - the same architecture freshly initialised with the same seed (what training started from), read
    like the teacher's headline figure,
  - raw pixels (the eval crop average-pooled to 16 x 16, L2-normalised).

- :class:`FinalKnn`: the ``evaluate`` hook that ``semlab.train.pretraining.run_pretraining``
  calls on rank 0 with the final teacher backbone.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from semlab.eval.features import extract_features
from semlab.eval.knn import knn_classify
from semlab.utils.atomic import atomic_write_text

KNN_RESULTS = "knn_results.json"
PIXEL_SIZE = 16
Accuracies = dict[int, dict[str, float]]


def knn_datasets(cfg: DictConfig) -> tuple[str, str] | None:
    """``(evaluation.knn_dataset_train, evaluation.knn_dataset_val)``, or None when either is unset."""
    train_ds, val_ds = str(cfg.evaluation.knn_dataset_train or ""), str(cfg.evaluation.knn_dataset_val or "")
    return (train_ds, val_ds) if train_ds and val_ds else None


def knn_accuracy(
    cfg: DictConfig,
    model: nn.Module | None,
    kind: str = "cls",
    device: torch.device | str | None = None,
    train_dataset: str | Dataset | None = None,
    val_dataset: str | Dataset | None = None,
) -> Accuracies:
    """``{k: {"top1", "top5"}}`` (percent) of the weighted k-NN on features of ``kind``.

    Datasets (dataset strings, or ready datasets of ``(image, label)`` with the eval transform) default
    to ``evaluation.knn_dataset_train`` / ``_val``; k, T and the batch size come
    from ``knn.*``, the eval crop from ``linear.resize_size`` / ``crop_size``, the SEM temperature
    from ``evaluation.sem_temp``.
    """
    if train_dataset is None or train_dataset == "":
        train_dataset = str(cfg.evaluation.knn_dataset_train)
    if val_dataset is None or val_dataset == "":
        val_dataset = str(cfg.evaluation.knn_dataset_val)
    if device is None:
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
    (xtr, ytr), (xva, yva) = (
        extract_features(
            model,
            ds,
            kind=kind,
            sem_temp=float(cfg.evaluation.sem_temp),
            batch_size=int(cfg.knn.batch_size),
            num_workers=0,
            resize_size=int(cfg.linear.resize_size),
            crop_size=int(cfg.linear.crop_size),
            device=device,
            pixel_size=PIXEL_SIZE,
        )
        for ds in (train_dataset, val_dataset)
    )
    nb_knn = [int(k) for k in cfg.knn.nb_knn]
    return knn_classify(xtr, ytr, xva, yva, nb_knn=nb_knn, temperature=float(cfg.knn.temperature))


def random_init_backbone(cfg: DictConfig) -> nn.Module:
    """The student backbone as ``SSLMetaArch`` initialises it after seeding with ``train.seed``,
    without the pretrained weights; the global RNG state is left untouched."""
    from semlab.models import build_model_from_cfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.train.seed))
        student, _, _ = build_model_from_cfg(cfg)
    return student


@contextlib.contextmanager
def sem_temperature(backbone: nn.Module, tau: float) -> Iterator[None]:
    """Read the backbone's SEM (its CLS output included) at ``tau`` inside the block; no-op without SEM."""
    if not getattr(backbone, "has_sem", False):
        yield
        return
    previous = backbone.sem_temp
    backbone.set_sem_temp(tau)
    try:
        yield
    finally:
        backbone.set_sem_temp(previous)


def _primary_k(nb_knn: list[int]) -> int:
    return 20 if 20 in nb_knn else nb_knn[0]


def knn_report(
    cfg: DictConfig, teacher_backbone: nn.Module, output_dir: str | Path | None = None, baselines: bool = True
) -> dict[str, Any]:
    """k-NN of the teacher (CLS, and SEM raw if any) and, with ``baselines``, of a random-init
    backbone and of raw pixels; written to ``<output_dir>/knn_results.json`` when given.

    Returns ``{"k": primary k, "top1": {name: %}, "results": {name: {k: {"top1", "top5"}}}, ...}``.
    """
    datasets = knn_datasets(cfg)
    if datasets is None:
        raise ValueError("set evaluation.knn_dataset_train and evaluation.knn_dataset_val to run the k-NN")
    device = next(teacher_backbone.parameters()).device
    eval_tau, train_tau = float(cfg.evaluation.sem_temp), float(cfg.student.temp)
    has_sem = bool(getattr(teacher_backbone, "has_sem", False))
    results: dict[str, Accuracies] = {}
    with sem_temperature(teacher_backbone, eval_tau):
        results["teacher"] = knn_accuracy(cfg, teacher_backbone, "cls", device)
        if has_sem:
            results["teacher_sem_raw"] = knn_accuracy(cfg, teacher_backbone, "sem", device)
    if has_sem and train_tau != eval_tau:
        with sem_temperature(teacher_backbone, train_tau):
            results["teacher_train_tau"] = knn_accuracy(cfg, teacher_backbone, "cls", device)
    if baselines:
        random_init = random_init_backbone(cfg).to(device)
        with sem_temperature(random_init, eval_tau):
            results["random_init"] = knn_accuracy(cfg, random_init, "cls", device)
        results["raw_pixels"] = knn_accuracy(cfg, None, "pixels", torch.device("cpu"))
    nb_knn = [int(k) for k in cfg.knn.nb_knn]
    k = _primary_k(nb_knn)
    report = {
        "k": k,
        "top1": {name: res[k]["top1"] for name, res in results.items()},
        "results": {name: {str(kk): v for kk, v in res.items()} for name, res in results.items()},
        "nb_knn": nb_knn,
        "temperature": float(cfg.knn.temperature),
        "train_dataset": datasets[0],
        "val_dataset": datasets[1],
        "sem_temp": eval_tau,
        "train_sem_temp": train_tau if has_sem else None,
    }
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / KNN_RESULTS, json.dumps(report, indent=2) + "\n")
    return report


def format_knn_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines, each naming the dataset it was measured on: SEM raw (if any), the
    teacher at the training tau (if SEM), then the headline teacher, random init, raw pixels."""
    k, top1 = report["k"], report["top1"]
    tau, train_tau = report.get("sem_temp"), report.get("train_sem_temp")
    sem = "teacher_sem_raw" in top1
    labels = {
        "teacher_sem_raw": f"trained teacher, raw SEM simplices at tau={tau:g}" if sem else "",
        "teacher_train_tau": f"trained teacher, CLS with SEM at the training tau={train_tau}",
        "teacher": f"trained teacher, CLS with SEM at tau={tau:g}" if sem else "trained teacher, CLS",
        "random_init": "random-init backbone, same reading",
        "raw_pixels": "raw pixels",
    }
    where = f"k={k}, on {report['val_dataset']}"
    order = ("teacher_sem_raw", "teacher_train_tau", "teacher", "random_init", "raw_pixels")
    return [f"k-NN top-1 ({where}) {labels[name]}: {top1[name]:.2f}%" for name in order if name in top1]


class FinalKnn:
    """The final evaluation of a pretraining: :func:`knn_report` of the teacher into ``output_dir``.

    ``FinalKnn(cfg, output_dir)(teacher_backbone, iteration)`` returns the scalar metrics
    ``knn_top1_<name>`` (empty when the k-NN datasets are not configured) and keeps the whole
    report in ``.report``.
    """

    def __init__(self, cfg: DictConfig, output_dir: str | Path) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.report: dict[str, Any] | None = None

    def __call__(self, teacher_backbone: nn.Module, iteration: int) -> dict[str, float]:
        if knn_datasets(self.cfg) is None:
            return {}
        self.report = knn_report(self.cfg, teacher_backbone, self.output_dir)
        return {f"knn_top1_{name}": float(v) for name, v in self.report["top1"].items()}
