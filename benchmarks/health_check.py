"""Cost of the parameter health check (semlab.train.health) that runs before every checkpoint.

Times ``first_unhealthy`` (isfinite + abs-max, one pass per tensor) over a real ViT-L/14 backbone
on this machine, and counts the parameters the seed recipe's student + teacher hold (built on the
meta device, nothing allocated), to scale the figure to a real checkpoint.

    PYTHONPATH=. python benchmarks/health_check.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from semlab.config import load_config
from semlab.models import build_backbone
from semlab.train.health import first_unhealthy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = build_backbone("vit_large", img_size=224, patch_size=14, num_register_tokens=4)
    named = [(f"student.{k}", v.detach()) for k, v in backbone.named_parameters()]
    n = sum(v.numel() for _, v in named)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        assert first_unhealthy(named, 1000.0) is None
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"ViT-L/14 backbone: {n / 1e6:.1f} M params, check {best:.3f} s "
          f"({n / best / 1e9:.2f} G params/s, 1 thread, CPU)")

    from semlab.train.meta_arch import SSLMetaArch

    cfg = load_config("train/vitl14_sem_L512", ["MODEL.pretrained_backbone="])
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    parts = ("student.", "teacher.")
    total = sum(p.numel() for name, p in model.named_parameters() if name.startswith(parts))
    print(f"seed recipe student + teacher: {total / 1e6:.0f} M params -> about {total / (n / best):.1f} s "
          "per checkpoint at this rate (CPU, 1 thread; on GPU the check runs where the weights are)")


if __name__ == "__main__":
    main()
