"""Parquet shard preparation (semlab.data.datasets.shards) and the ``Parquet:`` dataset
(semlab.data.datasets.parquet)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from semlab.data.datasets import shards
from semlab.data.datasets.factory import make_dataset
from semlab.data.datasets.image_folder import DatasetError
from semlab.data.datasets.parquet import ParquetDataset, ShardFormatError, parse_parquet_dataset_str
from semlab.data.datasets.shards import prepare_shards

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(rng: np.random.Generator, w: int = 40, h: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo_str(tmp_path_factory) -> str:
    return f"Demo:root={tmp_path_factory.mktemp('demo')}:n_per_class=3"


@pytest.fixture
def folder_tree(tmp_path) -> Path:
    """ImageFolder tree: 3 classes, 7 images each (JPEG, one PNG), all valid."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in ("ant", "bee", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(7):
            data = _png(rng) if (c, i) == ("bee", 3) else _jpeg(rng)
            (root / c / f"{c}_{i}.{'png' if (c, i) == ('bee', 3) else 'JPEG'}").write_bytes(data)
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(out: Path) -> dict[str, str]:
    """sha256 of every file in a shard tree (bookkeeping records included), by relative path."""
    return {str(p.relative_to(out)): _sha(p) for p in sorted(out.rglob("*")) if p.is_file()}


def _read_rows(out: Path, split: str) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        rows += pq.read_table(out / shard["path"]).to_pylist()
    return rows


# ---- round trip and manifest --------------------------------------------------------------------------


