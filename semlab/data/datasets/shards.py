"""Prepare Parquet shards from any semlab dataset: resumable, parallel, atomic, deterministic.

For each split, the samples are written in a fixed order ``order`` (a permutation of the dataset
indices drawn from ``numpy.random.default_rng(shuffle_seed)``, or the identity with
``shuffle_seed=None``) so that every shard mixes classes (ImageNet's own order is sorted by class).
Shard ``k`` holds positions ``[k R, min((k+1) R, N))`` of that order, ``R`` rows per shard, with
``R = max(1, floor(target_bytes / mean_bytes))`` where ``mean_bytes`` is the mean encoded size of up
to 64 evenly spaced samples (or ``R`` given explicitly). Row groups hold ``max(1, floor(1 MiB /
mean_bytes))`` rows (``ROW_GROUP_TARGET_BYTES``). A shard is therefore a deterministic function of
(dataset, order, R): rerunning gives byte-identical files.

Each shard is written to a temporary file and renamed into place (``atomic_path``), then a small
record ``<split>/_checksums/<shard>.json`` (rows, bytes, sha256, plan fingerprint, skipped samples,
per-class counts) is written atomically. On a rerun a shard is kept only when its record exists, was
made for the same plan, and the file's size and sha256 match; otherwise it is rewritten. Shards that do
not belong to the plan (another shard size) are deleted. ``manifest.json`` is written last.

An image that cannot be read (``PIL.Image.verify`` plus a decode -- a JPEG decode in draft mode still
parses the whole entropy-coded stream, so truncation is caught) is logged, skipped and listed in the
manifest with its file name and the error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semlab.data.datasets.image_folder import CorruptImageError, DatasetError
from semlab.data.datasets.parquet import (
    CHECKSUM_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ROW_GROUP_TARGET_BYTES,
    ShardFormatError,
    file_exists,
    is_local,
    open_filesystem,
    read_bytes,
)
from semlab.utils.atomic import atomic_path, atomic_write_bytes

logger = logging.getLogger(__name__)

PROBE_SAMPLES = 64
SPLIT_AWARE_DATASETS = ("ImageNet", "Demo", "Parquet")


# ---- pure helpers ---------------------------------------------------------------------------------------


def check_image(data: bytes) -> None:
    """Raise :class:`CorruptImageError` unless ``data`` is an image PIL can verify and decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            if image.format in ("JPEG", "MPO"):
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptImageError(f"{type(error).__name__}: {error}") from error


def with_split(dataset_str: str, split: str) -> str:
    """The dataset string of one split: ``split=<split>`` set for ImageNet/Demo/Parquet, others as is."""
    name, *segments = dataset_str.split(":")
    if name not in SPLIT_AWARE_DATASETS:
        return dataset_str
    kept = [seg for seg in segments if seg and not seg.startswith("split=")]
    return ":".join([name, f"split={split}", *kept])


def default_splits(dataset_str: str) -> list[str]:
    """The split named in the string (``split=VAL``), else ``["TRAIN"]``."""
    for part in dataset_str.split(":")[1:]:
        if part.startswith("split="):
            return [part.split("=", 1)[1].upper()]
    return ["TRAIN"]


def ensure_imagenet_extra(dataset_str: str, force: bool = False) -> dict[str, int] | None:
    """For an ``ImageNet:...`` string: write the DINOv2 ``extra`` index files (``entries-<SPLIT>.npy`` ...)
    with :func:`semlab.data.datasets.imagenet.dump_imagenet_extra` when the extra folder has none
    (or ``force``).
    Returns ``{split: images}`` when it wrote them, else None; other dataset strings are left alone."""
    from semlab.data.datasets.dataset_str import parse_dataset_str

    if not dataset_str.startswith("ImageNet:"):
        if force:
            raise DatasetError(f"--extra applies to ImageNet dataset strings only, not '{dataset_str}'")
        return None
    _, options = parse_dataset_str(with_split(dataset_str, "TRAIN"))
    root = Path(options["root"]).expanduser()
    extra = Path(options.get("extra", options["root"])).expanduser()
    if not force and extra.is_dir() and any(extra.glob("entries-*.npy")):
        return None
    from semlab.data.datasets.imagenet import dump_imagenet_extra

    logger.info("writing the ImageNet extra index of %s into %s", root, extra)
    counts = dump_imagenet_extra(root, extra)
    logger.info("ImageNet extra index: %s", ", ".join(f"{k} {v} images" for k, v in counts.items()))
    return counts


