"""ImageNet in the DINOv2 layout, read through its ``extra`` index folder, and the writer of that folder.

Layout of ``root`` (the DINOv2 data-preparation layout; any subset of it works, sizes are not checked)::

    root/train/<wnid>/<wnid>_<n>.JPEG
    root/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG     (or flat: root/val/ILSVRC2012_val_<8 digits>.JPEG)
    root/test/ILSVRC2012_test_<8 digits>.JPEG          (optional, unlabelled)
    root/labels.txt                                    (optional: "<wnid>,<class name>" per line)

``extra`` holds, per split ``S`` in TRAIN / VAL / TEST, the files DINOv2 reads:

- ``entries-S.npy``: structured array, one row per image, dtype ``[("actual_index", "<u4"),
  ("class_index", "<u4"), ("class_id", "U<n>"), ("class_name", "U<m>")]`` (string widths = the longest
  value, as DINOv2 writes them). ``actual_index`` is ``<n>`` of the file name; TEST rows have class
  index ``2**32 - 1`` and empty strings.
- ``class-ids-S.npy``, ``class-names-S.npy``: string arrays indexed by class index (not written for TEST).

Class index = position of the wnid in the sorted list of known classes (those of ``labels.txt`` when
given, else the union of the train and val class folders): for the full ImageNet this is DINOv2's
``ImageFolder`` order, and subsets of train and val share one label space.

A flat ``val/`` folder needs per-image labels: a file with ``<image name or stem> <wnid>`` per line
(comma or white space separated, an ``ImageId,...`` header line allowed, so Kaggle's
``LOC_val_solution.csv`` works as is).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from semlab.data.datasets.image_folder import DatasetError, FileImageDataset
from semlab.utils.atomic import atomic_path

SPLITS = ("TRAIN", "VAL", "TEST")
_UNLABELLED = np.uint32(2**32 - 1)
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
_TEST_NAME = re.compile(r"^ILSVRC2012_test_(\d{8})\.JPEG$")


def _entries_name(split: str) -> str:
    return f"entries-{split}.npy"


def _class_ids_name(split: str) -> str:
    return f"class-ids-{split}.npy"


def _class_names_name(split: str) -> str:
    return f"class-names-{split}.npy"


def _check_split(split: str) -> str:
    upper = str(split).upper()
    if upper not in SPLITS:
        raise DatasetError(f"unknown ImageNet split {split!r}; expected one of {', '.join(SPLITS)}")
    return upper


def image_relpath(split: str, actual_index: int, class_id: str, flat_val: bool = False) -> str:
    """The DINOv2 relative path of an image: ``train/<id>/<id>_<n>.JPEG``,
    ``val/<id>/ILSVRC2012_val_<n:08d>.JPEG`` (``val/ILSVRC2012_val_<n:08d>.JPEG`` if flat),
    ``test/ILSVRC2012_test_<n:08d>.JPEG``."""
    if split == "TRAIN":
        return f"train/{class_id}/{class_id}_{actual_index}.JPEG"
    if split == "VAL":
        name = f"ILSVRC2012_val_{actual_index:08d}.JPEG"
        return f"val/{name}" if flat_val else f"val/{class_id}/{name}"
    return f"test/ILSVRC2012_test_{actual_index:08d}.JPEG"


class ImageNet(FileImageDataset):
    """An ImageNet split read through its ``extra`` index (see the module docstring)."""

    def __init__(
        self,
        split: str,
        root: str | os.PathLike,
        extra: str | os.PathLike | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        super().__init__(transform, target_transform)
        self.split = _check_split(split)
        self.root = Path(root).expanduser()
        self.extra = Path(extra).expanduser() if extra is not None else self.root
        if not self.root.is_dir():
            raise DatasetError(f"ImageNet root {self.root} does not exist or is not a folder")
        if not self.extra.is_dir():
            raise DatasetError(
                f"ImageNet extra folder {self.extra} does not exist; write it with "
                f"semlab.data.dump_imagenet_extra({str(self.root)!r}, {str(self.extra)!r}) "
                "(experiments/prepare_data.py calls it)"
            )
        entries_path = self.extra / _entries_name(self.split)
        if not entries_path.is_file():
            raise DatasetError(
                f"ImageNet extra folder {self.extra} has no {entries_path.name}; write it with "
                f"semlab.data.dump_imagenet_extra({str(self.root)!r}, {str(self.extra)!r}) "
                "(experiments/prepare_data.py)"
            )
        self._entries = np.load(entries_path, mmap_mode="r", allow_pickle=False)
        missing = {"actual_index", "class_index", "class_id"} - set(self._entries.dtype.names or ())
        if missing:
            raise DatasetError(f"{entries_path} is not a DINOv2 entries file (no fields {sorted(missing)})")
        if len(self._entries) == 0:
            raise DatasetError(f"ImageNet split {self.split} is empty ({entries_path} has no entries)")
        labels = np.asarray(self._entries["class_index"]).astype(np.int64)
        labels[labels == int(_UNLABELLED)] = -1
        self.labels = labels
        self.class_ids, self.class_names = self._load_classes()
        self._flat_val = self.split == "VAL" and self._detect_flat_val()

    def _load_classes(self) -> tuple[list[str], list[str]]:
        for split in (self.split, "TRAIN"):
            ids_path, names_path = self.extra / _class_ids_name(split), self.extra / _class_names_name(split)
            if ids_path.is_file() and names_path.is_file():
                ids = [str(v) for v in np.load(ids_path, allow_pickle=False)]
                names = [str(v) for v in np.load(names_path, allow_pickle=False)]
                return ids, names
            if self.split != "TEST":
                raise DatasetError(
                    f"ImageNet extra folder {self.extra} has {_entries_name(self.split)} but not "
                    f"{ids_path.name} and {names_path.name}; rewrite it with semlab.data.dump_imagenet_extra"
                )
        return [], []

    def _detect_flat_val(self) -> bool:
        first = self._entries[0]
        index, class_id = int(first["actual_index"]), str(first["class_id"])
        nested = self.root / image_relpath("VAL", index, class_id, flat_val=False)
        flat = self.root / image_relpath("VAL", index, class_id, flat_val=True)
        if nested.is_file():
            return False
        if flat.is_file():
            return True
        raise DatasetError(
            f"ImageNet VAL image of entry 0 is at neither {nested} nor {flat}; is root={self.root} the "
            f"folder that {self.extra} was written for?"
        )

    def relpath(self, index: int) -> str:
        entry = self._entries[index]
        return image_relpath(self.split, int(entry["actual_index"]), str(entry["class_id"]), self._flat_val)

    def __repr__(self) -> str:
        return (
            f"ImageNet(split={self.split}, root={str(self.root)!r}, extra={str(self.extra)!r}, "
            f"samples={len(self)}, classes={len(self.class_ids)})"
        )


# ---- writing the extra folder -----------------------------------------------------------------------


def read_class_labels(path: str | os.PathLike) -> dict[str, str]:
    """``{wnid: class name}`` from a DINOv2 ``labels.txt`` (``<wnid>,<name>`` per line; the name may hold
    commas)."""
    labels: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        class_id, sep, name = line.partition(",")
        if not sep or not class_id.strip():
            raise DatasetError(f"{path}:{lineno}: expected '<class id>,<class name>', got {line!r}")
        labels[class_id.strip()] = name.strip()
    return labels


def read_val_labels(path: str | os.PathLike) -> dict[str, str]:
    """``{image stem: wnid}`` from ``<image name or stem> <wnid>`` lines (comma or white space; an
    ``ImageId,...`` header is skipped; extra fields after the wnid are ignored)."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if not fields or (lineno == 1 and fields[0].lower() in ("imageid", "image", "filename")):
            continue
        if len(fields) < 2:
            raise DatasetError(f"{path}:{lineno}: expected '<image> <class id>', got {line!r}")
        out[os.path.splitext(fields[0])[0]] = fields[1]
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _string_dtype(values: list[str]) -> str:
    return f"U{max([1, *(len(v) for v in values)])}"


