"""The Ray Train ``TorchTrainer`` of a pretraining, built from the config (Ray Train V2 API).

Config -> Ray (``ray:`` section):

    ScalingConfig(num_workers=ray.num_workers, use_gpu=ray.use_gpu,
                  resources_per_worker={"CPU": ray.cpus_per_worker[, "GPU": ray.gpus_per_worker]})
    RunConfig(name=ray.run_name or <output dir's name>,
              storage_path=ray.storage_path or <output_dir>/ray_results,
              failure_config=FailureConfig(max_failures=ray.max_failures,
                                           max_preemption_failures=ray.max_preemption_failures),
              checkpoint_config=CheckpointConfig(num_to_keep=ray.num_to_keep))

Fault tolerance: when a worker dies, Ray Train tears the group down, starts a new one (up to
``max_failures`` times) and ``ray.train.get_checkpoint()`` hands the new workers the last
reported checkpoint, from which they resume. A worker lost with its node to a preemption (Spot) is
recovered the same way but counted against ``max_preemption_failures`` (default -1: always), not
``max_failures``, which stays for real errors: Ray Train 2.60 tells the two apart from the node's
drain notice. A Spot user loses at most one checkpoint period of training (the iterations since
the last checkpoint whose upload completed). Rerunning (or resubmitting) with the same run name
and storage path resumes an interrupted or cancelled run the same way; ``resume=False`` runs under
a fresh, time-stamped name instead. Checkpoints are sharded DCP folders that reshard on load, so
the worker count may change between attempts (3 -> 2 workers, or 4 GPUs -> 8).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from semlab.config import resolved_copy
from semlab.orchestration.worker import train_loop_per_worker

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")
FAULT_ENV = "SEMLAB_FAULT_INJECT"  # "<iteration>[:<rank>]": tests only
STORAGE_ENV = "SEMLAB_RAY_STORAGE"


class TrainerConfigError(ValueError):
    """The ``ray:`` section cannot describe a valid Ray Train run; the message says what to change."""


def run_name(cfg: DictConfig, output_dir: str | Path) -> str:
    """``ray.run_name``, else the output directory's name."""
    return str(cfg.ray.run_name or Path(output_dir).resolve().name)


def storage_path(cfg: DictConfig, output_dir: str | Path) -> str:
    """``ray.storage_path`` (a local path or a URI such as ``gs://bucket/runs``), else the
    ``SEMLAB_RAY_STORAGE`` variable (set on the nodes of cluster.yaml), else ``<output_dir>/ray_results``."""
    path = str(cfg.ray.storage_path or os.environ.get(STORAGE_ENV, "") or "")
    if not path:
        return str(Path(output_dir).resolve() / "ray_results")
    return path if "://" in path else str(Path(path).expanduser().resolve())


def make_data_config(cfg: DictConfig) -> Any:
    """``ray.train.DataConfig`` for ``TorchTrainer(datasets={"train": ds}, dataset_config=...)``: split only
    "train" across workers, with ``data_execution_options`` (Train otherwise copies the driver's)."""
    from ray.train import DataConfig

    from semlab.data.pipeline.ray_pipeline import data_execution_options

    return DataConfig(datasets_to_split=["train"], execution_options=data_execution_options(cfg))


def scaling_config(cfg: DictConfig) -> Any:
    from ray.train import ScalingConfig

    num_workers = int(cfg.ray.num_workers)
    if num_workers < 1:
        raise TrainerConfigError(f"ray.num_workers must be >= 1, got {num_workers}")
    use_gpu = bool(cfg.ray.use_gpu)
    resources: dict[str, float] = {"CPU": float(cfg.ray.cpus_per_worker)}
    if resources["CPU"] < 0:
        raise TrainerConfigError(f"ray.cpus_per_worker must be >= 0, got {resources['CPU']}")
    if use_gpu:
        resources["GPU"] = float(cfg.ray.gpus_per_worker)
        if resources["GPU"] <= 0:
            raise TrainerConfigError(
                "ray.use_gpu=true needs ray.gpus_per_worker > 0 (1 = one GPU per worker)"
            )
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def run_config(
    cfg: DictConfig, output_dir: str | Path, name: str | None = None, callbacks: list | None = None
) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    keep = int(cfg.ray.num_to_keep)
    return RunConfig(
        name=name or run_name(cfg, output_dir),
        storage_path=storage_path(cfg, output_dir),
        failure_config=FailureConfig(
            max_failures=int(cfg.ray.max_failures),
            max_preemption_failures=int(cfg.ray.max_preemption_failures),
        ),
        checkpoint_config=CheckpointConfig(num_to_keep=keep if keep > 0 else None),
        callbacks=callbacks or None,
    )


def latest_reported_iteration(storage: str, name: str) -> int | None:
    """Iteration of the newest ``checkpoint_<it>`` that Ray stored for run ``name``, if any."""
    import pyarrow.fs as pafs

    try:
        if "://" in storage:
            fs, root = pafs.FileSystem.from_uri(storage)
        else:
            fs, root = pafs.LocalFileSystem(), storage
        infos = fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/{name}", allow_not_found=True))
    except Exception as exc:  # noqa: BLE001 - unreachable storage: Ray will report it properly at fit()
        logger.warning("cannot list %s/%s: %s", storage, name, exc)
        return None
    its = [
        int(m.group(1))
        for i in infos
        if i.type == pafs.FileType.Directory and (m := _CKPT_RE.match(i.base_name))
    ]
    return max(its) if its else None


