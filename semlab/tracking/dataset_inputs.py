"""The data a pretraining reads, as MLflow dataset inputs (the runs table's "Dataset" column).

One input per distinct dataset string and context:

- ``training``: ``train.dataset_path``;
- ``evaluation``: the end-of-run k-NN and probe sets (``evaluation.knn_dataset_train`` / ``_val``) and
  the in-training k-NN's (``evaluation.knn_during_training_train`` / ``_val``, which default to them).

Each input is an MLflow ``MetaDataset`` (metadata only, no rows):

- ``name``: the dataset string with each path (``root=``, ``extra=``, ``path=``) cut to its last part,
  e.g. ``ImageFolder:root=digits:split=VAL``;
- ``source``: where the images are: the ``root`` / ``path`` folder or URI, or for ``Demo`` the cache
  folder it is generated into;
- ``digest``: the first 8 hex digits of a SHA-256 over the full dataset string and a fingerprint of its
  content: for ``Demo`` the generator's version, seed, split and size (every image is a pure function of
  them); for a local folder the relative path and size of every file under it (for ``ImageNet`` the
  files of its ``extra`` folder, which list every image); for a remote URI the string alone. A changed
  folder therefore changes the digest; a file rewritten with the same size does not.

Logging is best effort, like every MLflow write of a pretraining: a failure warns and training goes on.
An input already on the run (a resumed pretraining) is not logged again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAINING, EVALUATION = "training", "evaluation"
PATH_KEYS = ("root", "extra", "path")


@dataclass(frozen=True)
class DatasetInput:
    """What one MLflow dataset input says of a dataset string."""

    name: str
    source: str
    digest: str
    context: str
    dataset_str: str


def run_datasets(cfg: Any) -> list[tuple[str, str]]:
    """``[(dataset string, context)]`` of a pretraining config, without repeats or empty/``none`` sets."""
    from semlab.eval.training_knn import training_knn_datasets

    ev = cfg.evaluation
    found = [(str(cfg.train.dataset_path or ""), TRAINING)]
    found += [(str(ev.get(key) or ""), EVALUATION) for key in ("knn_dataset_train", "knn_dataset_val")]
    found += [(s, EVALUATION) for s in training_knn_datasets(cfg) or ()]
    seen, out = set(), []
    for item in found:
        if item[0] and item[0].lower() != "none" and item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _file_listing(folder: Path) -> bytes:
    """``relative path\\tsize\\n`` of every file under ``folder``, in sorted order (b'' if not a folder)."""
    if not folder.is_dir():
        return b""
    lines = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                lines.append(f"{path.relative_to(folder).as_posix()}\t{path.stat().st_size}\n")
            except OSError:
                continue
    return "".join(lines).encode()


def _is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def describe(dataset_str: str, context: str) -> DatasetInput:
    """The :class:`DatasetInput` of ``dataset_str`` (see the module doc for name, source and digest)."""
    from semlab.data.datasets.dataset_str import parse_dataset_str

    kind, kwargs = parse_dataset_str(dataset_str)
    h = hashlib.sha256(dataset_str.encode())
    if kind == "Demo":
        from semlab.data.datasets.demo import DEMO_N_PER_CLASS, DEMO_SEED, DEMO_VERSION, default_demo_root

        split = kwargs["split"].upper()
        source = str(Path(kwargs.get("root") or default_demo_root()).expanduser().resolve())
        n = kwargs.get("n_per_class") or DEMO_N_PER_CLASS.get(split)
        h.update(f"{DEMO_VERSION}:{DEMO_SEED}:{split}:{n}".encode())
    else:
        source = kwargs.get("root") or kwargs.get("path") or ""
        content = kwargs.get("extra", source) if kind == "ImageNet" else source
        if _is_local(source):
            source = str(Path(source.removeprefix("file://")).expanduser().resolve())
        if content and _is_local(content):
            h.update(_file_listing(Path(content.removeprefix("file://")).expanduser()))
    short = ":".join(
        [kind, *(f"{k}={Path(v.rstrip('/')).name if k in PATH_KEYS else v}" for k, v in kwargs.items())]
    )
    return DatasetInput(short, source, h.hexdigest()[:8], context, dataset_str)


def _mlflow_input(item: DatasetInput) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput as MlflowDatasetInput
    from mlflow.entities import InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # a local path matches MLflow's two local sources (file: and no scheme)
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        source = resolve_dataset_source(item.source)
    dataset = MetaDataset(source=source, name=item.name, digest=item.digest)
    return MlflowDatasetInput(
        dataset=dataset._to_mlflow_entity(), tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=item.context)]
    )


def log_dataset_inputs(client: Any, run_id: str, cfg: Any) -> list[DatasetInput]:
    """Log the datasets of ``cfg`` on run ``run_id`` (those not on it yet); returns what was logged."""
    try:
        run = client.get_run(run_id)
        have = {
            (i.dataset.name, i.dataset.digest, tag.value)
            for i in (run.inputs.dataset_inputs if run.inputs else [])
            for tag in i.tags
            if tag.key == "mlflow.data.context"
        }
        items = [describe(s, c) for s, c in run_datasets(cfg)]
        new = [i for i in items if (i.name, i.digest, i.context) not in have]
        if new:
            client.log_inputs(run_id, datasets=[_mlflow_input(i) for i in new])
        return new
    except Exception as exc:  # the store or a dataset string is out of our hands: never stop training
        logger.warning("could not log the dataset inputs of MLflow run %s: %r", run_id, exc)
        return []
