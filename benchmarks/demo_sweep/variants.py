"""Variants of the demo dataset for the learning sweep: which texture properties one image shares.

Every variant draws the 8 classes of ``semlab.data.datasets.demo`` (the same binary textures) on
112 x 112 images.
A variant fixes, per image, which nuisances are drawn once for the whole image and which per Voronoi cell:

============  =======  ===============  ================  ==================
name          cells    orientation and  ink/paper         what it reproduces
                       period
============  =======  ===============  ================  ==================
mosaic        3-6      per cell         colour, per cell  demo-v2
mosaic_so     3-6      per image        colour, per cell
mosaic_sc     3-6      per cell         colour, per image
one_colour    1        per image        colour
one_grey      1        per image        grey              demo-v3's design
============  =======  ===============  ================  ==================

Colours: two of moderate saturation whose lumas differ by >= 90 (demo-v2's rule); grey: two grey levels that
differ by >= 90 (demo-v3's rule). Image ``i`` of class ``c`` in split ``s`` is drawn from
``default_rng([DEMO_SEED, s, c, i, 7])``, so a variant is reproducible but not pixel-identical to the Demo
dataset. Written as ``<dir>/<variant>/{train,val}/<class>/<class>_<i>.jpg`` (250 / 50 per class), readable as
``ImageFolder:root=<dir>/<variant>/train``.

    python benchmarks/demo_sweep/variants.py <dir> mosaic one_grey
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from semlab.data.datasets import demo

# name: (cells (min, max), orientation and period shared by the image, ink/paper mode)
VARIANTS = {
    "mosaic": ((3, 6), False, "cell"),
    "mosaic_so": ((3, 6), True, "cell"),
    "mosaic_sc": ((3, 6), False, "image"),
    "one_colour": ((1, 1), True, "image"),
    "one_grey": ((1, 1), True, "grey"),
}
SPLITS = {"train": (0, 250), "val": (1, 50)}
MIN_CONTRAST = 90.0


def _luma(rgb: np.ndarray) -> float:
    return float(rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114)


def _colour_with_luma(rng: np.random.Generator, luma: float) -> np.ndarray:
    colour = np.full(3, luma) + rng.uniform(-60.0, 60.0, size=3)
    colour += luma - _luma(colour)
    return np.clip(colour, 0.0, 255.0)


def colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ink, paper) colours of moderate saturation, lumas >= ``MIN_CONTRAST`` apart, either one lighter."""
    dark = rng.uniform(25.0, 255.0 - 80.0 - 25.0 - 40.0)
    light = dark + rng.uniform(MIN_CONTRAST, min(150.0, 230.0 - dark))
    a, b = _colour_with_luma(rng, dark), _colour_with_luma(rng, light)
    return (a, b) if rng.random() < 0.5 else (b, a)


def grey_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    dark = rng.uniform(15.0, 110.0)
    light = dark + rng.uniform(MIN_CONTRAST, min(220.0, 245.0 - dark))
    a, b = np.full(3, dark), np.full(3, light)
    return (a, b) if rng.random() < 0.5 else (b, a)


def render(class_index: int, rng: np.random.Generator, variant: str, size: int = 112) -> Image.Image:
    """One image of ``variant`` (see the module table)."""
    (lo, hi), shared_geometry, inks = VARIANTS[variant]
    name = demo.DEMO_CLASSES[class_index]
    ss = 2  # supersampling
    big = size * ss
    seeds = rng.uniform(0.0, big, size=(int(rng.integers(lo, hi + 1)), 2))
    grid_y, grid_x = np.mgrid[0:big, 0:big].astype(np.float32) + 0.5
    dist = (grid_x[None] - seeds[:, 0, None, None]) ** 2 + (grid_y[None] - seeds[:, 1, None, None]) ** 2
    cells = np.argmin(dist, axis=0)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float64) / ss
    image = np.zeros((big, big, 3))
    theta0, period0 = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(*demo.PERIOD_RANGE)
    pair0 = grey_pair(rng) if inks == "grey" else colour_pair(rng)
    for cell in range(int(cells.max()) + 1):
        inside = cells == cell
        if not inside.any():
            continue
        theta = theta0 if shared_geometry else rng.uniform(0.0, 2.0 * math.pi)
        period = period0 if shared_geometry else rng.uniform(*demo.PERIOD_RANGE)
        centre = np.array([xx[inside].mean(), yy[inside].mean()]) + rng.uniform(-period, period, size=2)
        x, y = xx[inside] - centre[0], yy[inside] - centre[1]
        u = (x * math.cos(theta) + y * math.sin(theta)) / period
        v = (-x * math.sin(theta) + y * math.cos(theta)) / period
        on = demo._texture(name, u, v, rng)
        ink, paper = colour_pair(rng) if inks == "cell" else pair0
        image[inside] = np.where(on[:, None], ink[None, :], paper[None, :])
    small = image.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    small += rng.normal(0.0, rng.uniform(3.0, 8.0), size=small.shape)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


def generate(root: str | Path, variant: str) -> Path:
    """Write both splits of ``variant`` under ``root/variant`` (skipped if already complete)."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    out = Path(root) / variant
    if (out / ".complete").is_file():
        return out
    for split, (code, n) in SPLITS.items():
        for ci, cname in enumerate(demo.DEMO_CLASSES):
            folder = out / split / cname
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([demo.DEMO_SEED, code, ci, i, 7])
                render(ci, rng, variant).save(folder / f"{cname}_{i:05d}.jpg", quality=90)
    (out / ".complete").write_text(variant + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    for name in sys.argv[2:]:
        print(generate(sys.argv[1], name))
