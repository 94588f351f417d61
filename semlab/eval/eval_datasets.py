"""Which labelled data the end-of-run evaluation (k-NN and linear probe) measures.

``evaluation.knn_dataset_train`` / ``_val`` name it when both are set. Otherwise the evaluation
follows ``train.dataset_path``: its labelled TRAIN split for the k-NN bank and the probe's
training, and its VAL split for the figures:

- ``Demo``, ``ImageNet``, ``Parquet``: the same string with ``split=TRAIN`` / ``split=VAL``;
- ``ImageFolder`` (no splits of its own): the fixed held-out split of the folder,
  ``split=TRAIN`` / ``split=VAL`` (:func:`semlab.data.datasets.image_folder.in_val_split`). Unless the
  pretraining itself read ``split=TRAIN``, its (unlabelled) images include the VAL ones.

Data without labels (every label -1, or a single class) or without such a split is not evaluated,
and :func:`resolve_eval_datasets` says so; ``none`` in either key switches the evaluation off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SPLIT_KEY = "split"
OFF = "none"


def _with_split(name: str, kwargs: dict[str, str], split: str) -> str:
    return ":".join([name, *(f"{k}={v}" for k, v in {**kwargs, SPLIT_KEY: split}.items())])


def derive_eval_datasets(train_dataset: str) -> tuple[str, str]:
    """``(train, val)`` dataset strings for the evaluation of a pretraining on ``train_dataset``."""
    from semlab.data.datasets.dataset_str import parse_dataset_str

    name, kwargs = parse_dataset_str(train_dataset)  # a split already given keeps its place
    return _with_split(name, kwargs, "TRAIN"), _with_split(name, kwargs, "VAL")


def _labelled(dataset_str: str) -> str | None:
    """None when ``dataset_str`` opens and has labels of at least two classes; else why not."""
    from semlab.data import make_dataset

    try:
        labels = np.asarray(make_dataset(dataset_str).labels)
    except (ValueError, OSError) as exc:
        return f"{dataset_str} cannot be opened ({exc})"
    known = labels[labels >= 0]
    if known.size == 0:
        return f"{dataset_str} has no labels"
    if np.unique(known).size < 2:
        return f"{dataset_str} has a single class"
    return None


def resolve_eval_datasets(cfg: Any) -> str:
    """Set ``evaluation.knn_dataset_train`` / ``_val`` to the data the evaluation measures (both ''
    when there is none) and return one line that says which, or why it is skipped."""
    ev = cfg.evaluation
    ev.knn_dataset_train, ev.knn_dataset_val = str(ev.knn_dataset_train or ""), str(ev.knn_dataset_val or "")
    if OFF in (ev.knn_dataset_train.lower(), ev.knn_dataset_val.lower()):
        ev.knn_dataset_train, ev.knn_dataset_val = "", ""
        return "end-of-run k-NN and linear probe switched off (evaluation.knn_dataset_*=none)"
    if ev.knn_dataset_train and ev.knn_dataset_val:
        return f"evaluation on {ev.knn_dataset_val} (train/bank: {ev.knn_dataset_train}), as configured"
    train_dataset = str(cfg.train.dataset_path)
    try:
        train, val = derive_eval_datasets(train_dataset)
        problem = _labelled(train) or _labelled(val)
    except ValueError as exc:
        problem = str(exc)
    if problem is not None:
        ev.knn_dataset_train, ev.knn_dataset_val = "", ""
        return (
            f"no labelled evaluation data for {train_dataset}: {problem}. The end-of-run k-NN and linear "
            "probe are skipped; set evaluation.knn_dataset_train and evaluation.knn_dataset_val to "
            "labelled dataset strings to run them."
        )
    ev.knn_dataset_train, ev.knn_dataset_val = train, val
    return f"evaluation on {val} (train/bank: {train}), following train.dataset_path"
