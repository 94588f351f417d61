"""Parquet image shards: the on-disk format, the manifest, filesystems, and the ``Parquet:`` dataset.

A shard tree written by :mod:`semlab.data.datasets.shards` (``experiments/prepare_data.py``) looks like::

    <root>/manifest.json
    <root>/TRAIN/part-00000-of-00550.parquet ...
    <root>/TRAIN/_checksums/part-00000-of-00550.json ...   (resume bookkeeping, one per shard)
    <root>/VAL/...

Every shard row is one sample: ``image`` (the original encoded file bytes, never re-encoded),
``label`` (int64 class index), ``class_id`` (string, e.g. ``n01440764``) and ``index`` (int64, the
sample's index in the source dataset, stable across preparations). ``manifest.json`` lists, per
split, the class names/ids, per-class counts, the shards (path relative to the root, rows, bytes,
sha256) and the samples skipped as unreadable.

``<root>`` may be a local path, a ``file://`` URI, or any URI that ``pyarrow.fs.FileSystem.from_uri``
understands (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``); other schemes go
through fsspec when it is installed (``PyFileSystem(FSSpecHandler(fs))``). Credentials come from the
usual environment (AWS_* variables / ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``...).

``ParquetDataset`` is the ``Parquet:path=<root>[:split=TRAIN|VAL]`` dataset: random access for the
local (torch DataLoader) path and for evaluation. A read fetches the sample's Parquet row group (about
``ROW_GROUP_TARGET_BYTES``) and keeps the most recent ones up to ``CACHE_BYTES`` per process: sequential
access (evaluation) costs one read per row group, a dataset smaller than the cache is read once, and
shuffled access to a large dataset costs one row-group read per sample -- for large-scale training stream
the shards with ``data.backend=ray`` instead.
"""

from __future__ import annotations

import json
import posixpath
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from semlab.data.datasets.dataset_str import parse_dataset_str
from semlab.data.datasets.image_folder import DatasetError, decode_image

FORMAT_NAME = "semlab-parquet-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKSUM_DIR = "_checksums"
ROW_GROUP_TARGET_BYTES = 1024 * 1024
CACHE_BYTES = 64 * 1024 * 1024  # row groups kept per process by ParquetDataset
MAX_OPEN_FILES = 16


class ShardFormatError(DatasetError):
    """A shard tree, its manifest or a ``Parquet:`` dataset string is wrong; the message says what to do."""


# ---- filesystems ----------------------------------------------------------------------------------------


def open_filesystem(path: str | Path) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI.

    Local paths are made absolute. URIs go through ``pyarrow.fs.FileSystem.from_uri`` (``file``, ``s3``,
    ``gs``, ``hdfs``...); a scheme pyarrow does not know is handed to fsspec (when installed) and wrapped in
    ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``.
    """
    import pyarrow.fs as pafs

    path = str(path)
    if "://" not in path:
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner.rstrip("/") or "/"
    except Exception as arrow_error:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        try:
            import fsspec
        except ImportError:
            raise ShardFormatError(
                f"cannot open '{path}': pyarrow does not support this URI ({arrow_error}) and fsspec is not "
                f"installed; install fsspec and the scheme's package (e.g. s3fs, gcsfs) or use a local path"
            ) from arrow_error
        try:
            fs_spec, inner = fsspec.core.url_to_fs(path)
        except Exception as fsspec_error:
            raise ShardFormatError(
                f"cannot open '{path}': neither pyarrow ({arrow_error}) nor fsspec ({fsspec_error}) "
                f"support it; "
                f"check the URI scheme and that credentials are configured"
            ) from fsspec_error
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs_spec)), inner.rstrip("/") or "/"


def is_local(fs: Any) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def read_bytes(fs: Any, path: str) -> bytes:
    with fs.open_input_file(path) as handle:
        return handle.read()


def file_exists(fs: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


# ---- dataset strings and manifests ------------------------------------------------------------------------


def parse_parquet_dataset_str(dataset_str: str) -> dict[str, str]:
    """``"Parquet:path=<dir or URI>[:split=VAL]"`` -> ``{"path": ..., ["split": ...]}`` (URIs keep ``:``)."""
    name, options = parse_dataset_str(dataset_str)
    if name != "Parquet":
        raise ShardFormatError(
            f"'{dataset_str}' is not a Parquet dataset string; expected "
            f"'Parquet:path=<dir or URI>[:split=TRAIN|VAL]'"
        )
    return options


def load_manifest(root: str | Path) -> tuple[dict[str, Any], Any, str]:
    """Read ``<root>/manifest.json``; returns ``(manifest, filesystem, root path inside it)``."""
    fs, base = open_filesystem(root)
    manifest_path = posixpath.join(base, MANIFEST_NAME)
    if not file_exists(fs, manifest_path):
        raise ShardFormatError(
            f"no {MANIFEST_NAME} under '{root}': it is not a finished shard tree. Prepare one with "
            f"'python experiments/prepare_data.py --dataset <dataset string> --output {root}' "
            f"(an interrupted preparation resumes when rerun with the same arguments)"
        )
    try:
        manifest = json.loads(read_bytes(fs, manifest_path))
    except json.JSONDecodeError as error:
        raise ShardFormatError(
            f"{manifest_path} is not valid JSON ({error}); rerun prepare_data.py"
        ) from error
    if manifest.get("format") != FORMAT_NAME:
        raise ShardFormatError(
            f"{manifest_path} is not a semlab shard manifest (format={manifest.get('format')!r})"
        )
    if int(manifest.get("version", -1)) > FORMAT_VERSION:
        raise ShardFormatError(
            f"{manifest_path} has format version {manifest.get('version')}, newer than this "
            f"semlab reads ({FORMAT_VERSION}); upgrade semlab"
        )
    return manifest, fs, base


def split_entry(manifest: dict[str, Any], split: str, root: str | Path) -> dict[str, Any]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardFormatError(
            f"split '{split}' is not in the shard tree '{root}' (it has: "
            f"{', '.join(sorted(splits)) or 'none'}); prepare it with "
            f"'experiments/prepare_data.py ... --splits {split}'"
        )
    return splits[split]


def shard_paths(root: str | Path, split: str = "TRAIN") -> tuple[list[str], Any, dict[str, Any]]:
    """Full shard paths (inside the filesystem) of one split, the filesystem, the split's manifest entry."""
    manifest, fs, base = load_manifest(root)
    entry = split_entry(manifest, split, root)
    return [posixpath.join(base, s["path"]) for s in entry["shards"]], fs, entry


