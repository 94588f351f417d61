"""``train_loop_per_worker``: what each Ray Train worker runs.

One worker = one process = one GPU (or a share of a CPU). Ray Train has already created the
torch process group (NCCL on GPU, gloo on CPU) when this function starts. Each worker:

0. configures logging (INFO to stderr, which Ray streams to ``ray job logs`` and the dashboard),
   so rank 0's progress line of every log period is visible while the run goes;
1. resumes from the latest reported checkpoint, if Ray hands one over (a restarted worker group
   or a resubmitted run of the same name): Ray's storage is the one source of truth. A checkpoint
   on a local (or mounted) filesystem is read in place, each rank reading only the shards it
   needs (DCP reshards, so the worker count may differ from the one that saved it); one in
   object storage (``gs://``) is first downloaded by the local rank 0 of each node. The local
   ``<output_dir>/checkpoints`` keeps only the newest folder (``train.max_to_keep`` = 1), as a
   cache that says so in ``checkpoints/CACHE.txt``;
2. builds its data stream: the Ray Data shard of this worker (``data.backend=ray``) through
   ``iter_training_batches``, or the local loader's rank-``r``-of-``W`` part (``data.backend=local``);
3. runs the one pretraining path, :func:`semlab.train.pretraining.run_pretraining` (seeds
   ``train.seed + rank`` as the reference, model, ``do_train``, final k-NN on rank 0), with a
   :class:`RayTrainReporter` (checkpoints to Ray on all ranks; MLflow on rank 0);
4. reports the final metrics (k-NN) to Ray, which Tune sees.

The ``config`` dict (``train_loop_config``) holds the resolved config (a DictConfig, pickled by
Ray), the output dir, the resume flag, the Ray Data ``epoch_start`` and an optional fault
injection (tests: ``{"iteration": k, "rank": r}`` makes rank ``r`` die with ``os._exit(1)`` when
it fetches the batch of iteration ``k``, once per output dir).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

logger = logging.getLogger(__name__)

FAULT_MARKER = ".semlab_fault_injected"
DataFactory = Callable[[int], Iterator[dict[str, Any]]]


# --------------------------------------------------------------------------- logging, resume
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CACHE_NOTE = "CACHE.txt"


def configure_worker_logging(rank: int) -> None:
    """INFO records of ``semlab`` to stderr on rank 0 (WARNING on the others); Ray's worker processes
    configure no logging of their own, so without this the progress lines would go nowhere."""
    import sys

    log = logging.getLogger("semlab")
    if not any(getattr(h, "_semlab_worker", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._semlab_worker = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    quiet_ray_report_lines()


def quiet_ray_report_lines() -> None:
    """Ray Train (2.60) logs every ``ray.train.report`` at INFO from every rank, with the whole metrics
    dict ("Reporting training result N: TrainingReport(...)"), under a logger named after its source file;
    rank 0's progress line already carries those metrics each log period. Raise that logger to WARNING
    (a no-op on a Ray without that module)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    except ImportError:
        return
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def write_cache_note(output_dir: Path, storage: str) -> None:
    """``checkpoints/CACHE.txt``: the local checkpoint folder is a cache of Ray's storage."""
    from semlab.train.checkpointing import checkpoint_dir as ckpt_dir
    from semlab.utils.atomic import atomic_write_text

    atomic_write_text(
        ckpt_dir(output_dir) / CACHE_NOTE,
        "This folder is a cache: it keeps only the newest checkpoint written on this node.\n"
        f"The checkpoints of this run are Ray Train's, in {storage} (retention: ray.num_to_keep);\n"
        "a restarted or resubmitted run resumes from there.\n",
    )


def ray_checkpoint_folder(checkpoint: Any, output_dir: Path, local_rank: int) -> Path | None:
    """A local folder holding Ray's checkpoint ``checkpoint`` (None: nothing to resume from). A local
    filesystem path is used in place; otherwise the local rank 0 of each node downloads it once into
    ``<output_dir>/checkpoints/restored/<name>``. Collective (a barrier)."""
    from semlab.train.checkpointing import checkpoint_dir as ckpt_dir
    from semlab.utils import distributed

    if checkpoint is None:
        distributed.barrier()
        return None
    if getattr(checkpoint.filesystem, "type_name", "") == "local":
        distributed.barrier()
        return Path(checkpoint.path)
    target = ckpt_dir(output_dir) / "restored" / Path(checkpoint.path).name
    if local_rank == 0:
        shutil.rmtree(target.parent, ignore_errors=True)
        checkpoint.to_directory(str(target))
        logger.info("downloaded Ray checkpoint %s to %s", checkpoint.path, target)
    distributed.barrier()
    return target