def _make_entries(rows: list[Row]) -> np.ndarray:
    dtype = np.dtype(
        [
            ("actual_index", "<u4"),
            ("class_index", "<u4"),
            ("class_id", _string_dtype([r[2] for r in rows])),
            ("class_name", _string_dtype([r[3] for r in rows])),
        ]
    )
    return np.array(rows, dtype=dtype)


def _sorted_files(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))


Row = tuple[int, int, str, str]  # actual_index, class_index, class_id, class_name


def _scan_train(root: Path, class_index: dict[str, int], names: dict[str, str]) -> list[Row]:
    rows = []
    train = root / "train"
    for class_id in sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")):
        if class_id not in class_index:
            raise DatasetError(f"train class folder {train / class_id} is not in the class list (labels.txt)")
        pattern = re.compile(rf"^{re.escape(class_id)}_(\d+)\.JPEG$")
        for fname in _sorted_files(train / class_id):
            match = pattern.match(fname)
            if match is None or f"{class_id}_{int(match.group(1))}.JPEG" != fname:
                raise DatasetError(
                    f"unexpected file {train / class_id / fname}: DINOv2's layout names train images "
                    f"<wnid>_<number>.JPEG (no leading zeros), e.g. {class_id}_10026.JPEG"
                )
            rows.append((int(match.group(1)), class_index[class_id], class_id, names[class_id]))
    return rows


