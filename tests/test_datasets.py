"""Dataset strings, the ImageNet layout and its extra folder, ImageFolder, and the embedded demo dataset."""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semlab.data import (
    CorruptImageError,
    DatasetError,
    DemoDataset,
    ImageFolder,
    ImageNet,
    default_demo_root,
    dump_imagenet_extra,
    ensure_demo_split,
    make_dataset,
    parse_dataset_str,
)
from semlab.data.datasets.demo import DEMO_CLASSES, DEMO_IMAGE_SIZE, DEMO_VERSION, generate_demo_split


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---- dataset strings -------------------------------------------------------------------------------


def test_parse_dataset_strings() -> None:
    assert parse_dataset_str("ImageNet:split=TRAIN:root=/d:extra=/e") == (
        "ImageNet",
        {"split": "TRAIN", "root": "/d", "extra": "/e"},
    )
    assert parse_dataset_str("ImageFolder:root=/x/y") == ("ImageFolder", {"root": "/x/y"})
    assert parse_dataset_str("Demo:split=VAL") == ("Demo", {"split": "VAL"})
    # a value holding ':' (a URI) is kept whole
    assert parse_dataset_str("Parquet:path=s3://bucket/shards:split=VAL") == (
        "Parquet",
        {"path": "s3://bucket/shards", "split": "VAL"},
    )


@pytest.mark.parametrize(
    ("dataset_str", "expected"),
    [
        ("ImageNt:split=TRAIN", "unknown dataset 'ImageNt'"),
        ("ImageNt:split=TRAIN", "expected one of ImageNet, ImageFolder, Demo, Parquet"),
        ("ImageNet:split=TRAIN:rot=/d", "unknown key 'rot' for dataset ImageNet"),
        ("ImageNet:split=TRAIN", "missing root"),
        ("ImageFolder:root=/a:root=/b", "given twice"),
        ("ImageFolder:/a", "not key=value"),
        ("ImageFolder:root=", "empty value"),
        ("", "empty dataset string"),
        ("Demo:split=TEST", "unknown Demo split 'TEST'"),
        ("Demo:split=TRAIN:n_per_class=zero", "n_per_class must be a positive integer"),
        ("ImageNet:split=TRIAN:root=/d", "unknown ImageNet split 'TRIAN'"),
    ],
)
def test_dataset_string_errors(dataset_str: str, expected: str) -> None:
    with pytest.raises(DatasetError, match=expected.replace("(", r"\(")):
        make_dataset(dataset_str)


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(DatasetError, match="did you mean 'ImageNet'"):
        parse_dataset_str("ImageNt:split=TRAIN")
    assert issubclass(DatasetError, ValueError)


def test_missing_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        make_dataset(f"ImageFolder:root={tmp_path / 'nope'}")
    with pytest.raises(DatasetError, match="does not exist"):
        make_dataset(f"ImageNet:split=TRAIN:root={tmp_path / 'nope'}:extra={tmp_path}")
    (tmp_path / "root").mkdir()
    with pytest.raises(DatasetError, match="extra folder .* does not exist"):
        make_dataset(f"ImageNet:split=TRAIN:root={tmp_path / 'root'}:extra={tmp_path / 'missing'}")
    with pytest.raises(DatasetError, match="no entries-TRAIN.npy"):
        make_dataset(f"ImageNet:split=TRAIN:root={tmp_path / 'root'}:extra={tmp_path}")


# ---- ImageNet ----------------------------------------------------------------------------------------

CLASSES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish", "n09999999": "never seen"}


def make_fake_imagenet(root: Path, flat_val: bool = False) -> dict[str, list[tuple[str, int]]]:
    """A tiny DINOv2-layout tree: 2 of the 3 listed classes, train/val/test, distinct colours per file."""
    files: dict[str, list[tuple[str, int]]] = {"TRAIN": [], "VAL": []}
    root.mkdir(parents=True)
    (root / "labels.txt").write_text("".join(f"{k},{v}\n" for k, v in CLASSES.items()))
    colour = 0
    for label, wnid in enumerate(["n01440764", "n01443537"]):
        for n in (10026, 118, 7):
            colour += 20
            path = write(root / f"train/{wnid}/{wnid}_{n}.JPEG", jpeg_bytes((colour, 0, 0)))
            files["TRAIN"].append((path.name, label))
    val_rows = [("n01443537", 3), ("n01440764", 1), ("n01440764", 12)]
    for wnid, n in val_rows:
        colour += 20
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        write(root / "val" / (name if flat_val else f"{wnid}/{name}"), jpeg_bytes((0, colour, 0)))
    if flat_val:
        lines = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{n:08d},{w} 1 2 3 4" for w, n in val_rows]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    for n in (2, 1):
        write(root / f"test/ILSVRC2012_test_{n:08d}.JPEG", jpeg_bytes((0, 0, 200)))
    return files


