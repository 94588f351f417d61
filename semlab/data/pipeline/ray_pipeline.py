"""Ray Data streaming of Parquet shards into multi-crop training batches (the only data module importing ray).

Pipeline (``build_ray_dataset``)::

    read_parquet(shards, file order shuffled per epoch)            # streaming, row groups as they come
      -> map_batches(augment_batch, num_cpus=data.map_num_cpus,    # decode + DINOv2 multi-crop, on Data CPUs
                     compute=TaskPoolStrategy(data.map_concurrency))
      -> per worker: streaming_split (Ray Train) -> iter_training_batches:
         iter_torch_batches (local shuffle buffer, prefetch, collate_fn = crop-major tensors, normalised
         or uint8, pinned on CUDA; in Ray Data's threads)
         -> background thread: batches of exactly train.batch_size_per_gpu + iBOT masks
            (semlab.data.pipeline.crop_batches) -> the batch dict of the training step.

Randomness, all derived from the training seed ``s``:

- epoch ``e`` is Ray Data's execution index of the dataset (each pass over the data is one execution);
  ``build_ray_dataset(..., epoch_start=e0)`` starts it at ``e0`` so a resumed run continues the sequence;
- the file order of epoch ``e`` is Ray's ``FileShuffleConfig(seed=s)`` permutation for execution ``e``;
- the crops of sample ``i`` in epoch ``e`` use ``numpy.random.default_rng([s, e, i])``: a pure function of
  (seed, epoch, sample index), wherever and in whatever batch the sample is augmented;
- the local shuffle buffer of worker ``r`` in epoch ``e`` is seeded with a SHA-256 mix of ``(s, e, r)``; masks
  are drawn from a generator seeded by a mix of ``(s, r)``.

With one consumer and ``data.preserve_order`` the stream is fully deterministic. With several training
workers Ray's ``streaming_split`` hands blocks to whichever worker asks first, so which worker sees which
sample varies between runs; each sample is still seen exactly once per epoch (``equal=True`` trims at most
``num_workers - 1`` rows) and its crops are still the deterministic function above.

Crops cross the object store as uint8 (pre-normalisation pixels, a quarter of float32's bytes) unless
``emit_uint8=False``; the worker normalises ``x / (255 std) - mean / std`` exactly as
``DataAugmentationDINO`` does, so both paths give bit-identical tensors.

CPU budget: Ray Data tasks need CPUs that training workers do not hold. With 2 CPUs and 2 training workers at
1 CPU each the stream waits forever at 0 rows; ``check_cpu_budget`` turns that into an error, and workers
should take fractional CPUs (``ray.cpus_per_worker``) on CPU-only machines.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from semlab.data.datasets.parquet import ShardFormatError, parse_parquet_dataset_str, shard_paths
from semlab.data.pipeline.augment import make_augmentation
from semlab.data.pipeline.crop_batches import exact_batches_with_masks, rows_to_crop_tensors
from semlab.data.pipeline.normalize import norm_constants

logger = logging.getLogger(__name__)

READ_COLUMNS = ["image", "label", "index"]


class RayDataConfigError(ValueError):
    """The Ray Data pipeline cannot run as configured; the message says what to change."""


def _mix(*values: int) -> int:
    """A 63-bit integer from a tuple of integers (stable across processes, unlike ``hash`` of strings)."""
    data = ",".join(str(int(v)) for v in values).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


# ---- Ray Data settings ----------------------------------------------------------------------


def configure_data_context(ctx: Any = None, cfg: Any = None) -> Any:
    """Quiet, bounded Ray Data settings on ``ctx`` (default: the current DataContext); returns it.

    Progress bars only on a terminal (they flood log files otherwise), no execution banner, and the
    execution options of :func:`data_execution_options`.
    """
    from ray.data import DataContext

    ctx = ctx if ctx is not None else DataContext.get_current()
    tty = sys.stderr.isatty()
    ctx.enable_progress_bars = tty
    ctx.enable_operator_progress_bars = tty
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # The file-listing read path (datasource v2) spawned ~25 worker processes and took ~50 s for the first
    # epoch of 8 small shards on 2 CPUs (3-4 s per later epoch); the classic Parquet reader: 8 s, then 0.3 s.
    ctx.use_datasource_v2 = False
    ctx.execution_options = data_execution_options(cfg)
    return ctx


def data_execution_options(cfg: Any = None) -> Any:
    """``ray.data.ExecutionOptions`` for the training stream.

    ``preserve_order`` (``cfg.data.preserve_order``, default true) keeps the block order of the file order,
    which makes a single consumer's stream deterministic. Ray Train already keeps the training workers'
    CPUs out of Ray Data's budget; ``cfg.data.max_cpus`` and ``cfg.data.max_object_store_gb`` (when > 0)
    cap Ray Data further (object-store use is bounded anyway by the store: ``ray.object_store_memory_gb``).
    """
    from ray.data import ExecutionOptions, ExecutionResources

    data = cfg.data if cfg is not None else {}
    preserve = bool(data.get("preserve_order", True))
    cpus = float(data.get("max_cpus", 0.0) or 0.0)
    store = float(data.get("max_object_store_gb", 0.0) or 0.0)
    limits = None
    if cpus > 0 or store > 0:
        limits = ExecutionResources(
            cpu=cpus if cpus > 0 else None, object_store_memory=store * 1024**3 if store > 0 else None
        )
    return ExecutionOptions(preserve_order=preserve, resource_limits=limits, verbose_progress=False)


def check_cpu_budget(
    cluster_cpus: float, num_workers: int, cpus_per_worker: float, map_num_cpus: float
) -> None:
    """Raise if training workers leave fewer CPUs than one Ray Data task needs (the stream would hang)."""
    left = cluster_cpus - num_workers * cpus_per_worker
    if left + 1e-9 < map_num_cpus:
        raise RayDataConfigError(
            f"Ray Data would get no CPU: the cluster has {cluster_cpus:g} CPUs, {num_workers} training "
            f"workers hold {cpus_per_worker:g} each, leaving {left:g} < data.map_num_cpus={map_num_cpus:g} "
            f"for the augmentation tasks, and the stream would wait forever at 0 rows. Lower "
            f"ray.cpus_per_worker (fractions are fine, e.g. 0.5), lower data.map_num_cpus, or add CPUs"
        )


# ---- the Ray Data side -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _augmentation(crops: tuple) -> Any:
    """The augmentation of ``make_augmentation`` for a ``cfg.crops`` section frozen by :func:`_crops_key`
    (built once per Ray worker process)."""
    from omegaconf import OmegaConf

    return make_augmentation(OmegaConf.create({"crops": {k: _thaw(v) for k, v in crops}}))


def _thaw(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _crops_key(cfg: Any) -> tuple:
    """``cfg.crops`` as a hashable, picklable tuple of (key, value) pairs (lists become tuples)."""
    from omegaconf import OmegaConf

    crops = OmegaConf.to_container(cfg.crops, resolve=True)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in crops.items()))


def _to_uint8(normalised: torch.Tensor) -> np.ndarray:
    """Invert the normalisation: the augmentation's pixels are integers in [0, 255] before it, so rounding
    ``(y - shift) / scale`` recovers them exactly."""
    scale, shift = norm_constants()
    return ((normalised - shift) / scale).round_().clamp_(0, 255).to(torch.uint8).numpy()


def current_epoch() -> int:
    """The epoch a Ray Data task belongs to: the dataset's execution index (0 outside Ray Data)."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def augment_batch(
    batch: dict[str, np.ndarray],
    *,
    crops: tuple,
    seed: int,
    emit_uint8: bool = True,
    epoch: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode and multi-crop a batch of encoded images (runs inside Ray Data tasks).

    Sample ``i`` of epoch ``e`` uses ``default_rng([seed, e, i])``. Returns ``global_crops`` (n, 2, 3, G, G),
    ``local_crops`` (n, L, 3, l, l) -- uint8 pixels, or normalised float32 with ``emit_uint8=False`` --
    plus ``label`` and ``index`` (int64).
    """
    aug = _augmentation(crops)
    epoch = current_epoch() if epoch is None else epoch
    globals_, locals_ = [], []
    indices = np.asarray(batch["index"], dtype=np.int64)
    for data, index in zip(batch["image"], indices):
        out = aug(bytes(data), rng=np.random.default_rng([int(seed), int(epoch), int(index)]))
        g = torch.stack(out["global_crops"])
        n_local, size = len(out["local_crops"]), aug.local_crops_size
        loc = torch.stack(out["local_crops"]) if n_local else torch.zeros(0, 3, size, size)
        globals_.append(_to_uint8(g) if emit_uint8 else g.numpy())
        locals_.append(_to_uint8(loc) if emit_uint8 else loc.numpy())
    return {
        "global_crops": np.stack(globals_),
        "local_crops": np.stack(locals_),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "index": indices,
    }


def build_ray_dataset(
    cfg: Any,
    split: str = "TRAIN",
    *,
    seed: int | None = None,
    epoch_start: int = 0,
    emit_uint8: bool = True,
    check_resources: bool = True,
) -> Any:
    """The streaming training dataset for ``cfg.train.dataset_path`` (a ``Parquet:path=...`` string).

    ``seed`` defaults to ``cfg.train.seed``; ``epoch_start`` is the first epoch (resume). Requires Ray to be
    initialised when ``check_resources`` (to compare the cluster's CPUs with the training workers' and the
    augmentation's needs; see :func:`check_cpu_budget`).
    """
    import ray
    from ray.data import FileShuffleConfig, TaskPoolStrategy

    dataset_str = str(cfg.train.dataset_path)
    if not dataset_str.startswith("Parquet:"):
        raise RayDataConfigError(
            f"data.backend=ray streams Parquet shards, but train.dataset_path is '{dataset_str}'. Prepare "
            f"shards with 'python experiments/prepare_data.py --dataset \"{dataset_str}\" --output <dir>' "
            f"and set train.dataset_path=Parquet:path=<dir> (or use data.backend=local)"
        )
    options = parse_parquet_dataset_str(dataset_str)
    split = options.get("split", split).upper()
    paths, fs, _ = shard_paths(options["path"], split)
    if not paths:
        raise ShardFormatError(f"split {split} of '{options['path']}' has no shards")
    data = cfg.data
    map_num_cpus = float(data.map_num_cpus)
    if check_resources and ray.is_initialized():
        check_cpu_budget(
            float(ray.cluster_resources().get("CPU", 0.0)),
            int(cfg.ray.num_workers),
            float(cfg.ray.cpus_per_worker),
            map_num_cpus,
        )
    seed = int(cfg.train.seed if seed is None else seed)

    # read_parquet picks its reader from the current context: configure it first
    configure_data_context(cfg=cfg)
    ds = ray.data.read_parquet(
        paths,
        filesystem=fs,
        columns=READ_COLUMNS,
        shuffle=FileShuffleConfig(seed=seed % 2**32),
        num_cpus=map_num_cpus,
    )
    concurrency = data.map_concurrency
    ds = ds.map_batches(
        augment_batch,
        batch_size=int(data.get("map_batch_size", 16)),
        batch_format="numpy",
        fn_kwargs={"crops": _crops_key(cfg), "seed": seed, "emit_uint8": emit_uint8},
        num_cpus=map_num_cpus,
        compute=TaskPoolStrategy(size=int(concurrency)) if concurrency else None,
    )
    configure_data_context(ds.context, cfg)
    ds.context._execution_idx = int(epoch_start)  # the epoch counter Ray's reshuffles and augment_batch read
    return ds


# ---- the training-worker side ---------------------------------------------------------------------------


def epoch_batches(
    dataset_shard: Any, cfg: Any, seed: int, epoch: int, rank: int = 0, batch_size: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass (epoch) over a shard as crop-major tensor batches, through a local shuffle buffer seeded by
    (seed, epoch, rank).

    Ray Data's ``iter_torch_batches`` does the work off the caller's thread: it prefetches
    ``data.prefetch_batches`` batches, runs :func:`~semlab.data.pipeline.crop_batches.rows_to_crop_tensors`
    as its ``collate_fn`` in its format threads, and pins the tensors when CUDA is available. The tensors
    stay on the host (``device="cpu"``): the training step copies them, non-blocking, to its device.
    """
    buffer = int(cfg.data.shuffle_buffer_size or 0)
    return dataset_shard.iter_torch_batches(
        batch_size=int(batch_size or cfg.train.batch_size_per_gpu),
        prefetch_batches=int(cfg.data.prefetch_batches),
        device="cpu",
        collate_fn=_crop_collate(normalise=not bool(cfg.data.get("normalize_on_device", False))),
        pin_memory=torch.cuda.is_available(),
        local_shuffle_buffer_size=buffer if buffer > 0 else None,
        local_shuffle_seed=_mix(seed, epoch, rank) % 2**32 if buffer > 0 else None,
    )


def _crop_collate(normalise: bool) -> Any:
    """Stage 1 of :mod:`semlab.data.pipeline.crop_batches` as the ``NumpyBatchCollateFn`` Ray asks for."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class CropCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return rows_to_crop_tensors(batch, normalise)

    return CropCollate()


def iter_training_batches(
    dataset_shard: Any, cfg: Any, seed: int, epoch_start: int = 0, rank: int = 0
) -> Iterator[dict[str, Any]]:
    """Infinite iterator of training batch dicts from a Ray Data shard.

    ``dataset_shard`` is ``ray.train.get_dataset_shard("train")`` inside a Ray Train worker, or any Ray
    ``Dataset``/``DataIterator``. Each pass over it is one epoch (``epoch_start``, ``epoch_start + 1``, ...;
    keep it equal to the ``epoch_start`` given to :func:`build_ray_dataset`). The yielded dict is the batch
    dict of docs/architecture.md. ``rank`` (the caller's world rank: the Ray Train worker passes its own)
    seeds the shuffle and the masks. Nothing runs on the caller's thread but the hand-over:

    - :func:`epoch_batches`: Ray Data's threads turn rows into crop-major tensors (normalised, or uint8
      with ``data.normalize_on_device``), pinned when CUDA is available;
    - one background thread, up to ``data.collate_prefetch_batches`` batches ahead (0: on the caller's
      thread), cuts them into batches of exactly ``train.batch_size_per_gpu`` rows (a partial batch at the
      end of an epoch is completed from the next one) and draws their iBOT masks
      (:mod:`semlab.data.pipeline.crop_batches`).
    """
    rank = int(rank)
    batch_size = int(cfg.train.batch_size_per_gpu)

    def stream() -> Iterator[dict[str, torch.Tensor]]:
        epoch = int(epoch_start)
        while True:
            rows = 0
            for batch in epoch_batches(dataset_shard, cfg, seed, epoch, rank, batch_size):
                rows += int(batch["labels"].shape[0])
                yield batch
            if rows == 0:
                raise RayDataConfigError(
                    f"epoch {epoch}: the dataset shard of worker {rank} gave no rows; is the "
                    f"split empty or smaller than the number of workers?"
                )
            epoch += 1

    depth = int(cfg.data.get("collate_prefetch_batches", 0))
    pin = torch.cuda.is_available()
    yield from exact_batches_with_masks(
        stream(), cfg, _mix(seed, rank, 7), pin, depth, name=f"semlab-collate-rank{rank}"
    )