def _scan_val(
    root: Path, class_index: dict[str, int], names: dict[str, str], val_labels_path: Path | None
) -> list[Row]:
    val = root / "val"
    subdirs = sorted(e.name for e in os.scandir(val) if e.is_dir() and not e.name.startswith("."))
    rows = []
    if subdirs:
        for class_id in subdirs:
            if class_id not in class_index:
                raise DatasetError(f"val class folder {val / class_id} is not in the class list (labels.txt)")
            for fname in _sorted_files(val / class_id):
                match = _VAL_NAME.match(fname)
                if match is None:
                    raise DatasetError(
                        f"unexpected file {val / class_id / fname}: expected ILSVRC2012_val_<8 digits>.JPEG"
                    )
                rows.append((int(match.group(1)), class_index[class_id], class_id, names[class_id]))
        return rows
    files = [f for f in _sorted_files(val) if _VAL_NAME.match(f)]
    if not files:
        return rows
    if val_labels_path is None:
        raise DatasetError(
            f"{val} is flat (ILSVRC2012_val_*.JPEG without class folders): pass val_labels_path, a file of "
            "'<image> <wnid>' lines (e.g. LOC_val_solution.csv), or sort the images into val/<wnid>/"
        )
    image_labels = read_val_labels(val_labels_path)
    for fname in files:
        stem = os.path.splitext(fname)[0]
        if stem not in image_labels:
            raise DatasetError(f"{val / fname} has no label in {val_labels_path}")
        class_id = image_labels[stem]
        if class_id not in class_index:
            raise DatasetError(f"{val / fname} is labelled {class_id!r}, which is not in the class list")
        match = _VAL_NAME.match(fname)
        assert match is not None
        rows.append((int(match.group(1)), class_index[class_id], class_id, names[class_id]))
    return rows


def _scan_test(root: Path) -> list[Row]:
    return [
        (int(m.group(1)), int(_UNLABELLED), "", "")
        for m in (_TEST_NAME.match(f) for f in _sorted_files(root / "test"))
        if m is not None
    ]


def dump_imagenet_extra(
    root: str | os.PathLike,
    extra: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    val_labels_path: str | os.PathLike | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, int]:
    """Scan the ImageNet layout under ``root`` and write the DINOv2 ``extra`` files into ``extra``.

    ``labels_path`` (default ``root/labels.txt`` if present) gives the class list and names; without it
    the classes are the train and val class folders and the names are the wnids. ``val_labels_path``
    (default ``root/LOC_val_solution.csv`` or ``root/val_labels.txt`` if present) labels a flat ``val/``.
    Splits whose folder is missing or empty are skipped; each file is written atomically. Returns
    ``{split: number of images}`` for the splits written.
    """
    root = Path(root).expanduser()
    extra = Path(extra).expanduser()
    if not root.is_dir():
        raise DatasetError(f"ImageNet root {root} does not exist or is not a folder")
    splits = tuple(_check_split(s) for s in splits)
    if labels_path is None and (root / "labels.txt").is_file():
        labels_path = root / "labels.txt"
    if val_labels_path is None:
        for candidate in ("LOC_val_solution.csv", "val_labels.txt"):
            if (root / candidate).is_file():
                val_labels_path = root / candidate
                break
    if labels_path is not None:
        names = read_class_labels(labels_path)
    else:
        found: set[str] = set()
        for sub in ("train", "val"):
            if (root / sub).is_dir():
                found |= {e.name for e in os.scandir(root / sub) if e.is_dir() and not e.name.startswith(".")}
        names = {c: c for c in found}
    class_ids = sorted(names)
    class_index = {c: i for i, c in enumerate(class_ids)}
    class_names = [names[c] for c in class_ids]

    scanned: dict[str, list[Row]] = {}
    if "TRAIN" in splits and (root / "train").is_dir():
        scanned["TRAIN"] = _scan_train(root, class_index, names)
    if "VAL" in splits and (root / "val").is_dir():
        val_labels = Path(val_labels_path) if val_labels_path else None
        scanned["VAL"] = _scan_val(root, class_index, names, val_labels)
    if "TEST" in splits and (root / "test").is_dir():
        scanned["TEST"] = _scan_test(root)
    scanned = {split: rows for split, rows in scanned.items() if rows}
    if not scanned:
        raise DatasetError(
            f"no ImageNet images found under {root}: expected train/<wnid>/<wnid>_<n>.JPEG, "
            "val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG or test/ILSVRC2012_test_<8 digits>.JPEG"
        )
    extra.mkdir(parents=True, exist_ok=True)
    for split, rows in scanned.items():
        if split != "TEST":
            ids_array = np.array(class_ids, dtype=_string_dtype(class_ids))
            names_array = np.array(class_names, dtype=_string_dtype(class_names))
            _save_npy(extra / _class_ids_name(split), ids_array)
            _save_npy(extra / _class_names_name(split), names_array)
        _save_npy(extra / _entries_name(split), _make_entries(rows))  # last: its presence marks the split
    return {split: len(rows) for split, rows in scanned.items()}