def test_round_trip_bytes_labels_indices_and_manifest(tmp_path, demo_str):
    out = tmp_path / "shards"
    manifest = prepare_shards(demo_str, str(out), splits=["TRAIN", "VAL"], rows_per_shard=7, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["source"] == demo_str
    for split in ("TRAIN", "VAL"):
        source = make_dataset(shards.with_split(demo_str, split))
        entry = manifest["splits"][split]
        rows = _read_rows(out, split)
        n = len(source)
        assert entry["num_samples"] == n == len(rows) == entry["num_source_samples"]
        assert entry["skipped"] == {"count": 0, "samples": []}
        assert entry["class_ids"] == list(source.class_ids)
        assert entry["class_names"] == list(source.class_names)
        assert entry["class_counts"] == {
            source.class_ids[k]: v for k, v in Counter(source.labels.tolist()).items()
        }
        assert len(entry["shards"]) == -(-n // 7)
        assert [s["rows"] for s in entry["shards"]] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
        for shard in entry["shards"]:
            path = out / shard["path"]
            assert path.stat().st_size == shard["bytes"] and _sha(path) == shard["sha256"]
        # every sample exactly once, original bytes, label and class id
        assert sorted(r["index"] for r in rows) == list(range(n))
        for row in rows:
            data, label = source.get_encoded(row["index"])
            assert row["image"] == data
            assert row["label"] == label
            assert row["class_id"] == source.class_ids[label]
        # written in a seeded permutation (classes mixed), not in class-sorted dataset order
        order = [r["index"] for r in rows]
        assert order == np.random.default_rng(0).permutation(n).tolist()


def test_dataset_order_without_shuffle_and_file_uri(tmp_path, folder_tree):
    out = tmp_path / "shards"
    prepare_shards(
        f"ImageFolder:root={folder_tree}",
        f"file://{out}",
        rows_per_shard=4,
        shuffle_seed=None,
        progress=False,
    )
    rows = _read_rows(out, "TRAIN")
    assert [r["index"] for r in rows] == list(range(21))


def test_parquet_dataset_string_through_make_dataset(tmp_path, demo_str):
    out = tmp_path / "shards"
    prepare_shards(demo_str, str(out), splits=["TRAIN", "VAL"], rows_per_shard=5, progress=False)
    source = make_dataset(shards.with_split(demo_str, "VAL"))
    sizes = []
    ds = make_dataset(
        f"Parquet:path={out}:split=VAL",
        transform=lambda im: (sizes.append(im.size), im)[1],
        target_transform=lambda y: y + 100,
    )
    assert isinstance(ds, ParquetDataset) and len(ds) == len(source)
    assert ds.class_ids == list(source.class_ids) and ds.class_names == list(source.class_names)
    np.testing.assert_array_equal(ds.labels, source.labels[ds.source_indices])
    assert sorted(ds.source_indices.tolist()) == list(range(len(source)))
    for i in (0, 3, len(ds) - 1, 7, 2):  # out of order: row-group cache misses and hits
        j = int(ds.source_indices[i])
        assert ds.get_encoded(i) == source.get_encoded(j)
        image, target = ds[i]
        assert target == int(source.labels[j]) + 100
        assert np.array_equal(np.asarray(image), np.asarray(source[j][0]))
    assert sizes and all(s == source[0][0].size for s in sizes)
    # default split TRAIN, local path and file:// URI both work
    assert len(make_dataset(f"Parquet:path=file://{out}")) == len(
        make_dataset(shards.with_split(demo_str, "TRAIN"))
    )
    # the dataset pickles without open file handles (DataLoader workers)
    import pickle

    plain = make_dataset(f"Parquet:path={out}:split=VAL")
    plain.get_encoded(4)  # opens a file and fills the cache
    clone = pickle.loads(pickle.dumps(plain))
    assert clone._files == {} and clone.get_encoded(4) == ds.get_encoded(4)


def test_local_loader_reads_parquet_shards(tmp_path, demo_str):
    """The no-Ray training path (semlab.data.pipeline.loaders) works on a Parquet dataset string."""
    from semlab.config import load_config
    from semlab.data.pipeline.loaders import make_local_data_iterator

    out = tmp_path / "shards"
    prepare_shards(demo_str, str(out), rows_per_shard=8, progress=False)
    cfg = load_config(
        overrides=[
            f"train.dataset_path=Parquet:path={out}",
            "train.batch_size_per_gpu=4",
            "train.num_workers=0",
            "crops.global_crops_size=32",
            "crops.local_crops_size=16",
            "crops.local_crops_number=2",
            "student.patch_size=8",
        ]
    )
    it = make_local_data_iterator(cfg)
    n = len(make_dataset(shards.with_split(demo_str, "TRAIN")))
    assert n % 4 == 0, "the demo's TRAIN size must fill whole batches of 4 for this check"
    batches = [next(it) for _ in range(n // 4)]
    assert batches[0]["collated_global_crops"].shape == (8, 3, 32, 32)
    assert batches[0]["collated_local_crops"].shape == (8, 3, 16, 16)
    seen = sorted(int(i) for b in batches for i in b["indices"])
    assert seen == list(range(n))  # positions of the Parquet dataset, one epoch, each once


def test_parquet_dataset_errors(tmp_path, demo_str):
    out = tmp_path / "shards"
    prepare_shards(demo_str, str(out), splits=["VAL"], rows_per_shard=50, progress=False)
    with pytest.raises(ShardFormatError, match="unknown option.*colour"):
        ParquetDataset(path=str(out), split="VAL", colour="red")
    with pytest.raises(DatasetError, match="unknown key"):
        make_dataset(f"Parquet:path={out}:spilt=VAL")
    with pytest.raises(ShardFormatError, match="split 'TRAIN' is not in the shard tree.*VAL"):
        make_dataset(f"Parquet:path={out}")
    with pytest.raises(ShardFormatError, match="prepare_data.py"):
        make_dataset(f"Parquet:path={tmp_path / 'nowhere'}")
    with pytest.raises(ShardFormatError, match="not a Parquet dataset string"):
        parse_parquet_dataset_str("ImageFolder:root=/x")
    assert parse_parquet_dataset_str("Parquet:path=s3://bucket/a/b:split=VAL") == {
        "path": "s3://bucket/a/b",
        "split": "VAL",
    }


# ---- corrupt inputs -----------------------------------------------------------------------------------


def test_corrupt_files_are_counted_and_skipped(tmp_path, folder_tree):
    good = (folder_tree / "ant" / "ant_0.JPEG").read_bytes()
    (folder_tree / "ant" / "ant_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (folder_tree / "cat" / "notes.JPEG").write_text("this is not an image\n")
    out = tmp_path / "shards"
    manifest = prepare_shards(f"ImageFolder:root={folder_tree}", str(out), rows_per_shard=5, progress=False)
    entry = manifest["splits"]["TRAIN"]
    assert entry["num_source_samples"] == 23 and entry["num_samples"] == 21
    assert entry["skipped"]["count"] == 2
    names = sorted(Path(s["name"]).name for s in entry["skipped"]["samples"])
    assert names == ["ant_truncated.JPEG", "notes.JPEG"]
    assert all(s["error"] for s in entry["skipped"]["samples"])
    assert entry["class_counts"] == {"ant": 7, "bee": 7, "cat": 7}
    rows = _read_rows(out, "TRAIN")
    assert len(rows) == 21 and sum(s["rows"] for s in entry["shards"]) == 21
    skipped_indices = {s["index"] for s in entry["skipped"]["samples"]}
    assert skipped_indices.isdisjoint(r["index"] for r in rows)
    assert len(make_dataset(f"Parquet:path={out}")) == 21


def test_check_image_detects_truncation():
    data = _jpeg(np.random.default_rng(1), 200, 160)
    shards.check_image(data)
    for bad in (data[: len(data) * 3 // 4], b"GIF89a nonsense", b""):
        with pytest.raises(DatasetError):
            shards.check_image(bad)


# ---- resume, determinism, parallel ----------------------------------------------------------------------


def test_resume_repairs_and_gives_identical_output(tmp_path, folder_tree):
    src = f"ImageFolder:root={folder_tree}"
    out = tmp_path / "shards"
    prepare_shards(src, str(out), rows_per_shard=3, progress=False)
    reference = _tree_digest(out)
    parts = sorted((out / "TRAIN").glob("part-*.parquet"))
    assert len(parts) == 7
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    # interruption: manifest gone, one shard missing, one damaged (same size), a stray temp file
    (out / "manifest.json").unlink()
    parts[2].unlink()
    damaged = bytearray(parts[5].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    parts[5].write_bytes(bytes(damaged))
    (out / "TRAIN" / ".part-00001-of-00007.parquet.abc.tmp").write_bytes(b"partial")
    prepare_shards(src, str(out), rows_per_shard=3, progress=False)
    (out / "TRAIN" / ".part-00001-of-00007.parquet.abc.tmp").unlink()
    assert _tree_digest(out) == reference
    rewritten = {p.name for p in parts if p.stat().st_mtime_ns != mtimes[p.name]}
    assert rewritten == {parts[2].name, parts[5].name}  # the others were verified and kept


def test_interrupted_run_then_resume_matches_fresh_run(tmp_path, folder_tree, monkeypatch):
    src = f"ImageFolder:root={folder_tree}"
    fresh = tmp_path / "fresh"
    prepare_shards(src, str(fresh), rows_per_shard=4, progress=False)
    out = tmp_path / "resumed"
    real = shards.ensure_shard
    calls = []

    def crash_after_two(dataset, plan, k, fs, split_dir):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(k)
        return real(dataset, plan, k, fs, split_dir)

    monkeypatch.setattr(shards, "ensure_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(src, str(out), rows_per_shard=4, progress=False)
    assert not (out / "manifest.json").exists()
    assert len(list((out / "TRAIN").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(shards, "ensure_shard", real)
    prepare_shards(src, str(out), rows_per_shard=4, progress=False)
    assert _tree_digest(out) == _tree_digest(fresh)


@pytest.mark.slow
def test_parallel_workers_match_serial_and_plan_change_removes_stale(tmp_path, folder_tree):
    src = f"ImageFolder:root={folder_tree}"
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    prepare_shards(src, str(serial), rows_per_shard=4, progress=False)
    prepare_shards(src, str(parallel), rows_per_shard=4, workers=2, progress=False)
    assert _tree_digest(serial) == _tree_digest(parallel)
    # another shard size: old shards and their records are removed, the manifest lists the new ones
    manifest = prepare_shards(src, str(serial), rows_per_shard=10, progress=False)
    names = sorted(p.name for p in (serial / "TRAIN").glob("part-*.parquet"))
    assert names == [
        "part-00000-of-00003.parquet",
        "part-00001-of-00003.parquet",
        "part-00002-of-00003.parquet",
    ]
    assert len(list((serial / "TRAIN" / "_checksums").glob("*.json"))) == 3
    assert [s["path"] for s in manifest["splits"]["TRAIN"]["shards"]] == [f"TRAIN/{n}" for n in names]


def test_shard_size_target(tmp_path, folder_tree):
    """Rows per shard follow the size target from the mean encoded size of the probed samples."""
    ds = make_dataset(f"ImageFolder:root={folder_tree}")
    mean = np.mean([len(ds.get_encoded(i)[0]) for i in range(len(ds))])
    plan = shards.plan_split(ds, "TRAIN", shard_size_mb=6 * mean / 2**20)
    assert plan.rows_per_shard == 6 and plan.num_shards == 4
    with pytest.raises(ShardFormatError, match="shard size must be positive"):
        shards.plan_split(ds, "TRAIN", shard_size_mb=0)


def test_splits_of_a_splitless_dataset_are_refused(tmp_path, folder_tree):
    with pytest.raises(ShardFormatError, match="only one split"):
        prepare_shards(f"ImageFolder:root={folder_tree}", str(tmp_path / "o"), splits=["TRAIN", "VAL"])


# ---- the command line, ImageNet extra step ----------------------------------------------------------------


def _imagenet_tree(root: Path) -> None:
    rng = np.random.default_rng(3)
    for c in ("n01440764", "n01443537"):
        (root / "train" / c).mkdir(parents=True)
        (root / "val" / c).mkdir(parents=True)
        for i in range(1, 5):
            (root / "train" / c / f"{c}_{i}.JPEG").write_bytes(_jpeg(rng))
        vid = 1 if c == "n01440764" else 2
        (root / "val" / c / f"ILSVRC2012_val_{vid:08d}.JPEG").write_bytes(_jpeg(rng))
    (root / "labels.txt").write_text("n01440764,tench\nn01443537,goldfish\n")


def test_cli_imagenet_writes_extra_then_shards(tmp_path):
    root, extra, out = tmp_path / "imagenet", tmp_path / "extra", tmp_path / "shards"
    _imagenet_tree(root)
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import prepare_data
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    argv = [
        "--dataset",
        f"ImageNet:root={root}:extra={extra}",
        "--output",
        str(out),
        "--splits",
        "TRAIN",
        "VAL",
        "--shard-size-mb",
        "0.004",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert prepare_data.main(argv) == 0
    assert sorted(os.listdir(extra)) == sorted(
        f"{k}-{s}.npy" for k in ("entries", "class-ids", "class-names") for s in ("TRAIN", "VAL")
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"TRAIN": 8, "VAL": 2}
    assert manifest["splits"]["TRAIN"]["class_names"] == ["tench", "goldfish"]
    assert len(manifest["splits"]["TRAIN"]["shards"]) > 1  # the tiny size target splits the 8 images
    val = make_dataset(f"Parquet:path={out}:split=VAL")
    assert sorted(val.labels.tolist()) == [0, 1]
