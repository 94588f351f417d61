"""The input path per CPU core: JPEG decode + DINOv2 multi-crop (+ collation), and the cores a GPU needs.

Inputs: 4 real photos at ImageNet's typical 500 x 375, made from scikit-learn's two sample photos
(``china.jpg``, ``flower.jpg``: two 4:3 regions each, resized with Lanczos, saved as JPEG quality 90).
Each image is decoded from its bytes and cut into the recipe's 2 x 224 + 8 x 98 crops with flip, colour
jitter, grayscale, blur and solarize (``DataAugmentationDINO``), in one process on one torch thread:

- ``float``: crops normalised on the CPU (float32, today's default);
- ``uint8``: crops left as uint8 pixels (``data.normalize_on_device``: the GPU normalises them);
- ``+ collate``: the same, plus ``collate_data_and_cast`` (stacking + iBOT masks) of batches of 64.

    images/s per core = images / wall time on one thread (best of the rounds)
    cores per GPU     = target images/s per GPU / images/s per core

Usage::

    python benchmarks/input_path.py [--rounds 3] [--images 32] [--target 170]
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import os
import platform
import time

import numpy as np
import torch
from PIL import Image

from semlab.data.pipeline.augment import DataAugmentationDINO
from semlab.data.pipeline.collate import collate_data_and_cast
from semlab.data.pipeline.masking import MaskingGenerator

SIZE = (500, 375)


def photos() -> list[bytes]:
    """4 JPEGs of 500 x 375 cut from scikit-learn's sample photos (module docstring)."""
    out = []
    for name in ("china.jpg", "flower.jpg"):
        raw = (importlib.resources.files("sklearn.datasets") / "images" / name).read_bytes()
        img = Image.open(io.BytesIO(raw))
        w, h = img.size  # 640 x 427: 4:3 regions of 552 x 414 at the left and right edges
        cw, ch = int(h * 4 / 3) - 17, h - 13
        for left in (0, w - cw):
            buf = io.BytesIO()
            region = img.crop((left, 0, left + cw, ch)).resize(SIZE, Image.Resampling.LANCZOS)
            region.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def images_per_s(fn, data: list[bytes], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(data[i % len(data)], i)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=32, help="images per round (batch of collation: 64)")
    parser.add_argument("--target", type=float, default=170.0, help="images/s per GPU to feed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = photos()
    float_aug = DataAugmentationDINO(local_crops_size=98, local_crops_number=8)
    uint8_aug = DataAugmentationDINO(local_crops_size=98, local_crops_number=8, emit_uint8=True)
    masks = MaskingGenerator(input_size=(16, 16), max_num_patches=128)
    pending: list = []

    def with_collate(aug):
        def run(d: bytes, i: int) -> None:
            pending.append((aug(d, rng=i), 0, i))
            if len(pending) == 64:
                rng = np.random.default_rng(i)
                collate_data_and_cast(pending, n_tokens=256, mask_generator=masks, random=rng)
                pending.clear()
        return run

    pipelines = {
        "float": lambda d, i: float_aug(d, rng=i),
        "uint8": lambda d, i: uint8_aug(d, rng=i),
        "float + collate": with_collate(float_aug),
        "uint8 + collate": with_collate(uint8_aug),
    }
    for fn in pipelines.values():
        images_per_s(fn, data, 4)
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            pending.clear()
            best[name] = max(best[name], images_per_s(fn, data, args.images if "collate" not in name else 64))
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{len(data)} JPEGs {SIZE[0]}x{SIZE[1]}, 2x224 + 8x98 crops, 1 thread, "
          f"best of {args.rounds} rounds")
    print(f"| path | images/s per core | cores per GPU for {args.target:g} images/s |")
    print("|---|---|---|")
    for name, ips in best.items():
        print(f"| {name} | {ips:.1f} | {args.target / ips:.1f} |")


if __name__ == "__main__":
    main()