# ---- the dataset ----------------------------------------------------------------------------------------


class ParquetDataset:
    """Random-access dataset over one split of a shard tree (``Parquet:path=<root>:split=<SPLIT>``).

    ``dataset[i]`` -> ``(transform(PIL RGB image), target_transform(label))``; ``get_encoded(i)`` ->
    ``(original bytes, label)``. Position ``i`` follows the shard order (the preparation's sample order);
    ``source_indices[i]`` is the sample's index in the source dataset. ``labels`` (int64 array),
    ``class_names`` and ``class_ids`` come from the manifest.
    """

    def __init__(
        self,
        path: str,
        split: str = "TRAIN",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ShardFormatError(
                f"unknown option(s) for the Parquet dataset: {', '.join(sorted(kwargs))}; "
                f"valid: path, split (e.g. 'Parquet:path=/data/shards:split=VAL')"
            )
        split = str(split).upper()
        self.root = str(path)
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        paths, fs, entry = shard_paths(self.root, split)
        self._fs = fs
        self._paths = paths
        self.class_names: list[str] = list(entry["class_names"])
        self.class_ids: list[str] = list(entry["class_ids"])
        self._rows = np.array([int(s["rows"]) for s in entry["shards"]], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._rows)])
        labels, indices, groups = [], [], []
        import pyarrow.parquet as pq

        for k, shard_path in enumerate(paths):
            with fs.open_input_file(shard_path) as handle:
                pf = pq.ParquetFile(handle)
                if pf.metadata.num_rows != self._rows[k]:
                    raise ShardFormatError(
                        f"{shard_path} has {pf.metadata.num_rows} rows, the manifest says {self._rows[k]}: "
                        f"the "
                        f"shard tree is inconsistent; rerun prepare_data.py on it to repair"
                    )
                table = pf.read(columns=["label", "index"])
                labels.append(table.column("label").to_numpy())
                indices.append(table.column("index").to_numpy())
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
                groups.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        self.source_indices = np.concatenate(indices).astype(np.int64) if indices else np.zeros(0, np.int64)
        self._group_offsets = groups
        self._cache: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()
        self._cache_bytes = 0
        self._files: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return (
            f"ParquetDataset(path={self.root!r}, split={self.split!r}, samples={len(self)}, "
            f"shards={len(self._paths)})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"], state["_cache_bytes"] = OrderedDict(), 0
        state["_files"] = OrderedDict()  # open files are per process (DataLoader workers reopen lazily)
        return state

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        i = i % n
        shard = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return shard, i - int(self._offsets[shard])

    def _row_group(self, shard: int, group: int) -> list[bytes]:
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        import pyarrow.parquet as pq

        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self._fs.open_input_file(self._paths[shard]))
            while len(self._files) > MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        images = self._files[shard].read_row_group(group, columns=["image"]).column("image").to_pylist()
        self._cache[key] = images
        self._cache_bytes += sum(len(x) for x in images)
        while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
            self._cache_bytes -= sum(len(x) for x in self._cache.popitem(last=False)[1])
        return images

    def get_encoded(self, i: int) -> tuple[bytes, int]:
        shard, row = self._locate(int(i))
        bounds = self._group_offsets[shard]
        group = int(np.searchsorted(bounds, row, side="right") - 1)
        data = self._row_group(shard, group)[row - int(bounds[group])]
        return data, int(self.labels[self._offsets[shard] + row])

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        data, label = self.get_encoded(i)
        image = decode_image(data, f"sample {i} of {self!r}")
        if self.transform is not None:
            image = self.transform(image)
        target: Any = label
        if self.target_transform is not None:
            target = self.target_transform(label)
        return image, target
