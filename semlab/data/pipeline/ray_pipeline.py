"""Ray Data streaming of Parquet shards into multi-crop training batches (the only data module importing ray).

Pipeline (``build_ray_dataset``)::

    read_parquet(shards, file order shuffled per epoch)            # streaming, row groups as they come
      -> map_batches(augment_batch, num_cpus=data.map_num_cpus,    # decode + DINOv2 multi-crop, on Data CPUs
                     compute=TaskPoolStrategy(data.map_concurrency))
      -> per worker: streaming_split (Ray Train) -> iter_training_batches:
         local shuffle buffer, batches of train.batch_size_per_gpu, uint8 -> normalised float,
         masks + collate (semlab.data.pipeline.collate) in a background thread of the worker, ahead of the
         training step -> the batch dict of the training step.

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
from semlab.data.pipeline.normalize import norm_constants, normalize_uint8
from semlab.data.pipeline.prefetch import prefetch_in_thread

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


def _rebatch(stream: Iterator[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Exactly ``batch_size`` rows per output batch, carrying partial batches over (across epochs)."""
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in stream:
        n = len(batch["index"])
        if not pending and n == batch_size:
            yield batch
            continue
        pending.append(batch)
        count += n
        while count >= batch_size:
            merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            count -= batch_size
            pending = [rest] if count else []


def _normalise(x: np.ndarray) -> torch.Tensor:
    """uint8 crops (..., 3, H, W) -> ``x * scale + shift`` in float32 (:func:`normalize_uint8`)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return normalize_uint8(t) if t.dtype == torch.uint8 else t.float()


def epoch_batches(
    dataset_shard: Any, cfg: Any, seed: int, epoch: int, rank: int = 0, batch_size: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """One pass (epoch) over a shard: numpy batches through a local shuffle buffer seeded by (seed, epoch,
    rank)."""
    buffer = int(cfg.data.shuffle_buffer_size or 0)
    return dataset_shard.iter_batches(
        batch_size=int(batch_size or cfg.train.batch_size_per_gpu),
        batch_format="numpy",
        prefetch_batches=int(cfg.data.prefetch_batches),
        local_shuffle_buffer_size=buffer if buffer > 0 else None,
        local_shuffle_seed=_mix(seed, epoch, rank) % 2**32 if buffer > 0 else None,
    )


def iter_training_batches(
    dataset_shard: Any, cfg: Any, seed: int, epoch_start: int = 0, rank: int = 0
) -> Iterator[dict[str, Any]]:
    """Infinite iterator of training batch dicts from a Ray Data shard.

    ``dataset_shard`` is ``ray.train.get_dataset_shard("train")`` inside a Ray Train worker, or any Ray
    ``Dataset``/``DataIterator``. Each pass over it is one epoch (``epoch_start``, ``epoch_start + 1``, ...;
    keep it equal to the ``epoch_start`` given to :func:`build_ray_dataset`). Rows are grouped into batches of
    exactly ``train.batch_size_per_gpu`` (a partial batch at the end of an epoch is completed from the next
    one), crops are normalised here, and masks + collation come from ``semlab.data.pipeline.collate``,
    run by a background thread up to ``data.collate_prefetch_batches`` batches ahead of the consumer
    (:mod:`semlab.data.pipeline.prefetch`; 0 = on the consumer's thread):
    the yielded
    dict is the batch dict of docs/architecture.md. ``rank`` (the caller's world rank: the Ray Train
    worker passes its own) seeds the shuffle and the masks.
    """
    rank = int(rank)
    batch_size = int(cfg.train.batch_size_per_gpu)
    collate = make_worker_collate(cfg, seed=_mix(seed, rank, 7))

    def stream() -> Iterator[dict[str, np.ndarray]]:
        epoch = int(epoch_start)
        while True:
            rows = 0
            for batch in epoch_batches(dataset_shard, cfg, seed, epoch, rank, batch_size):
                rows += len(batch["index"])
                yield batch
            if rows == 0:
                raise RayDataConfigError(
                    f"epoch {epoch}: the dataset shard of worker {rank} gave no rows; is the "
                    f"split empty or smaller than the number of workers?"
                )
            epoch += 1

    collated = (collate(batch) for batch in _rebatch(stream(), batch_size))
    # collation of the next batches overlaps the training step (data.collate_prefetch_batches ahead)
    depth = int(cfg.data.get("collate_prefetch_batches", 0))
    yield from prefetch_in_thread(collated, depth, name=f"semlab-collate-rank{rank}")


def make_worker_collate(cfg: Any, seed: int) -> Any:
    """A function numpy batch -> batch dict: normalises the crops, then ``collate_data_and_cast`` draws the
    iBOT masks (DINOv2 settings: a ``(G/p) x (G/p)`` grid, at most half of it per block mask, ratios
    ``ibot.mask_ratio_min_max`` on ``ibot.mask_sample_probability`` of the global crops) from a generator
    seeded with ``seed``. With ``data.normalize_on_device`` the crops stay uint8 (pinned when CUDA is
    available) and the training step normalises them on its device."""
    from semlab.data.pipeline.collate import collate_data_and_cast
    from semlab.data.pipeline.loaders import make_masking
    from semlab.data.pipeline.normalize import pin_crops

    mask_generator, n_tokens = make_masking(cfg)
    ratios = tuple(float(r) for r in cfg.ibot.mask_ratio_min_max)
    probability = float(cfg.ibot.mask_sample_probability)
    rng = np.random.default_rng(seed)

    on_device = bool(cfg.data.get("normalize_on_device", False))
    prepare = _uint8_tensor if on_device else _normalise

    def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        global_crops, local_crops = prepare(batch["global_crops"]), prepare(batch["local_crops"])
        samples = [
            (
                {
                    "global_crops": list(global_crops[b].unbind(0)),
                    "local_crops": list(local_crops[b].unbind(0)),
                },
                int(label),
                int(index),
            )
            for b, (label, index) in enumerate(zip(batch["label"], batch["index"]))
        ]
        collated = collate_data_and_cast(
            samples,
            mask_ratio_tuple=ratios,
            mask_probability=probability,
            dtype=torch.float32,
            n_tokens=n_tokens,
            mask_generator=mask_generator,
            random=rng,
        )
        return pin_crops(collated) if on_device else collated

    return collate


def _uint8_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 crops as a tensor, not normalised (``data.normalize_on_device``: the training device does it)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != torch.uint8:
        raise RayDataConfigError(
            "data.normalize_on_device needs uint8 crops from the Ray dataset "
            "(build_ray_dataset(emit_uint8=True), the default)"
        )
    return t
