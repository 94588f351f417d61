"""The k-NN of the teacher during training: one cheap accuracy at every ``evaluation.eval_period_iterations``.

:class:`TrainingKnn` is the ``evaluate_during_training`` hook of
:func:`semlab.train.pretraining.run_pretraining` (so that ``train`` never imports ``eval``). It runs
on rank 0, reads the teacher's CLS output (SEM at the evaluation tau ``evaluation.sem_temp``) on
the labelled sets ``evaluation.knn_during_training_train`` / ``_val`` ('' = the final k-NN's sets,
``none`` = off) and returns ``{"accuracy/knn_top1": %, "accuracy/knn_top5": %}`` at the primary k
(20 if in ``knn.nb_knn``, else the first). The sets should be small: the evaluation stops the
training of every rank for as long as it takes (the other ranks wait at their next collective).
So each set is capped at ``evaluation.knn_during_training_max_train`` / ``_max_val`` images (0 = all):
a larger set is replaced by the images at the evenly spaced indices ``floor(i * N / M)``, i < M, a
fixed subset that keeps every class of a class-sorted folder. With the seed recipe's defaults the k-NN
reads 10,000 + 5,000 ImageNet images every 6,250 iterations (1.6M training images), forward only,
instead of the whole 1.33M-image train + val sets.

The metric names start with ``accuracy/`` so that the MLflow chart view, which sorts groups by
name, shows accuracy before the losses and the ``final/`` figures.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, Subset

from semlab.eval.knn_report import _primary_k, knn_accuracy, sem_temperature

TRAINING_KNN_METRIC = "accuracy/knn_top1"
OFF = "none"


def evenly_spaced_subset(dataset: Dataset, max_images: int) -> Dataset:
    """``dataset`` itself when it has at most ``max_images`` items (or ``max_images <= 0``), else the
    ``max_images`` items at indices ``floor(i * N / max_images)``."""
    n = len(dataset)  # type: ignore[arg-type]
    if max_images <= 0 or n <= max_images:
        return dataset
    return Subset(dataset, [i * n // max_images for i in range(max_images)])


def training_knn_datasets(cfg: DictConfig) -> tuple[str, str] | None:
    """The (train, val) sets of the in-training k-NN, or None when it is off or has no labelled data."""
    ev = cfg.evaluation
    if not bool(ev.get("knn_during_training", True)):
        return None
    train = str(ev.get("knn_during_training_train") or "") or str(ev.knn_dataset_train or "")
    val = str(ev.get("knn_during_training_val") or "") or str(ev.knn_dataset_val or "")
    if not train or not val or OFF in (train.lower(), val.lower()):
        return None
    return train, val


class TrainingKnn:
    """``TrainingKnn(cfg)(teacher_backbone, iteration) -> {"accuracy/knn_top1", "accuracy/knn_top5"}``.

    The backbone's train/eval mode and SEM temperature are restored afterwards (it is the live
    teacher when it is not sharded). ``history`` keeps ``(iteration, top1)`` of every call.
    """

    def __init__(self, cfg: DictConfig) -> None:
        datasets = training_knn_datasets(cfg)
        if datasets is None:
            raise ValueError(
                "the in-training k-NN has no labelled data: set evaluation.knn_during_training_train/_val "
                "(or evaluation.knn_dataset_train/_val), or evaluation.knn_during_training=false"
            )
        self.cfg = cfg
        self.train_dataset, self.val_dataset = datasets
        self.history: list[tuple[int, float]] = []
        self._sets: tuple[Dataset, Dataset] | None = None  # built on first use (not pickled to workers)

    def datasets(self) -> tuple[Dataset, Dataset]:
        """The (train, val) sets as datasets with the eval transform, each capped (see the module doc)."""
        if self._sets is None:
            from semlab.data import make_dataset
            from semlab.eval.features import make_eval_transform

            ev, lin = self.cfg.evaluation, self.cfg.linear
            transform = make_eval_transform(int(lin.resize_size), int(lin.crop_size))
            caps = (
                int(ev.get("knn_during_training_max_train", 0)),
                int(ev.get("knn_during_training_max_val", 0)),
            )
            train, val = (
                evenly_spaced_subset(make_dataset(name, transform=transform), cap)
                for name, cap in zip((self.train_dataset, self.val_dataset), caps)
            )
            self._sets = (train, val)
        return self._sets

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sets": None}

    def __call__(self, teacher_backbone: nn.Module, iteration: int) -> dict[str, float]:
        was_training = teacher_backbone.training
        try:
            with sem_temperature(teacher_backbone, float(self.cfg.evaluation.sem_temp)):
                train, val = self.datasets()
                acc = knn_accuracy(self.cfg, teacher_backbone, "cls", train_dataset=train, val_dataset=val)
        finally:
            teacher_backbone.train(was_training)
        k = _primary_k(sorted(acc))
        top1, top5 = float(acc[k]["top1"]), float(acc[k]["top5"])
        self.history.append((int(iteration), top1))
        return {TRAINING_KNN_METRIC: top1, "accuracy/knn_top5": top5}


def training_knn(cfg: DictConfig) -> TrainingKnn | None:
    """The in-training k-NN hook of ``cfg``, or None when it is off or has no labelled sets."""
    return TrainingKnn(cfg) if training_knn_datasets(cfg) is not None else None