def sample_name(dataset: Any, index: int) -> str:
    """The file of sample ``index`` when the dataset has one (``dataset.path(i)``), else ``#<index>``."""
    path = getattr(dataset, "path", None)
    return str(path(index)) if callable(path) else f"#{index}"


def sha256_file(fs: Any, path: str, chunk: int = 8 * 1024 * 1024) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file on a pyarrow filesystem."""
    digest = hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


# ---- the plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """Which samples go into which shard, for one split (see the module docstring)."""

    split: str
    order: np.ndarray  # dataset indices in write order
    rows_per_shard: int
    rows_per_row_group: int
    class_ids: tuple[str, ...]
    shuffle_seed: int | None

    @property
    def num_shards(self) -> int:
        return max(1, -(-len(self.order) // self.rows_per_shard))

    def shard_name(self, k: int) -> str:
        return f"part-{k:05d}-of-{self.num_shards:05d}.parquet"

    def positions(self, k: int) -> tuple[int, int]:
        return k * self.rows_per_shard, min((k + 1) * self.rows_per_shard, len(self.order))

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(
            json.dumps(
                [
                    FORMAT_VERSION,
                    self.split,
                    self.rows_per_shard,
                    self.rows_per_row_group,
                    list(self.class_ids),
                ]
            ).encode()
        )
        h.update(np.ascontiguousarray(self.order, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def plan_split(
    dataset: Any,
    split: str,
    shard_size_mb: float = 256.0,
    rows_per_shard: int | None = None,
    shuffle_seed: int | None = 0,
) -> ShardPlan:
    """Deterministic plan for ``dataset``: the sample order and the rows per shard / row group."""
    n = len(dataset)
    if n == 0:
        raise ShardFormatError(f"split {split}: the dataset is empty, nothing to write")
    order = np.arange(n, dtype=np.int64)
    if shuffle_seed is not None:
        order = np.random.default_rng(int(shuffle_seed)).permutation(n).astype(np.int64)
    probe = np.unique(np.linspace(0, n - 1, min(n, PROBE_SAMPLES)).astype(np.int64))
    sizes = []
    for i in probe:
        try:
            sizes.append(len(dataset.get_encoded(int(i))[0]))
        except Exception:  # an unreadable probe sample only drops out of the estimate
            continue
    mean_bytes = float(np.mean(sizes)) if sizes else 1.0
    if rows_per_shard is None:
        if shard_size_mb <= 0:
            raise ShardFormatError(f"shard size must be positive, got {shard_size_mb} MB")
        rows_per_shard = int(shard_size_mb * 1024 * 1024 // max(mean_bytes, 1.0))
    rows_per_shard = int(min(max(1, rows_per_shard), n))
    rows_per_group = int(min(rows_per_shard, max(1, ROW_GROUP_TARGET_BYTES // max(int(mean_bytes), 1))))
    return ShardPlan(split, order, rows_per_shard, rows_per_group, tuple(dataset.class_ids), shuffle_seed)


# ---- writing one shard ------------------------------------------------------------------------------------


def _schema():
    import pyarrow as pa

    return pa.schema(
        [("image", pa.binary()), ("label", pa.int64()), ("class_id", pa.string()), ("index", pa.int64())]
    )


def _write_parquet(dataset: Any, plan: ShardPlan, k: int, local_path: str) -> tuple[int, list[dict], dict]:
    """Write shard ``k`` to a local file; returns (rows, skipped samples, per-class counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start, end = plan.positions(k)
    schema = _schema()
    skipped: list[dict] = []
    counts: Counter[str] = Counter()
    rows = 0
    columns: dict[str, list] = {name: [] for name in schema.names}

    with pq.ParquetWriter(
        local_path,
        schema,
        compression={"image": "NONE", "label": "SNAPPY", "class_id": "SNAPPY", "index": "SNAPPY"},
        write_statistics=["label", "index"],
        use_dictionary=["class_id"],
        write_page_checksum=True,
    ) as writer:

        def flush() -> None:
            if columns["image"]:
                writer.write_table(pa.table(columns, schema=schema), row_group_size=plan.rows_per_row_group)
                for values in columns.values():
                    values.clear()

        for pos in range(start, end):
            index = int(plan.order[pos])
            try:
                data, label = dataset.get_encoded(index)
                check_image(data)
            except Exception as error:
                name = sample_name(dataset, index)
                logger.warning(
                    "split %s: skipping unreadable sample %d (%s): %s", plan.split, index, name, error
                )
                skipped.append({"index": index, "name": name, "error": str(error)[:300]})
                continue
            label = int(label)
            class_id = plan.class_ids[label]
            columns["image"].append(bytes(data))
            columns["label"].append(label)
            columns["class_id"].append(class_id)
            columns["index"].append(index)
            counts[class_id] += 1
            rows += 1
            if len(columns["image"]) >= plan.rows_per_row_group:
                flush()
        flush()
    return rows, skipped, dict(sorted(counts.items()))


def _publish(fs: Any, local_tmp: str, dest: str) -> None:
    """Upload a finished local file to ``dest`` on a remote filesystem: temp object, then move."""
    tmp_dest = f"{dest}.tmp-{os.getpid()}"
    with open(local_tmp, "rb") as src, fs.open_output_stream(tmp_dest) as out:
        while block := src.read(8 * 1024 * 1024):
            out.write(block)
    fs.move(tmp_dest, dest)


def _write_json(fs: Any, path: str, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    if is_local(fs):
        atomic_write_bytes(path, data)
    else:
        with tempfile.TemporaryDirectory(prefix="semlab-json-") as tmpdir:
            local = os.path.join(tmpdir, "f.json")
            with open(local, "wb") as handle:
                handle.write(data)
            _publish(fs, local, path)


def _record_path(split_dir: str, shard_name: str) -> str:
    return posixpath.join(split_dir, CHECKSUM_DIR, shard_name.removesuffix(".parquet") + ".json")


def verify_shard(fs: Any, split_dir: str, plan: ShardPlan, k: int) -> dict | None:
    """The shard's record if the shard on disk is complete and matches it (size + sha256), else None."""
    name = plan.shard_name(k)
    record_path = _record_path(split_dir, name)
    shard_path = posixpath.join(split_dir, name)
    if not (file_exists(fs, record_path) and file_exists(fs, shard_path)):
        return None
    try:
        record = json.loads(read_bytes(fs, record_path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if record.get("fingerprint") != plan.fingerprint or record.get("name") != name:
        return None
    if fs.get_file_info(shard_path).size != record.get("bytes"):
        return None
    digest, _ = sha256_file(fs, shard_path)
    return record if digest == record.get("sha256") else None


def ensure_shard(dataset: Any, plan: ShardPlan, k: int, fs: Any, split_dir: str) -> tuple[dict, bool]:
    """Keep shard ``k`` if verified, else (re)write it. Returns (record, written)."""
    record = verify_shard(fs, split_dir, plan, k)
    if record is not None:
        return record, False
    name = plan.shard_name(k)
    dest = posixpath.join(split_dir, name)
    if is_local(fs):
        with atomic_path(dest) as tmp:
            rows, skipped, counts = _write_parquet(dataset, plan, k, str(tmp))
            digest, size = sha256_file(fs, str(tmp))
    else:
        with tempfile.TemporaryDirectory(prefix="semlab-shard-") as tmpdir:
            local = os.path.join(tmpdir, name)
            rows, skipped, counts = _write_parquet(dataset, plan, k, local)
            digest, size = sha256_file(open_filesystem(local)[0], local)
            _publish(fs, local, dest)
    start, end = plan.positions(k)
    record = {
        "name": name,
        "rows": rows,
        "bytes": size,
        "sha256": digest,
        "fingerprint": plan.fingerprint,
        "positions": [start, end],
        "skipped": skipped,
        "class_counts": counts,
    }
    _write_json(fs, _record_path(split_dir, name), record)
    return record, True


# ---- worker processes -----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(dataset_str: str, plan: ShardPlan, output: str, split_dir: str) -> None:
    from semlab.data.datasets.factory import make_dataset

    _WORKER.update(
        dataset=make_dataset(dataset_str), plan=plan, fs=open_filesystem(output)[0], split_dir=split_dir
    )


def _worker_ensure(k: int) -> tuple[int, dict, bool]:
    record, written = ensure_shard(
        _WORKER["dataset"], _WORKER["plan"], k, _WORKER["fs"], _WORKER["split_dir"]
    )
    return k, record, written


# ---- one split, then everything ----------------------------------------------------------------------------


def _remove_stale(fs: Any, split_dir: str, plan: ShardPlan) -> None:
    """Delete shards and records of another plan (e.g. a different shard size) from the split folder."""
    import pyarrow.fs as pafs

    wanted = {plan.shard_name(k) for k in range(plan.num_shards)}
    for folder, suffix in ((split_dir, ".parquet"), (posixpath.join(split_dir, CHECKSUM_DIR), ".json")):
        if fs.get_file_info(folder).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(folder)):
            base = info.base_name
            shard = base.removesuffix(".json") + ".parquet" if suffix == ".json" else base
            if base.startswith("part-") and base.endswith(suffix) and shard not in wanted:
                logger.info("removing %s: not part of the current plan", info.path)
                fs.delete_file(info.path)


ShardRunner = Callable[[str, "ShardPlan", str, str, list[int]], Iterable[tuple[int, dict, bool]]]


def prepare_split(
    dataset_str: str,
    split: str,
    output: str,
    shard_size_mb: float = 256.0,
    workers: int = 1,
    rows_per_shard: int | None = None,
    shuffle_seed: int | None = 0,
    progress: bool = True,
    runner: ShardRunner | None = None,
) -> dict[str, Any]:
    """Write (or repair) the shards of one split; returns its manifest entry.

    ``runner(split_str, plan, output, split_dir, shard_indices)`` -> ``(k, record, written)`` for each
    shard, in any order, runs :func:`ensure_shard` elsewhere (``semlab.orchestration.shard_preparation``
    spreads it over a Ray cluster as Ray Data work); default: this process, or ``workers`` processes.
    """
    from tqdm import tqdm

    from semlab.data.datasets.factory import make_dataset

    split_str = with_split(dataset_str, split)
    dataset = make_dataset(split_str)
    plan = plan_split(dataset, split, shard_size_mb, rows_per_shard, shuffle_seed)
    fs, base = open_filesystem(output)
    split_dir = posixpath.join(base, split)
    fs.create_dir(posixpath.join(split_dir, CHECKSUM_DIR), recursive=True)
    _remove_stale(fs, split_dir, plan)
    logger.info(
        "split %s: %d samples from %s -> %d shards of %d rows under %s/%s",
        split,
        len(plan.order),
        split_str,
        plan.num_shards,
        plan.rows_per_shard,
        output,
        split,
    )

    records: dict[int, dict] = {}
    written_images = 0
    kept = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(plan.order), unit="img", desc=f"{split}", disable=not progress, mininterval=1.0)

    def done(k: int, record: dict, written: bool) -> None:
        nonlocal written_images, kept
        records[k] = record
        start, end = plan.positions(k)
        bar.update(end - start)
        if written:
            written_images += end - start
        else:
            kept += 1
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{written_images / elapsed:.0f} img/s written, {kept} shards kept")

    try:
        if runner is not None:
            for item in runner(split_str, plan, output, split_dir, list(range(plan.num_shards))):
                done(*item)
        elif workers <= 1 or plan.num_shards == 1:
            for k in range(plan.num_shards):
                done(k, *ensure_shard(dataset, plan, k, fs, split_dir))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=min(workers, plan.num_shards),
                mp_context=context,
                initializer=_init_worker,
                initargs=(split_str, plan, output, split_dir),
            ) as pool:
                futures = [pool.submit(_worker_ensure, k) for k in range(plan.num_shards)]
                for future in as_completed(futures):
                    done(*future.result())
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    logger.info(
        "split %s: %d shards (%d kept, %d written), %d images written in %.1f s (%.1f images/s)",
        split,
        plan.num_shards,
        kept,
        plan.num_shards - kept,
        written_images,
        elapsed,
        written_images / max(elapsed, 1e-9),
    )
    return _split_entry(split, split_str, plan, [records[k] for k in range(plan.num_shards)], dataset)


def _split_entry(split: str, split_str: str, plan: ShardPlan, records: list[dict], dataset: Any) -> dict:
    counts: Counter[str] = Counter()
    skipped: list[dict] = []
    for record in records:
        counts.update(record["class_counts"])
        skipped.extend(record["skipped"])
    class_ids = list(plan.class_ids)
    return {
        "source": split_str,
        "num_samples": int(sum(r["rows"] for r in records)),
        "num_source_samples": len(plan.order),
        "class_names": [str(c) for c in dataset.class_names],
        "class_ids": class_ids,
        "class_counts": {c: int(counts.get(c, 0)) for c in class_ids},
        "rows_per_shard": plan.rows_per_shard,
        "rows_per_row_group": plan.rows_per_row_group,
        "shuffle_seed": plan.shuffle_seed,
        "fingerprint": plan.fingerprint,
        "shards": [
            {"path": f"{split}/{r['name']}", "rows": r["rows"], "bytes": r["bytes"], "sha256": r["sha256"]}
            for r in records
        ],
        "skipped": {"count": len(skipped), "samples": sorted(skipped, key=lambda s: s["index"])},
    }


def prepare_shards(
    dataset_str: str,
    output: str,
    splits: Iterable[str] | None = None,
    shard_size_mb: float = 256.0,
    workers: int = 1,
    rows_per_shard: int | None = None,
    shuffle_seed: int | None = 0,
    progress: bool = True,
    runner: ShardRunner | None = None,
) -> dict[str, Any]:
    """Prepare every requested split, then write ``manifest.json`` (merged with splits already there).

    ``output`` is a local path or a URI (``file://``, ``s3://``, ``gs://``...). Returns the manifest.
    """
    splits = [s.upper() for s in (splits or default_splits(dataset_str))]
    if len(splits) > 1 and dataset_str.split(":", 1)[0] not in SPLIT_AWARE_DATASETS:
        raise ShardFormatError(
            f"'{dataset_str}' has no splits, so only one split name can be given (got {splits}); prepare "
            f"each "
            f"folder separately, e.g. --dataset ImageFolder:root=<dir>/val --splits VAL"
        )
    entries = {
        split: prepare_split(
            dataset_str, split, output, shard_size_mb, workers, rows_per_shard, shuffle_seed, progress, runner
        )
        for split in splits
    }
    fs, base = open_filesystem(output)
    manifest_path = posixpath.join(base, MANIFEST_NAME)
    previous: dict[str, Any] = {}
    if file_exists(fs, manifest_path):
        try:
            old = json.loads(read_bytes(fs, manifest_path))
            if old.get("format") == FORMAT_NAME:
                previous = old.get("splits", {})
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; it is replaced", manifest_path)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": dataset_str,
        "columns": {
            "image": "original encoded bytes",
            "label": "int64 class index",
            "class_id": "string",
            "index": "int64 index in the source dataset",
        },
        "splits": {**previous, **entries},
    }
    _write_json(fs, manifest_path, manifest)
    return manifest
