"""How far one training step moves under bf16 (semlab) and fp16 (the reference) autocast.

The reference trains in fp16 with a gradient scaler; semlab in bf16 autocast with fp32 gradient
reduction. This benchmark runs semlab's training step (``SSLMetaArch.forward_backward``) once in
float32 and once under each low-precision autocast on the same weights and batch, and reports
the relative error of the loss and of the whole student gradient against float32:

    err_loss = |L_p - L_32| / |L_32|,   err_grad = ||g_p - g_32|| / ||g_32||

fp16 carries 10 mantissa bits against bf16's 7, so its per-step rounding error is smaller; bf16's
8-bit exponent removes fp16's overflow and underflow (what the grad scaler is for). The fp16 step
here is unscaled: one step of a small model does not underflow. Runs on the CPU, which supports
both autocast dtypes, with torch alone:

    python benchmarks/precision.py [--recipe train/demo_tiny] [--seeds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_batches import synthetic_batch  # noqa: E402

from semlab.config import apply_scaling_rules, load_config  # noqa: E402
from semlab.train.meta_arch import SSLMetaArch  # noqa: E402


def step(model: SSLMetaArch, batch: dict, dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    """Loss and flattened student gradient of one forward/backward under ``dtype`` autocast."""
    model.student.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    model.autocast = lambda: ctx  # the step's own autocast hook, pointed at the CPU dtype under test
    losses = model.forward_backward(batch, teacher_temp=0.04)
    grads = [p.grad.flatten().float() for p in model.student.parameters() if p.grad is not None]
    return float(losses["total"]), torch.cat(grads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="train/demo_tiny")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.recipe, args.overrides)
    apply_scaling_rules(cfg, 1)
    print(f"# {args.recipe} {args.overrides}, batch {args.batch}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print("seed  dtype  loss_fp32  err_loss  err_grad")
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = SSLMetaArch(cfg)
        batch = synthetic_batch(cfg, seed=seed, b=args.batch)
        loss32, g32 = step(model, batch, None)
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            loss, g = step(model, batch, dtype)
            err_l = abs(loss - loss32) / abs(loss32)
            err_g = float((g - g32).norm() / g32.norm())
            print(f"{seed:4d}  {name:5s}  {loss32:9.4f}  {err_l:8.2e}  {err_g:8.2e}")


if __name__ == "__main__":
    main()
