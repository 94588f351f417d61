"""The embedded demo dataset: 8 texture classes, procedurally generated, shipped as code.

Label encoding. Each image (112 x 112, stored as RGB JPEG quality 90) is one class-specific binary texture
-- ``stripes``, ``checker``, ``dots``, ``grid``, ``zigzag``, ``crosses``, ``rings`` or ``blocks`` -- drawn in
two grey levels over the whole image. Everything else is drawn independently PER IMAGE: the texture's
orientation, period (``PERIOD_RANGE`` pixels), phase, the two grey levels and which of them is the lighter
one; then i.i.d. Gaussian pixel noise.

Why. (1) The class is present in every part of the image, so it is present in every DINO crop, local crops
(5-32 % of the area) included; a period of at least ``PERIOD_RANGE[0]`` pixels survives the rescaling and the
Gaussian blur of the augmentation. (2) Two crops of one image share the texture and its orientation and
period (up to DINOv2's flips and scale changes), so self-distillation has a consistent signal to start from;
the nuisances it has to become invariant to -- brightness, contrast, scale, position, flip -- are exactly
the ones the DINOv2 augmentation varies between crops. (3) The two grey levels differ by at least
``MIN_LUMA_CONTRAST``, so the texture survives colour jitter, grayscale and solarize. (4) Raw pixels are a
weak cue: the random orientation and phase decorrelate the textures pixel by pixel, and the grey levels
vary more between images than between classes.

History. demo-v1 (shapes on per-image colour fields) let DINO match crops on the background colour instead
of the class; demo-v2 (Voronoi mosaics with orientation, period and colours drawn per cell) gave crops
almost nothing in common but the class, and DINO collapsed to uniform targets from a random init in every
configuration tried (benchmarks/RESULTS.md).

Every image is a pure function of ``(DEMO_SEED, split, class, index)``: the data are reproducible
bit for bit and a larger ``n_per_class`` only adds images. They are generated on first use into a
cache folder (``$SEMLAB_CACHE/demo-v3``, default ``~/.cache/semlab/demo-v3``, or ``root=``) with the
layout ``<root>/<split>/<class>/<class>_<index>.jpg``; each split folder is generated into a temporary
folder and renamed into place, so concurrent first use by several processes is safe.
"""

from __future__ import annotations

import errno
import io
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from semlab.data.datasets.image_folder import DatasetError, ImageFolder

DEMO_VERSION = "demo-v3"
DEMO_SEED = 20240601
DEMO_CLASSES = ("stripes", "checker", "dots", "grid", "zigzag", "crosses", "rings", "blocks")
DEMO_IMAGE_SIZE = 112
DEMO_JPEG_QUALITY = 90
DEMO_N_PER_CLASS = {"TRAIN": 250, "VAL": 50}
MIN_LUMA_CONTRAST = 90.0  # grey-level difference between ink and paper
PERIOD_RANGE = (11.0, 18.0)  # texture period in pixels of the 112-pixel image
_SPLIT_CODES = {"TRAIN": 0, "VAL": 1}
_SUPERSAMPLE = 2
_COMPLETE_MARKER = ".complete"


def default_demo_root() -> Path:
    """``$SEMLAB_CACHE/<DEMO_VERSION>`` if ``SEMLAB_CACHE`` is set, else under ``~/.cache/semlab``."""
    base = os.environ.get("SEMLAB_CACHE")
    return (Path(base) if base else Path("~/.cache/semlab")).expanduser() / DEMO_VERSION


# ---- textures: indicator functions of (u, v), coordinates in units of the period --------------------


def _centred(t: np.ndarray) -> np.ndarray:
    """Signed offset of ``t`` from the nearest integer + 1/2, in [-1/2, 1/2)."""
    return t - np.floor(t) - 0.5