def ray_epoch_start(cfg: DictConfig, start_iter: int) -> int:
    """Ray Data epoch (full pass over the shards) that iteration ``start_iter`` falls in.

    ``floor(start_iter * batch_size_per_gpu * num_workers / num_samples)``; a resumed run restarts
    that epoch from its beginning (its file order and crops are the epoch's, see ray_pipeline).
    """
    if start_iter <= 0:
        return 0
    try:
        from semlab.data.datasets.parquet import parse_parquet_dataset_str, shard_paths

        options = parse_parquet_dataset_str(str(cfg.train.dataset_path))
        _, _, entry = shard_paths(options["path"], options.get("split", "TRAIN").upper())
        n = int(entry.get("num_samples", 0))
    except Exception as exc:  # noqa: BLE001 - the pipeline raises the real error when it is built
        logger.warning(
            "cannot read the shard manifest to place the resumed epoch (%s); starting at epoch 0", exc
        )
        return 0
    global_batch = int(cfg.train.batch_size_per_gpu) * int(cfg.ray.num_workers)
    return (start_iter * global_batch) // n if n > 0 else 0


def parse_fault(spec: str | dict | None) -> dict[str, int] | None:
    """``"5"`` / ``"5:1"`` / ``{"iteration": 5, "rank": 1}`` -> ``{"iteration": 5, "rank": 1}``."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, dict):
        return {"iteration": int(spec["iteration"]), "rank": int(spec.get("rank", 0))}
    parts = str(spec).split(":")
    try:
        return {"iteration": int(parts[0]), "rank": int(parts[1]) if len(parts) > 1 else 0}
    except ValueError as exc:
        raise TrainerConfigError(f"fault injection '{spec}' must be '<iteration>[:<rank>]'") from exc


def worker_config(
    cfg: DictConfig,
    output_dir: str | Path,
    resume: bool,
    *,
    epoch_start: int = 0,
    fault: dict[str, int] | None = None,
    mlflow: bool = True,
    recipe: str | None = None,
    knn: bool = True,
    data_factory: Any = None,
) -> dict[str, Any]:
    """The ``train_loop_config`` handed to every worker: the resolved config (still a DictConfig),
    plain run settings, and an optional picklable ``data_factory(cfg, rank, world, start_iter) ->
    iterator`` replacing the configured data."""
    return {
        "cfg": resolved_copy(cfg),
        "output_dir": str(Path(output_dir).resolve()),
        "resume": bool(resume),
        "epoch_start": int(epoch_start),
        "fault": fault,
        "mlflow": bool(mlflow),
        "recipe": recipe,
        "knn": bool(knn),
        "data_factory": data_factory,
    }


def build_trainer(
    cfg: DictConfig,
    output_dir: str | Path,
    resume: bool = True,
    *,
    name: str | None = None,
    fault: str | dict | None = None,
    callbacks: list | None = None,
    mlflow: bool = True,
    recipe: str | None = None,
    knn: bool = True,
    data_factory: Any = None,
) -> Any:
    """A ``TorchTrainer`` for this config (Ray must be initialised when ``data.backend=ray``).

    ``resume=False`` gives the run a fresh ``<name>-<timestamp>`` name, so nothing is resumed.
    ``fault`` (tests): see :func:`parse_fault`; defaults to the ``SEMLAB_FAULT_INJECT`` variable.
    """
    from ray.train.torch import TorchTrainer

    name = name or run_name(cfg, output_dir)
    if not resume:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    rc = run_config(cfg, output_dir, name=name, callbacks=callbacks)
    start_iter = 0
    if resume:
        last = latest_reported_iteration(rc.storage_path, name)
        start_iter = last + 1 if last is not None else 0
    datasets, dataset_config = None, None
    epoch_start = 0
    if str(cfg.data.backend).lower() == "ray" and data_factory is None:
        from semlab.data.pipeline.ray_pipeline import build_ray_dataset

        epoch_start = ray_epoch_start(cfg, start_iter)
        datasets = {"train": build_ray_dataset(cfg, "TRAIN", epoch_start=epoch_start)}
        dataset_config = make_data_config(cfg)
    fault_spec = parse_fault(fault if fault is not None else os.environ.get(FAULT_ENV))
    loop_config = worker_config(
        cfg,
        output_dir,
        resume,
        epoch_start=epoch_start,
        fault=fault_spec,
        mlflow=mlflow,
        recipe=recipe,
        knn=knn,
        data_factory=data_factory,
    )
    kwargs: dict[str, Any] = {}
    if dataset_config is not None:
        kwargs["dataset_config"] = dataset_config
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=rc,
        datasets=datasets,
        **kwargs,
    )


def fit(cfg: DictConfig, output_dir: str | Path, resume: bool = True, **kwargs: Any) -> Any:
    """Build the trainer and run it; returns the ``ray.train.Result`` (raises on a failed run)."""
    return build_trainer(cfg, output_dir, resume, **kwargs).fit()
