"""Throughput of the DINOv2 multi-crop augmentation, decode included, on one CPU core.

Input: scikit-learn's ``china.jpg`` (427 x 640 JPEG, a real photo shipped with scikit-learn). Each image is
decoded from its bytes and turned into 2 global crops (224) + 8 local crops (98) as the vitl14_sem_L512
recipe does. Compared pipelines:

- ``semlab``: :class:`semlab.data.pipeline.augment.DataAugmentationDINO` (decode once, draft mode, box resize,
  colour/blur/normalise on small float tensors);
- ``reference-style``: PIL decode + torchvision ``RandomResizedCrop`` / ``ColorJitter`` / ``RandomGrayscale``
  / ``GaussianBlur(9)`` / ``RandomSolarize`` / ``ToTensor`` / ``Normalize`` per crop, as the DINOv2 code
  composes them (with the same effective blur probabilities).

Rounds of both pipelines alternate so that load from other processes hits both alike; the best round of
each is reported (images/s on one core, ``torch.set_num_threads(1)``). Usage::

    python benchmarks/augment.py [--rounds 5] [--images 40]
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from semlab.data.pipeline.augment import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DataAugmentationDINO

GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 224, 98, 8
GLOBAL_SCALE, LOCAL_SCALE = (0.32, 1.0), (0.05, 0.32)


def china_jpeg() -> bytes:
    """The bytes of scikit-learn's sample photo ``china.jpg``."""
    return (importlib.resources.files("sklearn.datasets") / "images" / "china.jpg").read_bytes()


def reference_style(blur_probs: tuple[float, float, float]):
    """The per-crop PIL/torchvision composition of the reference (blur probabilities as applied)."""
    bicubic = T.InterpolationMode.BICUBIC

    def blur(p: float) -> T.RandomApply:
        return T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)

    colour = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    flip = T.RandomHorizontalFlip()
    geo_g = T.Compose([T.RandomResizedCrop(GLOBAL_SIZE, GLOBAL_SCALE, interpolation=bicubic), flip])
    geo_l = T.Compose([T.RandomResizedCrop(LOCAL_SIZE, LOCAL_SCALE, interpolation=bicubic), flip])
    g1 = T.Compose([colour, blur(blur_probs[0]), norm])
    g2 = T.Compose([colour, blur(blur_probs[1]), T.RandomSolarize(128, p=0.2), norm])
    loc = T.Compose([colour, blur(blur_probs[2]), norm])

    def run(data: bytes) -> dict:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        crops = [g1(geo_g(img)), g2(geo_g(img))]
        return {"global_crops": crops, "local_crops": [loc(geo_l(img)) for _ in range(N_LOCAL)]}

    return run


def time_round(fn, data: bytes, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(data)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=40, help="images per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = china_jpeg()
    ours = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, N_LOCAL, GLOBAL_SIZE, LOCAL_SIZE)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    pipelines = {"semlab": lambda d: ours(d, rng), "reference-style": reference_style(ours.blur_probs)}
    for fn in pipelines.values():  # warm-up
        time_round(fn, data, 3)
    best = {name: 0.0 for name in pipelines}
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            best[name] = max(best[name], time_round(fn, data, args.images))
    w, h = Image.open(io.BytesIO(data)).size
    print(
        f"china.jpg {w}x{h}, 2x{GLOBAL_SIZE} + {N_LOCAL}x{LOCAL_SIZE} crops, 1 thread, "
        f"best of {args.rounds} rounds x {args.images} images"
    )
    for name, ips in best.items():
        print(f"{name:>16}: {ips:6.1f} images/s per core")
    print(f"{'speed-up':>16}: {best['semlab'] / best['reference-style']:6.2f}x")


if __name__ == "__main__":
    main()
