"""The embedded demo dataset: 10 shape classes, procedurally generated, shipped as code.

Each image (112 x 112 RGB, JPEG quality 90) shows one large shape -- circle, square, triangle, star,
cross, ring, hexagon, crescent, arrow or frame -- at a random position, size, rotation, aspect and
colour, over a random background (smooth colour field + oriented texture + pixel noise) with thin
distractor lines and small dots. The class is the shape, not its colour, position or size, so the
label survives DINO's crops, flips, colour jitter, grayscale, blur and solarize (the shape keeps a
luma contrast of at least ``MIN_LUMA_CONTRAST`` with the background), while raw pixels are a weak cue.

Every image is a pure function of ``(DEMO_SEED, split, class, index)``: the data are reproducible
bit for bit and a larger ``n_per_class`` only adds images. They are generated on first use into a
cache folder (``$SEMLAB_CACHE/demo-v1``, default ``~/.cache/semlab/demo-v1``, or ``root=``) with the
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
from PIL import Image, ImageDraw, ImageFilter

from semlab.data.image_folder import DatasetError, ImageFolder

DEMO_VERSION = "demo-v1"
DEMO_SEED = 20240601
DEMO_CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "arrow",
    "frame",
)
DEMO_IMAGE_SIZE = 112
DEMO_JPEG_QUALITY = 90
DEMO_N_PER_CLASS = {"TRAIN": 200, "VAL": 50}
MIN_LUMA_CONTRAST = 70.0
_SPLIT_CODES = {"TRAIN": 0, "VAL": 1}
_SUPERSAMPLE = 4
_COMPLETE_MARKER = ".complete"


def default_demo_root() -> Path:
    """``$SEMLAB_CACHE/demo-v1`` if ``SEMLAB_CACHE`` is set, else ``~/.cache/semlab/demo-v1``."""
    base = os.environ.get("SEMLAB_CACHE")
    return (Path(base) if base else Path("~/.cache/semlab")).expanduser() / DEMO_VERSION


# ---- shapes, in unit coordinates (the shape spans about [-1, 1]) ---------------------------------------


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2.0 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    outer = _regular_polygon(points, 1.0, -math.pi / 2)
    inn = _regular_polygon(points, inner, -math.pi / 2 + math.pi / points)
    return np.stack([outer, inn], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    quarter = [(-a, -1), (a, -1), (a, -a)]  # one arm's end and the inner corner, rotated 4 times
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    pts = np.array(quarter, dtype=float)
    return np.concatenate([pts @ np.linalg.matrix_power(rot, k).T for k in range(4)])


def _arrow() -> np.ndarray:
    return np.array(
        [(-1.0, -0.25), (0.15, -0.25), (0.15, -0.7), (1.0, 0.0), (0.15, 0.7), (0.15, 0.25), (-1.0, 0.25)]
    )


# Each class: list of (polygon, fill) drawn in order on a black mask (fill 255 adds, 0 cuts a hole).
def _class_polygons(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    circle = _regular_polygon(72)
    if name == "circle":
        return [(circle, 255)]
    if name == "square":
        return [(_regular_polygon(4, 1.15, math.pi / 4), 255)]
    if name == "triangle":
        return [(_regular_polygon(3, 1.2, -math.pi / 2) + np.array([0.0, 0.2]), 255)]
    if name == "star":
        return [(_star(5, float(rng.uniform(0.38, 0.5))) * 1.15, 255)]
    if name == "cross":
        return [(_cross(float(rng.uniform(0.28, 0.38))), 255)]
    if name == "ring":
        return [(circle, 255), (circle * float(rng.uniform(0.5, 0.62)), 0)]
    if name == "hexagon":
        return [(_regular_polygon(6, 1.05), 255)]
    if name == "crescent":
        shift = float(rng.uniform(0.4, 0.6))
        return [(circle, 255), (circle * 0.9 + np.array([shift, -0.1]), 0)]
    if name == "arrow":
        return [(_arrow() * 1.1, 255)]
    if name == "frame":
        square = _regular_polygon(4, 1.2, math.pi / 4)
        return [(square, 255), (square * float(rng.uniform(0.55, 0.68)), 0)]
    raise ValueError(f"unknown demo class {name!r}")


def _shape_mask(class_name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Anti-aliased mask in [0, 1] of one shape at a random position, radius, rotation and aspect."""
    big = size * _SUPERSAMPLE
    radius = rng.uniform(0.2, 0.34) * big
    centre = rng.uniform(0.32, 0.68, size=2) * big
    theta = rng.uniform(0.0, 2.0 * math.pi)
    aspect = rng.uniform(0.85, 1.15)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    scale = np.array([aspect, 1.0 / aspect]) * radius
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, fill in _class_polygons(class_name, rng):
        pts = (polygon * scale) @ rot.T + centre
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=fill)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _background(rng: np.random.Generator, size: int, luma_target: float) -> np.ndarray:
    """Smooth random colour field + an oriented sinusoidal texture, around a target mean luma."""
    grid = int(rng.integers(2, 6))
    field = rng.uniform(0, 255, size=(grid, grid, 3)).astype(np.uint8)
    smooth = Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC)
    smooth = np.asarray(smooth, dtype=np.float32)
    smooth = smooth * 0.5 + rng.uniform(0, 255, size=3).astype(np.float32) * 0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.6)
    wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * freq + rng.uniform(0, 2 * math.pi))
    smooth += (wave * rng.uniform(5, 25))[..., None]
    smooth += luma_target - float(_luma(smooth).mean())
    return smooth


def _fill_colour(rng: np.random.Generator, luma_target: float) -> np.ndarray:
    colour = rng.uniform(0, 255, size=3)
    colour = colour + (luma_target - float(_luma(colour)))
    return np.clip(colour, 0, 255).astype(np.float32)


def _distractors(rng: np.random.Generator, size: int) -> Image.Image:
    """RGBA layer of thin random lines and small dots (a few pixels wide: much smaller than any shape)."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1, 1.1, size=4) * size)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3)) + (int(rng.integers(90, 200)),)
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(3, 12))):
        cx, cy = (float(v) for v in rng.uniform(0, size, size=2))
        r = float(rng.uniform(1.0, 3.5))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3)) + (int(rng.integers(120, 230)),)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return layer


def render_demo_image(class_index: int, rng: np.random.Generator, size: int = DEMO_IMAGE_SIZE) -> Image.Image:
    """One demo image of class ``DEMO_CLASSES[class_index]`` drawn from ``rng``."""
    dark_background = bool(rng.random() < 0.5)
    bg_luma = rng.uniform(40, 95) if dark_background else rng.uniform(160, 215)
    fg_luma = bg_luma + (1 if dark_background else -1) * rng.uniform(MIN_LUMA_CONTRAST + 15, 120)
    background = _background(rng, size, bg_luma)
    mask = _shape_mask(DEMO_CLASSES[class_index], rng, size)[..., None]
    fill = _fill_colour(rng, fg_luma)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gradient = 1.0 + rng.uniform(-0.12, 0.12) * (xx - 0.5) + rng.uniform(-0.12, 0.12) * (yy - 0.5)
    foreground = fill[None, None, :] * gradient[..., None]
    image = background * (1.0 - mask) + foreground * mask
    image += rng.normal(0.0, rng.uniform(3.0, 9.0), size=image.shape)
    pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB").convert("RGBA")
    pil = Image.alpha_composite(pil, _distractors(rng, size)).convert("RGB")
    if rng.random() < 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    return pil


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
    """``Demo:split=TRAIN|VAL[:root=<cache dir>][:n_per_class=<n>]``: the embedded shapes dataset."""

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