def test_imagenet_extra_round_trip(tmp_path: Path) -> None:
    root, extra = tmp_path / "imagenet", tmp_path / "extra"
    make_fake_imagenet(root)
    counts = dump_imagenet_extra(root, extra)
    assert counts == {"TRAIN": 6, "VAL": 3, "TEST": 2}
    assert sorted(p.name for p in extra.iterdir()) == sorted(
        [f"entries-{s}.npy" for s in ("TRAIN", "VAL", "TEST")]
        + [f"class-{k}-{s}.npy" for k in ("ids", "names") for s in ("TRAIN", "VAL")]
    )  # no temporary files left behind

    entries = np.load(extra / "entries-TRAIN.npy")
    assert entries.dtype.names == ("actual_index", "class_index", "class_id", "class_name")
    assert entries.dtype["actual_index"] == np.dtype("<u4") and entries.dtype["class_index"] == np.dtype(
        "<u4"
    )
    assert entries.dtype["class_id"].kind == "U" and entries.dtype["class_name"].kind == "U"
    # ImageFolder order: sorted classes, file names sorted as strings
    assert entries["actual_index"].tolist() == [10026, 118, 7, 10026, 118, 7]
    assert entries["class_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert entries["class_name"][0] == "tench, Tinca tinca"
    assert np.load(extra / "class-ids-TRAIN.npy").tolist() == sorted(CLASSES)
    assert np.load(extra / "class-names-VAL.npy").tolist() == [CLASSES[k] for k in sorted(CLASSES)]
    test_entries = np.load(extra / "entries-TEST.npy")
    assert test_entries["actual_index"].tolist() == [1, 2]
    assert test_entries["class_index"].tolist() == [2**32 - 1] * 2

    train = make_dataset(f"ImageNet:split=TRAIN:root={root}:extra={extra}")
    assert isinstance(train, ImageNet) and len(train) == 6
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.class_ids == sorted(CLASSES) and train.class_names[1] == "goldfish"
    data, label = train.get_encoded(1)
    assert data == (root / "train/n01440764/n01440764_118.JPEG").read_bytes() and label == 0
    image, label = train[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (24, 16) and label == 1

    val = make_dataset(f"ImageNet:split=val:root={root}:extra={extra}", transform=lambda im: im.size)
    assert val.labels.tolist() == [0, 0, 1] and [val[i][0] for i in range(3)] == [(24, 16)] * 3
    assert val.path(0) == root / "val/n01440764/ILSVRC2012_val_00000001.JPEG"
    test = make_dataset(f"ImageNet:split=TEST:root={root}:extra={extra}")
    assert test.labels.tolist() == [-1, -1] and test.class_ids == sorted(CLASSES)


def test_imagenet_flat_val_layout(tmp_path: Path) -> None:
    root, extra = tmp_path / "imagenet", tmp_path / "extra"
    make_fake_imagenet(root, flat_val=True)
    dump_imagenet_extra(root, extra)
    val = ImageNet("VAL", root, extra)
    assert val.labels.tolist() == [0, 1, 0]  # flat: sorted by file name, labels from the solution file
    assert val.path(1) == root / "val/ILSVRC2012_val_00000003.JPEG"
    assert val.get_encoded(1) == ((root / "val/ILSVRC2012_val_00000003.JPEG").read_bytes(), 1)
    # without per-image labels the flat layout is refused with a hint
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(DatasetError, match="flat"):
        dump_imagenet_extra(root, tmp_path / "extra2")


def test_imagenet_without_labels_file_and_bad_names(tmp_path: Path) -> None:
    root, extra = tmp_path / "imagenet", tmp_path / "extra"
    make_fake_imagenet(root)
    (root / "labels.txt").unlink()
    dump_imagenet_extra(root, extra)
    train = ImageNet("TRAIN", root, extra)
    assert train.class_ids == train.class_names == ["n01440764", "n01443537"]
    write(root / "train/n01440764/n01440764_0042.JPEG", jpeg_bytes((1, 2, 3)))
    with pytest.raises(DatasetError, match="no leading zeros"):
        dump_imagenet_extra(root, extra)


def test_imagenet_empty_split_and_missing_image(tmp_path: Path) -> None:
    root, extra = tmp_path / "imagenet", tmp_path / "extra"
    make_fake_imagenet(root)
    dump_imagenet_extra(root, extra)
    (root / "train/n01443537/n01443537_7.JPEG").unlink()
    train = ImageNet("TRAIN", root, extra)
    with pytest.raises(DatasetError, match="n01443537_7.JPEG"):
        train.get_encoded(5)
    empty = np.load(extra / "entries-VAL.npy")[:0]
    np.save(extra / "entries-VAL.npy", empty)
    with pytest.raises(DatasetError, match="split VAL is empty"):
        ImageNet("VAL", root, extra)
    with pytest.raises(DatasetError, match="no ImageNet images"):
        dump_imagenet_extra(tmp_path / "extra", tmp_path / "x")


# ---- ImageFolder -------------------------------------------------------------------------------------


def test_image_folder(tmp_path: Path) -> None:
    write(tmp_path / "dogs/b.jpg", jpeg_bytes((10, 10, 10)))
    write(tmp_path / "dogs/sub/a.png", b"")  # replaced below by a real PNG
    Image.new("RGB", (5, 7), (1, 2, 3)).save(tmp_path / "dogs/sub/a.png")
    write(tmp_path / "cats/c.JPEG", jpeg_bytes((200, 10, 10)))
    write(tmp_path / "cats/notes.txt", b"not an image")
    write(tmp_path / "cats/.hidden.jpg", b"ignored")
    ds = make_dataset(f"ImageFolder:root={tmp_path}")
    assert isinstance(ds, ImageFolder)
    assert ds.class_ids == ds.class_names == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 1, 1]
    assert [ds.relpath(i) for i in range(3)] == ["cats/c.JPEG", "dogs/b.jpg", "dogs/sub/a.png"]
    assert ds[2][0].size == (5, 7) and ds[2][1] == 1
    assert ds.get_encoded(0) == ((tmp_path / "cats/c.JPEG").read_bytes(), 0)


def test_image_folder_empty_and_corrupt(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageFolder(tmp_path)
    with pytest.raises(DatasetError, match="no class sub-folders"):
        ImageFolder(tmp_path / "a")
    write(tmp_path / "a/garbage.jpg", b"this is not a jpeg")
    good = jpeg_bytes((0, 0, 0), size=(64, 64))
    write(tmp_path / "a/truncated.jpg", good[: len(good) // 2])
    ds = ImageFolder(tmp_path)
    for i, name in enumerate(["garbage.jpg", "truncated.jpg"]):
        with pytest.raises(CorruptImageError, match=name):
            ds[i]


# ---- the demo dataset ----------------------------------------------------------------------------------


def test_demo_generation_is_deterministic(tmp_path: Path) -> None:
    a = generate_demo_split(tmp_path / "a", "TRAIN", n_per_class=2)
    b = generate_demo_split(tmp_path / "b", "TRAIN", n_per_class=2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert len(files_a) == 2 * len(DEMO_CLASSES)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    # splits and indices give different images
    c = generate_demo_split(tmp_path / "c", "VAL", n_per_class=2)
    assert (a / "dots/dots_00000.jpg").read_bytes() != (c / "dots/dots_00000.jpg").read_bytes()
    assert (a / "dots/dots_00000.jpg").read_bytes() != (a / "dots/dots_00001.jpg").read_bytes()


def test_demo_dataset_balance_and_format(tmp_path: Path) -> None:
    ds = make_dataset(f"Demo:split=TRAIN:root={tmp_path}:n_per_class=3")
    assert isinstance(ds, DemoDataset)
    assert len(ds) == 3 * len(DEMO_CLASSES)
    assert np.bincount(ds.labels).tolist() == [3] * len(DEMO_CLASSES)
    assert ds.class_names == sorted(DEMO_CLASSES)
    data, label = ds.get_encoded(7)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and img.size == (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    image, _ = ds[7]
    assert image.mode == "RGB"
    # second use reads the cache instead of regenerating
    folder = tmp_path / "train-n3"
    mtime = (folder / "dots/dots_00000.jpg").stat().st_mtime_ns
    assert len(DemoDataset("TRAIN", tmp_path, 3)) == len(ds)
    assert (folder / "dots/dots_00000.jpg").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_demo_default_root_and_incomplete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    assert default_demo_root() == tmp_path / "cache" / DEMO_VERSION
    assert DEMO_VERSION == "demo-v3"  # grey textures: a v1 (shapes) or v2 (mosaics) cache must not be reused
    (tmp_path / "val-n1").mkdir()
    with pytest.raises(DatasetError, match="delete it"):
        ensure_demo_split(tmp_path, "VAL", 1)


def _ensure_in_process(root: str, queue: multiprocessing.Queue) -> None:
    queue.put(str(ensure_demo_split(root, "VAL", 2)))


@pytest.mark.slow
def test_demo_concurrent_first_use(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_process, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = {queue.get(timeout=5) for _ in procs}
    assert results == {str(tmp_path / "val-n2")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-n2"]  # losers cleaned up their copies
    assert len(list((tmp_path / "val-n2").rglob("*.jpg"))) == 2 * len(DEMO_CLASSES)


def test_demo_texture_has_luma_contrast_in_every_crop() -> None:
    """The label is a two-tone texture: every 28 x 28 window (a small local crop) shows both tones."""
    from semlab.data.datasets.demo import MIN_LUMA_CONTRAST, render_demo_image

    for class_index in range(len(DEMO_CLASSES)):
        rng = np.random.default_rng([7, class_index])
        luma = np.asarray(render_demo_image(class_index, rng).convert("L"), dtype=np.float32)
        for y in range(0, DEMO_IMAGE_SIZE - 27, 28):
            for x in range(0, DEMO_IMAGE_SIZE - 27, 28):
                window = luma[y : y + 28, x : x + 28]
                spread = np.percentile(window, 95) - np.percentile(window, 5)
                assert spread >= 0.7 * MIN_LUMA_CONTRAST, (DEMO_CLASSES[class_index], y, x, spread)