def remove_stale_temporaries(output_dir: Path) -> list[str]:
    """Delete what a killed attempt may have left in ``<output_dir>/checkpoints``: the hard-link
    directories of Ray uploads (``.ray-upload-*``) and atomic-write temporaries (``.<name>.*.tmp``).
    Only called before any rank of the new attempt writes there."""
    from semlab.orchestration.reporter import UPLOAD_PREFIX
    from semlab.train.checkpointing import checkpoint_dir as ckpt_dir

    folder = ckpt_dir(output_dir)
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith(UPLOAD_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        elif path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        logger.warning("removed temporaries of an interrupted attempt from %s: %s", folder, removed)
    return removed


def restore_ray_checkpoint(checkpoint: Any, output_dir: Path, local_rank: int) -> Path | None:
    """Clean up after a killed attempt (local rank 0), then the folder to resume from (see
    :func:`ray_checkpoint_folder`); every rank waits for the others."""
    if local_rank == 0:
        remove_stale_temporaries(output_dir)
    folder = ray_checkpoint_folder(checkpoint, output_dir, local_rank)
    if folder is not None:
        logger.info("resuming from Ray checkpoint %s", checkpoint.path)
    return folder


# --------------------------------------------------------------------------- data
def make_data_factory(cfg: DictConfig, rank: int, world: int, epoch_start: int = 0) -> DataFactory:
    """``start_iter -> iterator of batch dicts`` for this worker: the Ray Data shard
    (``data.backend=ray``) or the local loader's part of this rank (``data.backend=local``)."""
    backend = str(cfg.data.backend).lower()
    if backend == "local":
        from semlab.train.pretraining import local_data

        return local_data(cfg)
    if backend != "ray":
        raise ValueError(f"data.backend='{cfg.data.backend}' is not supported; use 'local' or 'ray'")
    import ray.train

    from semlab.data.pipeline.ray_pipeline import iter_training_batches

    shard = ray.train.get_dataset_shard("train")
    if shard is None:
        raise RuntimeError(
            "data.backend=ray but the trainer was given no 'train' dataset; build the TorchTrainer with "
            "semlab.orchestration.trainer.build_trainer, which passes build_ray_dataset(cfg) as 'train'"
        )

    def streamed(start_iter: int) -> Iterator[dict[str, Any]]:
        return iter_training_batches(shard, cfg, seed=int(cfg.train.seed), epoch_start=epoch_start, rank=rank)

    return streamed


def _call_custom(
    custom: Any, cfg: DictConfig, rank: int, world: int, start_iter: int
) -> Iterator[dict[str, Any]]:
    return custom(cfg, rank, world, start_iter)


def with_fault_injection(
    factory: DataFactory, fault: dict[str, int] | None, rank: int, output_dir: Path
) -> DataFactory:
    """Wrap ``factory`` so that rank ``fault['rank']`` exits hard at iteration ``fault['iteration']``,
    the first time only (a marker file in ``output_dir`` records that the fault happened)."""
    if not fault or int(fault.get("rank", 0)) != rank:
        return factory
    target = int(fault["iteration"])
    marker = output_dir / f"{FAULT_MARKER}_{target}"

    def wrapped(start_iter: int) -> Iterator[dict[str, Any]]:
        for it, batch in enumerate(factory(start_iter), start=start_iter):
            if it == target and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"rank {rank} killed itself at iteration {it} (pid {os.getpid()})\n")
                logger.warning("fault injection: rank %d exits at iteration %d", rank, it)
                os._exit(1)
            yield batch

    return wrapped


# --------------------------------------------------------------------------- the worker
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (see the module doc): Ray's restore, data and reporting around
    :func:`semlab.train.pretraining.run_pretraining`."""
    import ray.train
    import ray.train.torch
    import torch

    from semlab.eval.knn_report import FinalKnn, knn_datasets
    from semlab.eval.training_knn import training_knn
    from semlab.orchestration.reporter import RayTrainReporter
    from semlab.train.pretraining import run_pretraining

    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    configure_worker_logging(rank)
    cfg: DictConfig = config["cfg"]
    cfg.train.max_to_keep = 1  # Ray's storage keeps the checkpoints (ray.num_to_keep); this is a cache
    output_dir = Path(config["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    resume_from = restore_ray_checkpoint(ray.train.get_checkpoint(), output_dir, local_rank)
    resume = resume_from is not None or bool(config.get("resume", True))
    if local_rank == 0:
        write_cache_note(output_dir, ctx.get_storage().experiment_fs_path)

    custom = config.get("data_factory")
    if custom is not None:  # (cfg, rank, world, start_iter) -> iterator: synthetic data for tests/benchmarks
        factory = functools.partial(_call_custom, custom, cfg, rank, world)
    else:
        factory = make_data_factory(cfg, rank, world, int(config.get("epoch_start", 0)))
    factory = with_fault_injection(factory, config.get("fault"), rank, output_dir)

    inner = None
    if rank == 0 and bool(config.get("mlflow", False)) and bool(cfg.mlflow.enabled):
        from semlab.tracking import MLflowReporter

        inner = MLflowReporter(cfg, output_dir, recipe=config.get("recipe"), resume=resume, rank=0)
    reporter = RayTrainReporter(rank, inner)
    evaluate = FinalKnn(cfg, output_dir) if config.get("knn", True) and knn_datasets(cfg) else None
    try:
        summary = run_pretraining(
            cfg, output_dir, resume, reporter, data=factory, evaluate=evaluate, device=device,
            resume_from=resume_from,
            evaluate_during_training=training_knn(cfg),
        )  # fmt: skip
    except BaseException:  # the MLflow run ends FAILED (Ray may retry: the retry resumes the run)
        if inner is not None:
            inner.close("FAILED")
        raise
    reporter.close()
    final = {"iteration": int(summary["iteration"]), "done": 1, **summary.get("final_metrics", {})}
    reporter.report_final(final)
