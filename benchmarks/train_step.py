"""Throughput of semlab's SSL training step on one accelerator, per speed variant, with synthetic crops.

torch only (no Ray, no MLflow): runs on a bare GPU machine. One step = ``semlab.train.loop.train_step``
(or ``train_step_sync_free``), the function ``do_train`` calls per iteration: schedules ->
``forward_backward`` (teacher on the 2 global crops, student on global + local crops, DINO + iBOT +
KoLeo, backward) -> loss all-reduce and finiteness check -> per-module gradient clipping -> AdamW -> EMA
teacher update. Inputs are random crops of the recipe's sizes collated with real iBOT masks, built once
and kept on the device (uint8 + on-device normalisation for the ``normalize-on-device`` variant), so the
figure is the model's speed without the data pipeline.

Variants (``--variants``, comma separated; each a set of config overrides on top of the recipe):

    eager               today's step (SDPA per crop size, foreach AdamW, plain cross-entropy)
    compile             train.compile (regional torch.compile per block, fullgraph)
    ac-selective/-full  train.activation_checkpointing
    fused-adamw         optim.fused
    chunked-ce          train.loss_chunk_rows=1024
    sync-free           train.sync_free_step (with --sync-debug: any CUDA sync in a timed step is an error)
    packed-sdpa         student.pack_crops (linear layers once over both crop sizes; SDPA per size)
    flex / packed-flex  student.attention=flex, per size / one pass with a document mask
    xformers / packed-xformers   student.attention=xformers (skipped when xFormers is not importable)
    normalize-on-device uint8 crops normalised on the device (data.normalize_on_device)
    all-fast            compile + fused-adamw + chunked-ce + sync-free + normalize-on-device (+ --fast-extra)

Correctness: every variant first takes one step from the same initial weights on the same batch; its
losses and gradients are compared with those of the first variant in the list (``eager``, or at a batch
where eager does not fit, ``ac-full``: recomputation is exact):
``loss_err`` = max relative difference of the loss parts, ``grad_err`` = the worst over parameter
tensors of ``||g - g_eager|| / ||g_eager||``. On CUDA the step runs in bf16 autocast, so errors of
order 1e-2 are bf16 rounding; on CPU (fp32) they are ~1e-6. Stochastic depth draws the same sample
subsets in every variant (the first samples of the batch, not a random permutation: one small kernel
less per block, not timed) so that the comparison is exact; ``--random-drop-path`` restores the
random draw and skips the check.

Timing: ``--warmup`` steps (the first one's wall time is reported as ``first_s``: compile time for
compiled variants), then ``--steps`` timed steps:

    images/s = batch * timed steps / wall time of the timed steps (CUDA synchronised)

``--feeds``: ``fixed`` feeds every step the same batch (float crops resident on the device, or uint8 crops
copied from pinned memory with ``data.normalize_on_device``); ``inline`` and ``threaded`` feed the steps
after the checked first one with batches assembled as on the Ray Data path (``input_pipeline``), on the
training thread or in background threads, so the difference to ``fixed`` is what the assembly costs a
real step (the GIL included).
    MFU      = images/s * TFLOP per image / --peak-tflops

TFLOP per image: 2.197 for the seed recipe (the reference's profiler count), else the analytic
estimate of ``benchmarks/flops.py`` (2.176 for the recipe). ``--peak-tflops`` defaults to 750, the
measured bf16 matmul peak of an H100 (733-779, shared/reference/README.md); an H200 has the same compute.

``--memory-cap-gib G`` (or ``--memory-fraction F``) caps the caching allocator with
``torch.cuda.set_per_process_memory_fraction``, so a bigger card behaves as an 80 GB H100 (79.6 GiB).

Examples::

    python benchmarks/train_step.py --batch 64 --memory-cap-gib 79.6 --variants eager,compile,ac-selective
    python benchmarks/train_step.py --device cpu --config-file train/demo_tiny --batch 4 --variants all \
        --compile-backend aot_eager student.embed_dim=48 student.depth=2 student.num_heads=3 \
        student.img_size=28
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import tflop_per_image  # noqa: E402

from semlab.config import apply_scaling_rules, load_config  # noqa: E402
from semlab.data.pipeline.collate import collate_data_and_cast  # noqa: E402
from semlab.data.pipeline.loaders import make_masking  # noqa: E402
from semlab.data.pipeline.normalize import CROP_KEYS, normalize_uint8  # noqa: E402
from semlab.models import attention, layers  # noqa: E402
from semlab.train.loop import train_step, train_step_sync_free  # noqa: E402
from semlab.train.meta_arch import SSLMetaArch  # noqa: E402
from semlab.train.parallel import parallelize  # noqa: E402
from semlab.train.param_groups import build_optimizer  # noqa: E402
from semlab.train.schedules import build_schedules  # noqa: E402
from semlab.train.speed import apply_speed_options  # noqa: E402

REFERENCE_IMAGES_PER_S = 95.6  # the reference's model code, one H100, bf16, batch 32
TFLOP_PER_IMAGE_VITL_SEM = 2.197
FAST = ["train.compile=true", "optim.fused=true", "train.loss_chunk_rows=1024", "train.sync_free_step=true",
        "data.normalize_on_device=true"]
# every variant starts from float crops already on the device (the recipe sets data.normalize_on_device,
# which adds the uint8 copy and normalisation to each step: the normalize-on-device variant measures it)
BASE = ["MODEL.pretrained_backbone=", "data.normalize_on_device=false"]
VARIANTS: dict[str, list[str]] = {
    "eager": [],
    "compile": ["train.compile=true"],
    "ac-selective": ["train.activation_checkpointing=selective"],
    "ac-full": ["train.activation_checkpointing=full"],
    "compile+ac-selective": ["train.compile=true", "train.activation_checkpointing=selective"],
    "compile+ac-full": ["train.compile=true", "train.activation_checkpointing=full"],
    "fused-adamw": ["optim.fused=true"],
    "chunked-ce": ["train.loss_chunk_rows=1024"],
    "sync-free": ["train.sync_free_step=true"],
    "packed-sdpa": ["student.pack_crops=true"],
    "flex": ["student.attention=flex"],
    "packed-flex": ["student.attention=flex", "student.pack_crops=true"],
    "xformers": ["student.attention=xformers"],
    "packed-xformers": ["student.attention=xformers", "student.pack_crops=true"],
    "normalize-on-device": ["data.normalize_on_device=true"],
    "all-fast": FAST,
}


def synthetic_batch(cfg, batch: int, seed: int = 0, uint8: bool = False) -> dict:
    """A collated batch of random crops with the recipe's sizes and real iBOT masks (uint8 pixels when
    ``uint8``, else their CPU-normalised float32 values: the same images either way)."""
    g = torch.Generator().manual_seed(seed)
    gs, ls = int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size)
    n_loc = int(cfg.crops.local_crops_number)

    def crop(size: int) -> torch.Tensor:
        return torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)

    samples = [
        ({"global_crops": [crop(gs) for _ in range(2)], "local_crops": [crop(ls) for _ in range(n_loc)]},
         0, i)
        for i in range(batch)
    ]
    mask_generator, n_tokens = make_masking(cfg)
    out = collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=float(cfg.ibot.mask_sample_probability),
        n_tokens=n_tokens,
        mask_generator=mask_generator,
        random=np.random.default_rng(seed),
    )
    if not uint8:
        out.update({k: normalize_uint8(out[k]) for k in CROP_KEYS})
    return out


def input_pipeline(cfg, batch: int, threaded: bool, pin: bool):
    """Batches assembled as on the Ray Data path, from pre-made augmented rows (random uint8 crops, so no
    decoding is timed): rows -> crop-major tensors (pinned: Ray's ``collate_fn`` + ``pin_memory``) ->
    exact-size batches + iBOT masks (semlab.data.pipeline.crop_batches). The first rows are an epoch's end
    of 3, so every batch after it is joined from two (one copy each): the steady state after the first
    epoch whenever a worker's share of the data is not a multiple of the batch. ``threaded``: each stage
    in its own background thread, 2 batches ahead (Ray runs the first in its format threads); else
    everything on the training thread."""
    from semlab.data.pipeline.crop_batches import exact_batches_with_masks, rows_to_crop_tensors
    from semlab.data.pipeline.prefetch import prefetch_in_thread

    rng = np.random.default_rng(0)
    gs, ls, n_loc = (int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size),
                     int(cfg.crops.local_crops_number))  # fmt: skip
    made = [
        {"global_crops": rng.integers(0, 256, (batch, 2, 3, gs, gs), dtype=np.uint8),
         "local_crops": rng.integers(0, 256, (batch, n_loc, 3, ls, ls), dtype=np.uint8),
         "label": np.zeros(batch, dtype=np.int64), "index": np.arange(batch, dtype=np.int64)}
        for _ in range(2)
    ]  # fmt: skip
    normalise = not bool(cfg.data.normalize_on_device)

    def rows():
        yield {k: v[:3] for k, v in made[0].items()}
        i = 0
        while True:
            yield made[i % 2]
            i += 1

    def tensors(r):
        t = rows_to_crop_tensors(r, normalise)
        return {k: v.pin_memory() for k, v in t.items()} if pin else t

    depth = 2 if threaded else 0
    stage1 = prefetch_in_thread((tensors(r) for r in rows()), depth, name="bench-tensors")
    return exact_batches_with_masks(stage1, cfg, 0, pin, depth, name="bench-masks")


def first_samples(b: int, ratio: float, device: torch.device) -> torch.Tensor:
    """Stochastic depth's sample subset, made deterministic: the first ``subset_size`` samples."""
    return torch.arange(layers.subset_size(b, ratio), device=device)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def losses_of(result: Any) -> dict[str, float]:
    if isinstance(result, tuple):
        return result[0]
    return result.to_host()[0]


class VariantError(RuntimeError):
    pass


def run_variant(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    reference: dict | None,
    keep_reference: bool,
    feed_mode: str = "fixed",
) -> dict:
    """Build, check against ``reference`` (the eager variant's losses and gradients) and time one variant;
    ``keep_reference``: return this variant's losses and gradients as the reference."""
    overrides = list(VARIANTS[name]) + (args.fast_extra if name == "all-fast" else [])
    cfg = load_config(
        args.config_file,
        [*BASE, f"train.batch_size_per_gpu={args.batch}", *args.overrides, *overrides],
    )
    cuda = device.type == "cuda"
    if str(cfg.student.attention) == "xformers" and attention.xformers_ops() is None:
        return {"variant": name, "status": "skipped: xFormers not importable"}
    if str(cfg.student.attention) == "flex" and not cuda:
        return {"variant": name, "status": "skipped: flex_attention has no CPU backward (torch 2.14)"}
    apply_scaling_rules(cfg, 1)
    torch.manual_seed(0)
    with torch.device(device) if cuda else contextlib.nullcontext():  # initialise on the GPU: fast
        model = SSLMetaArch(cfg)
    apply_speed_options(model, cfg, compile_backend=args.compile_backend)  # parallelize's call: a no-op
    model = parallelize(model, cfg, device, force_shard=args.fsdp)
    model.train()
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    schedules = build_schedules(cfg)
    uint8 = bool(cfg.data.normalize_on_device)
    batch = synthetic_batch(cfg, args.batch, uint8=uint8)
    batch = {k: v.pin_memory() if cuda and k in CROP_KEYS else v for k, v in batch.items()}
    sync_free = bool(cfg.train.sync_free_step)
    step_fn = train_step_sync_free if sync_free else train_step
    clip = float(cfg.optim.clip_grad or 0.0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    device_batch = None if uint8 else to_device(batch, device)
    stream = None if feed_mode == "fixed" else input_pipeline(cfg, args.batch, feed_mode == "threaded", cuda)

    def fixed() -> dict:  # uint8 crops are copied (and normalised) every step, as in training
        return batch if device_batch is None else device_batch

    def feed() -> dict:  # after the checked first step: the input pipeline's batches, when asked for
        return fixed() if stream is None else next(stream)

    t0 = time.perf_counter()
    torch.manual_seed(1)
    first = step_fn(model, optimizer, fixed(), schedules.at(0), clip)
    sync()
    first_s = time.perf_counter() - t0
    losses = losses_of(first)
    label = name if feed_mode == "fixed" else f"{name} [{feed_mode} input]"
    result: dict[str, Any] = {"variant": label, "overrides": overrides, "first_s": round(first_s, 2),
                              "is_reference": keep_reference, "feed": feed_mode}
    if reference is not None and not args.random_drop_path:
        loss_err = max(abs(losses[k] - reference["losses"][k]) / max(abs(reference["losses"][k]), 1e-6)
                       for k in reference["losses"])
        grad_err = 0.0
        for n, p in model.student.named_parameters():
            if p.grad is None or n not in reference["grads"]:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            ref = reference["grads"][n].to(g.device)
            grad_err = max(grad_err, float((g.float() - ref).norm() / ref.norm().clamp_min(1e-12)))
        ok = loss_err <= args.loss_tol and grad_err <= args.grad_tol
        result.update(loss_err=loss_err, grad_err=grad_err, check_ok=ok)
    elif keep_reference:
        result["reference"] = {
            "losses": losses,
            "grads": {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().cpu()
                      for n, p in model.student.named_parameters() if p.grad is not None},
        }
    for it in range(1, args.warmup):
        step_fn(model, optimizer, feed(), schedules.at(it), clip)
    sync()
    if cuda and sync_free and args.sync_debug:
        torch.cuda.set_sync_debug_mode("error")
    t0 = time.perf_counter()
    try:
        for it in range(args.warmup, args.warmup + args.steps):
            out = step_fn(model, optimizer, feed(), schedules.at(it), clip)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    sync()
    seconds = time.perf_counter() - t0
    if stream is not None:
        stream.close()
    losses = losses_of(out)
    images_per_s = args.batch * args.steps / seconds
    result.update(
        step_ms=round(1000 * seconds / args.steps, 1),
        images_per_s=round(images_per_s, 1),
        mfu=round(images_per_s * args.tflop_per_image / args.peak_tflops, 3) if cuda else None,
        peak_mem_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        losses_finite=all(math.isfinite(v) for v in losses.values()),
        losses={k: round(v, 4) for k, v in losses.items()},
        status="ok",
    )
    return result


def release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(results: list[dict], args: argparse.Namespace) -> str:
    rows = [
        f"batch {args.batch}, {args.tflop_per_image:.4g} TFLOP/image ({args.tflop_source}), "
        f"peak {args.peak_tflops} TFLOP/s",
        "| variant | images/s | MFU | peak GiB | first step s | loss err | grad err | check | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        def fmt(key: str, spec: str = "", r: dict = r) -> str:
            v = r.get(key)
            return "n/a" if v is None else format(v, spec)

        check = {True: "ok", False: "FAIL"}.get(r.get("check_ok"), "ref" if r.get("is_reference") else "-")
        rows.append(
            f"| {r['variant']} | {fmt('images_per_s')} | {fmt('mfu', '.1%')} | {fmt('peak_mem_GiB')} | "
            f"{fmt('first_s')} | {fmt('loss_err', '.1e')} | {fmt('grad_err', '.1e')} | {check} "
            f"| {r['status']} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="train/vitl14_sem_L512")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first one checked")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="eager", help=f"comma separated, 'all' = {','.join(VARIANTS)}")
    parser.add_argument("--fast-extra", nargs="*", default=[], help="more overrides for all-fast")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 over a 1-rank process group")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run, fp32)")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="cap the allocator (79.6 = an H100 80GB)")
    parser.add_argument("--memory-fraction", type=float, default=None, help="cap as a fraction of the card")
    parser.add_argument("--peak-tflops", type=float, default=750.0)
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager: a quick CPU smoke run")
    parser.add_argument("--loss-tol", type=float, default=None, help="2e-2 on CUDA (bf16), 1e-4 on CPU")
    parser.add_argument("--grad-tol", type=float, default=None, help="5e-2 on CUDA (bf16), 1e-3 on CPU")
    parser.add_argument("--random-drop-path", action="store_true", help="random stochastic depth; no check")
    parser.add_argument("--sync-debug", action="store_true", help="CUDA syncs in sync-free steps: an error")
    parser.add_argument("--feeds", default="fixed",
                        help="comma separated: fixed (one batch, default), inline or threaded (batches "
                             "assembled as on the Ray Data path, on the training thread or beside it)")
    parser.add_argument("--json-out", default=None, help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. student.arch=vit_small")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device is visible: run on a GPU machine, or pass --device cpu for a smoke run"
        )
    cuda = device.type == "cuda"
    args.loss_tol = args.loss_tol if args.loss_tol is not None else (2e-2 if cuda else 1e-4)
    args.grad_tol = args.grad_tol if args.grad_tol is not None else (5e-2 if cuda else 1e-3)
    args.feeds = [f.strip() for f in args.feeds.split(",") if f.strip()]
    if not args.feeds or set(args.feeds) - {"fixed", "inline", "threaded"}:
        raise SystemExit(f"--feeds takes fixed, inline and threaded, got {args.feeds}")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    names = list(VARIANTS) if names == ["all"] else names
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    cfg = load_config(args.config_file, ["MODEL.pretrained_backbone=", *args.overrides])
    recipe = args.config_file == "train/vitl14_sem_L512" and not args.overrides
    args.tflop_per_image = TFLOP_PER_IMAGE_VITL_SEM if recipe else tflop_per_image(cfg)
    args.tflop_source = "reference profiler count" if recipe else "analytic estimate, benchmarks/flops.py"
    if cuda and (args.memory_cap_gib or args.memory_fraction):
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = args.memory_fraction or min(1.0, args.memory_cap_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        args.memory_cap = f"{fraction:.3f} of {total / 2**30:.1f} GiB = {fraction * total / 2**30:.1f} GiB"
    if not args.random_drop_path:
        layers.sample_subset = first_samples  # every variant draws the same stochastic-depth subsets
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True  # compiled random ops draw as eager does (drop path, checks)
    if args.fsdp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)

    results: list[dict] = []
    reference = None
    runs = [(name, feed) for name in names for feed in args.feeds]
    for name, feed in runs:
        first = (name, feed) == runs[0]
        try:
            r = run_variant(name, args, device, reference, keep_reference=first, feed_mode=feed)
        except torch.OutOfMemoryError:
            r = {"variant": name, "feed": feed, "status": "out of memory"}
        except Exception as exc:  # one variant's failure must not lose the others' figures
            r = {"variant": name, "feed": feed,
                 "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}  # fmt: skip
        if first and "reference" in r:
            reference = r.pop("reference")
        results.append(r)
        release(device)
        print(f"# {json.dumps(r)}", file=sys.stderr, flush=True)  # survives a timeout of later variants

    header = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": args.config_file,
        "overrides": args.overrides,
        "arch": str(cfg.student.arch),
        "batch": args.batch,
        "fsdp": args.fsdp,
        "steps": args.steps,
        "memory_cap": getattr(args, "memory_cap", None),
        "tflop_per_image": args.tflop_per_image,
        "reference_H100_images_per_s": REFERENCE_IMAGES_PER_S,
    }
    print(table(results, args), flush=True)
    base = results[0] if results else {}
    summary = {**header, **{k: base.get(k) for k in ("images_per_s", "step_ms", "peak_mem_GiB", "losses",
                                                   "losses_finite")}, "variants": results}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    if args.fsdp:
        torch.distributed.destroy_process_group()
    failed = [r["variant"] for r in results if r.get("check_ok") is False or r.get("losses_finite") is False]
    if failed:
        raise SystemExit(f"variants that failed the check against eager or gave non-finite losses: {failed}")


if __name__ == "__main__":
    main()
