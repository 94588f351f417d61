"""Throughput of semlab's SSL training step on one accelerator, with synthetic crops (torch only).

One step = ``semlab.train.loop.train_step``, the function ``do_train`` calls per iteration: schedules ->
``forward_backward`` (teacher on the 2 global crops, student on global + local crops, DINO + iBOT +
KoLeo, backward) -> loss all-reduce and finiteness check -> per-module gradient clipping -> AdamW ->
EMA teacher update. Inputs are random crops of the
recipe's sizes, collated with real iBOT masks (half the global crops, ratios 0.1-0.5), built once
and kept on the device, so the figure is the model's speed without the data pipeline.

    images/s = batch * timed steps / wall time of the timed steps (CUDA synchronised)

``--fsdp`` starts a one-rank NCCL process group and shards the model with FSDP2 (the path the
Ray Train workers take, here on a single GPU: bf16 parameters, fp32 gradient reduction).

Examples::

    python benchmarks/train_step.py                              # the seed recipe, ViT-L/14 SEM L=512
    python benchmarks/train_step.py --batch 64 --fsdp
    python benchmarks/train_step.py student.arch=vit_small dino.head_n_prototypes=4096
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch

from semlab.config import apply_scaling_rules, load_config
from semlab.data.pipeline.collate import collate_data_and_cast
from semlab.data.pipeline.loaders import make_masking
from semlab.train.loop import train_step
from semlab.train.meta_arch import SSLMetaArch
from semlab.train.parallel import parallelize
from semlab.train.param_groups import build_optimizer
from semlab.train.schedules import build_schedules

# The reference's measured anchors (shared/reference/README.md, one H100, bf16, batch 32)
REFERENCE_IMAGES_PER_S = 95.6
TFLOP_PER_IMAGE_VITL_SEM = 2.197


def synthetic_batch(cfg, batch: int, seed: int = 0) -> dict:
    """A collated batch of random crops with the recipe's sizes and real iBOT masks."""
    g = torch.Generator().manual_seed(seed)
    gs, ls = int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size)
    n_loc = int(cfg.crops.local_crops_number)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, gs, gs, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, ls, ls, generator=g) for _ in range(n_loc)],
            },
            0,
            i,
        )
        for i in range(batch)
    ]
    mask_generator, n_tokens = make_masking(cfg)
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=float(cfg.ibot.mask_sample_probability),
        n_tokens=n_tokens,
        mask_generator=mask_generator,
        random=np.random.default_rng(seed),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="train/vitl14_sem_L512")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 over a 1-rank process group")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run, fp32)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. student.arch=vit_small")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device is visible: run on a GPU machine, or pass --device cpu for a smoke run"
        )
    cuda = device.type == "cuda"
    cfg = load_config(
        args.config_file,
        ["MODEL.pretrained_backbone=", f"train.batch_size_per_gpu={args.batch}", *args.overrides],
    )
    if args.fsdp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    apply_scaling_rules(cfg, 1)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model = parallelize(model, cfg, device, force_shard=args.fsdp)
    model.train()
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    schedules = build_schedules(cfg)
    batch = synthetic_batch(cfg, args.batch)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    n_params = sum(p.numel() for p in model.student.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(it: int) -> dict[str, float]:
        losses, _ = train_step(model, optimizer, batch, schedules.at(it), float(cfg.optim.clip_grad or 0.0))
        return losses

    for it in range(args.warmup):
        step(it)
    sync()
    t0 = time.perf_counter()
    for it in range(args.warmup, args.warmup + args.steps):
        losses = step(it)
    sync()
    seconds = time.perf_counter() - t0
    images_per_s = args.batch * args.steps / seconds
    finite = all(math.isfinite(v) for v in losses.values())
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": args.config_file,
        "overrides": args.overrides,
        "arch": str(cfg.student.arch),
        "L": int(cfg.student.L),
        "V": int(cfg.student.V),
        "batch": args.batch,
        "fsdp": args.fsdp,
        "student_params_M": round(n_params / 1e6, 1),
        "steps": args.steps,
        "step_ms": round(1000 * seconds / args.steps, 1),
        "images_per_s": round(images_per_s, 1),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "losses_finite": finite,
        "losses": {k: round(v, 4) for k, v in losses.items()},
    }
    if args.config_file == "train/vitl14_sem_L512" and not args.overrides:
        result["achieved_TFLOP_per_s"] = round(images_per_s * TFLOP_PER_IMAGE_VITL_SEM, 1)
        result["reference_H100_images_per_s"] = REFERENCE_IMAGES_PER_S
    print(json.dumps(result), flush=True)
    if args.fsdp:
        torch.distributed.destroy_process_group()
    if not finite:
        raise SystemExit("non-finite loss in the benchmark step")


if __name__ == "__main__":
    main()
