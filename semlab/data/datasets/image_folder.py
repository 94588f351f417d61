"""Image datasets backed by files: the shared base class and ``ImageFolder`` (``root/<class>/<image>``).

Every semlab dataset is a ``torch.utils.data.Dataset`` of ``(transform(PIL RGB image), label)`` that also
exposes the original encoded file bytes (``get_encoded(i) -> (bytes, label)``, what the fast augmentation
and the Parquet shard writer read), ``labels`` (np.int64, one per sample, -1 where unknown),
``class_ids`` and ``class_names`` (one per class index).
"""

from __future__ import annotations

import abc
import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_VAL_FRACTION = 0.1


class DatasetError(ValueError):
    """A dataset string, folder or file that cannot be used; the message says which and what to do."""


class CorruptImageError(DatasetError):
    """An image file that cannot be decoded."""


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes to a fully loaded RGB PIL image; a clear error naming ``name`` otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(
            f"cannot decode image {name}: {exc.__class__.__name__}: {exc}. The file is corrupt, truncated or "
            "not an image; replace or remove it (and regenerate the dataset index if it has one)."
        ) from exc


class FileImageDataset(torch.utils.data.Dataset, abc.ABC):
    """Base class: subclasses set ``root``, ``labels``, ``class_ids``, ``class_names`` and implement
    ``relpath(i)`` (the image file of sample ``i`` relative to ``root``)."""

    root: Path
    labels: np.ndarray
    class_ids: list[str]
    class_names: list[str]

    def __init__(
        self,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.transform = transform
        self.target_transform = target_transform

    @abc.abstractmethod
    def relpath(self, index: int) -> str:
        """Path of sample ``index`` relative to ``self.root`` (each layout defines it)."""

    def path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.root / self.relpath(index)

    def __len__(self) -> int:
        return len(self.labels)

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {n} samples")
        return index % n

    def get_target(self, index: int) -> int:
        return int(self.labels[self._check_index(index)])

    def get_encoded(self, index: int) -> tuple[bytes, int]:
        """The original file bytes of sample ``index`` and its label."""
        index = self._check_index(index)
        path = self.path(index)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetError(
                f"cannot read image file {path} (sample {index} of {type(self).__name__} at {self.root}): "
                f"{exc.strerror or exc}"
            ) from exc
        return data, int(self.labels[index])

    def get_image(self, index: int) -> Image.Image:
        """Sample ``index`` decoded to an RGB PIL image."""
        data, _ = self.get_encoded(index)
        return decode_image(data, f"{self.path(index)} (sample {index})")

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.get_image(index)
        target: Any = int(self.labels[self._check_index(index)])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        name, root = type(self).__name__, str(self.root)
        return f"{name}(root={root!r}, samples={len(self)}, classes={len(self.class_ids)})"


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def scan_class_folders(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(classes, relative image paths, labels)`` of ``root/<class>/**/<image>``: classes are the sorted
    sub-folder names (hidden ones skipped); images are found recursively in sorted order.

    Symlinked folders are followed, each real folder once: a link back to the root, to a class folder or
    to a folder already walked (a loop) is skipped with a warning, so no image is counted twice or
    takes another class's label."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    relpaths: list[str] = []
    labels: list[int] = []
    seen = {os.path.realpath(root)} | {os.path.realpath(root / name) for name in classes}
    for index, name in enumerate(classes):
        found: list[tuple[str, str]] = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):  # top-down: pruning works
            keep = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                real = os.path.realpath(os.path.join(dirpath, d))
                if real in seen:
                    logger.warning("not following %s: its folder %s is already scanned (symlink loop or "
                                   "link to another class)", os.path.join(dirpath, d), real)
                    continue
                seen.add(real)
                keep.append(d)
            dirnames[:] = keep
            rel = os.path.relpath(dirpath, root)
            found += [(rel, fname) for fname in filenames if _is_image_file(fname)]
        for rel, fname in sorted(found):
            relpaths.append(os.path.join(rel, fname))
            labels.append(index)
    return classes, relpaths, np.asarray(labels, dtype=np.int64)


def in_val_split(relpath: str, val_fraction: float) -> bool:
    """Whether an image belongs to the held-out VAL part of an ImageFolder: the first 8 bytes of
    SHA-1(relative path), read as a number in [0, 1), are below ``val_fraction``.

    A pure function of the file's path: the split is the same on every machine and run, an image
    never changes side when others are added or removed, and each class keeps about
    ``val_fraction`` of its images in VAL.
    """
    digest = hashlib.sha1(relpath.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _parse_split(split: str | None, val_fraction: float | str) -> tuple[str | None, float]:
    try:
        fraction = float(val_fraction)
    except ValueError:
        fraction = float("nan")
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"ImageFolder val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if split is None:
        return None, fraction
    if split.upper() not in ("TRAIN", "VAL"):
        raise DatasetError(f"ImageFolder split must be TRAIN or VAL, got {split!r}")
    return split.upper(), fraction


class ImageFolder(FileImageDataset):
    """``root/<class>/<image>`` (any depth under the class folder); classes are the sorted sub-folders.

    ``class_ids`` and ``class_names`` are both the folder names unless ``class_names`` is given.
    ``split`` (``TRAIN`` or ``VAL``) keeps one side of a fixed held-out split of the folder
    (:func:`in_val_split` at ``val_fraction``); without it, every image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        class_names: Sequence[str] | None = None,
        split: str | None = None,
        val_fraction: float | str = DEFAULT_VAL_FRACTION,
    ) -> None:
        super().__init__(transform, target_transform)
        self.root = Path(root).expanduser()
        self.split, self.val_fraction = _parse_split(split, val_fraction)
        if not self.root.is_dir():
            raise DatasetError(f"ImageFolder root {self.root} does not exist or is not a folder")
        classes, self._relpaths, self.labels = scan_class_folders(self.root)
        if self.split is not None:
            keep = [in_val_split(rel, self.val_fraction) == (self.split == "VAL") for rel in self._relpaths]
            self._relpaths = [rel for rel, k in zip(self._relpaths, keep) if k]
            self.labels = self.labels[np.asarray(keep, dtype=bool)]
        if not classes:
            raise DatasetError(
                f"ImageFolder root {self.root} has no class sub-folders; expected "
                f"{self.root}/<class>/<image>.jpg"
            )
        if not self._relpaths:
            raise DatasetError(
                f"ImageFolder root {self.root} has class folders ({', '.join(classes[:5])}...) but no images "
                f"with an extension in {', '.join(IMG_EXTENSIONS)}"
            )
        self.class_ids = list(classes)
        self.class_names = list(class_names) if class_names is not None else list(classes)
        if len(self.class_names) != len(self.class_ids):
            raise DatasetError(f"{len(self.class_names)} class names given for {len(self.class_ids)} classes")

    def relpath(self, index: int) -> str:
        return self._relpaths[index]