def _texture(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of texture ``name`` at rotated, period-normalised coordinates ``(u, v)``."""
    if name == "stripes":  # parallel bands, half the period each
        return _centred(u) < 0.0
    if name == "checker":  # squares of half a period
        return (_centred(u) < 0.0) ^ (_centred(v) < 0.0)
    if name == "dots":  # a square lattice of discs
        return np.hypot(_centred(u), _centred(v)) < 0.3
    if name == "grid":  # thin lines along both axes
        return np.minimum(np.abs(_centred(u)), np.abs(_centred(v))) < 0.11
    if name == "zigzag":  # bands bent into a triangle wave
        tri = np.abs(_centred(v * 0.8)) * 2.0  # in [0, 1], wavelength 1.25 periods
        return _centred(u + 0.9 * tri) < 0.0
    if name == "crosses":  # a lattice of small plus signs
        cu, cv = np.abs(_centred(u)), np.abs(_centred(v))
        return ((cu < 0.1) & (cv < 0.36)) | ((cv < 0.1) & (cu < 0.36))
    if name == "rings":  # concentric circles around a random point near the origin
        cx, cy = rng.uniform(-0.5, 0.5, size=2)
        return _centred(np.hypot(u - cx, v - cy)) < 0.0
    if name == "blocks":  # random on/off squares of half a period (binary noise on a lattice)
        table = rng.random((16, 16)) < 0.5
        return table[np.floor(u * 2.0).astype(np.int64) % 16, np.floor(v * 2.0).astype(np.int64) % 16]
    raise ValueError(f"unknown demo class {name!r}")


def _grey_levels(rng: np.random.Generator) -> tuple[float, float]:
    """(ink, paper) grey levels that differ by at least ``MIN_LUMA_CONTRAST``; either may be lighter."""
    dark = rng.uniform(15.0, 110.0)
    light = dark + rng.uniform(MIN_LUMA_CONTRAST, min(220.0, 245.0 - dark))
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def render_demo_image(class_index: int, rng: np.random.Generator, size: int = DEMO_IMAGE_SIZE) -> Image.Image:
    """One demo image of class ``DEMO_CLASSES[class_index]`` drawn from ``rng`` (see the module doc).

    With orientation ``theta``, period ``p`` and origin ``o`` (near the centre, so that rings are centred in
    the image), pixel ``x`` reads the texture at ``(u, v) = R(-theta) (x - o) / p``.
    """
    name = DEMO_CLASSES[class_index]
    big = size * _SUPERSAMPLE
    theta = rng.uniform(0.0, 2.0 * math.pi)
    period = rng.uniform(*PERIOD_RANGE)
    ink, paper = _grey_levels(rng)
    origin = size / 2.0 + rng.uniform(-period, period, size=2)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float64) / _SUPERSAMPLE
    x, y = xx - origin[0], yy - origin[1]
    u = (x * math.cos(theta) + y * math.sin(theta)) / period
    v = (-x * math.sin(theta) + y * math.cos(theta)) / period
    image = np.where(_texture(name, u, v, rng), ink, paper)
    small = image.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    noise = rng.normal(0.0, rng.uniform(3.0, 8.0), size=(size, size, 3))
    small = np.repeat(small[..., None], 3, axis=2) + noise
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


def demo_image_bytes(split: str, class_index: int, index: int, seed: int = DEMO_SEED) -> bytes:
    """The JPEG bytes of image ``index`` of class ``class_index`` in ``split`` (a pure function)."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], class_index, index])
    buffer = io.BytesIO()
    render_demo_image(class_index, rng).save(buffer, format="JPEG", quality=DEMO_JPEG_QUALITY)
    return buffer.getvalue()


def _check_split(split: str) -> str:
    upper = str(split).upper()
    if upper not in _SPLIT_CODES:
        raise DatasetError(f"unknown Demo split {split!r}; expected one of {', '.join(_SPLIT_CODES)}")
    return upper


def generate_demo_split(dest: str | os.PathLike, split: str, n_per_class: int | None = None) -> Path:
    """Write ``n_per_class`` images per class of ``split`` into ``dest/<class>/`` (no atomicity; see
    :func:`ensure_demo_split`). Returns ``dest``."""
    split = _check_split(split)
    n = DEMO_N_PER_CLASS[split] if n_per_class is None else int(n_per_class)
    dest = Path(dest)
    for class_index, name in enumerate(DEMO_CLASSES):
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"{name}_{i:05d}.jpg").write_bytes(demo_image_bytes(split, class_index, i))
    return dest


def demo_split_dirname(split: str, n_per_class: int | None = None) -> str:
    """``train`` / ``val`` for the default sizes, ``train-n<n>`` / ``val-n<n>`` otherwise."""
    split = _check_split(split)
    if n_per_class is None or int(n_per_class) == DEMO_N_PER_CLASS[split]:
        return split.lower()
    return f"{split.lower()}-n{int(n_per_class)}"


def ensure_demo_split(root: str | os.PathLike | None, split: str, n_per_class: int | None = None) -> Path:
    """The folder of a demo split under ``root`` (default :func:`default_demo_root`), generated on first
    use into a temporary folder that is then renamed into place (safe under concurrent first use)."""
    split = _check_split(split)
    if n_per_class is not None and int(n_per_class) <= 0:
        raise DatasetError(f"Demo n_per_class must be a positive integer, got {n_per_class}")
    root = Path(root).expanduser() if root is not None else default_demo_root()
    dest = root / demo_split_dirname(split, n_per_class)
    if (dest / _COMPLETE_MARKER).is_file():
        return dest
    if dest.exists():
        raise DatasetError(
            f"demo folder {dest} exists but is not a complete generated demo split (no {_COMPLETE_MARKER}); "
            "delete it and it will be generated again"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{dest.name}.tmp-"))
    except OSError as exc:
        raise DatasetError(
            f"cannot create the demo cache folder {root}: {exc}; pass root=<writable dir> or set SEMLAB_CACHE"
        ) from exc
    try:
        generate_demo_split(tmp, split, n_per_class)
        (tmp / _COMPLETE_MARKER).write_text(f"{DEMO_VERSION} {split} seed={DEMO_SEED}\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any generated folder
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            # another process renamed its copy first: use theirs
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (dest / _COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


class DemoDataset(ImageFolder):
    """``Demo:split=TRAIN|VAL[:root=<cache dir>][:n_per_class=<n>]``: the embedded texture dataset."""

    def __init__(
        self,
        split: str = "TRAIN",
        root: str | os.PathLike | None = None,
        n_per_class: int | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.split = _check_split(split)
        folder = ensure_demo_split(root, self.split, n_per_class)
        super().__init__(folder, transform, target_transform)
        if self.class_ids != sorted(DEMO_CLASSES):
            raise DatasetError(f"demo folder {folder} is not a demo split; delete it to regenerate")

    def __repr__(self) -> str:
        return f"DemoDataset(split={self.split}, root={str(self.root)!r}, samples={len(self)})"
