"""Ray Data pipeline throughput: images/s and crops/s with 1 and 2 CPUs, on Demo shards and on real JPEGs.

    python benchmarks/data_pipeline.py [--images 192] [--cpus 1 2] [--workdir DIR]

For each source (``demo``: the Demo dataset, 112x112 JPEGs; ``jpeg``: copies of scikit-learn's china.jpg,
427x640, in an ImageFolder tree) the script prepares Parquet shards, then for each CPU count starts a fresh
local Ray with that many CPUs and measures, after one warm-up epoch (worker start-up and imports excluded):

- ``stream``: one epoch of ``build_ray_dataset`` through ``epoch_batches`` (decode + multi-crop in Ray
  Data, tensors in its threads);
- ``stream f32``: the same with float32 crops crossing the object store instead of uint8;
- ``train batches``: ``iter_training_batches`` (plus exact-size batches and iBOT masks);
- ``in-process``: the augmentation alone in this process with one torch thread, no Ray (per-core rate).

The 1-minute load average is printed before and after: on a shared machine the numbers move with it.

Crops per image = 2 global + ``crops.local_crops_number`` local (default recipe: 224 and 8 x 96).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from semlab.config import load_config  # noqa: E402
from semlab.orchestration.cluster import start_local  # noqa: E402


def china_tree(root: Path, n: int, classes: int = 4) -> str:
    """An ImageFolder tree with ``n`` copies of china.jpg (byte-identical files) spread over ``classes``."""
    import sklearn.datasets

    src = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    data = src.read_bytes()
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:05d}.jpg"
        if not path.exists():
            path.write_bytes(data)
    return f"ImageFolder:root={root}"


def prepare(dataset_str: str, out: Path) -> str:
    from semlab.data.datasets.shards import prepare_shards

    manifest = prepare_shards(dataset_str, str(out), splits=["TRAIN"], rows_per_shard=16, progress=False)
    n = manifest["splits"]["TRAIN"]["num_samples"]
    print(f"  shards: {out} ({n} images)", flush=True)
    return f"Parquet:path={out}:split=TRAIN"


def in_process_rate(dataset_str: str, cfg, n: int) -> float:
    import torch

    from semlab.data.datasets.factory import make_dataset
    from semlab.data.pipeline.augment import make_augmentation

    ds = make_dataset(dataset_str)
    aug = make_augmentation(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    items = [ds.get_encoded(i % len(ds))[0] for i in range(n)]
    aug(items[0], rng=0)
    t0 = time.perf_counter()
    for i, data in enumerate(items):
        aug(data, rng=i)
    rate = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return rate


def map_task_rate(stats: str) -> float:
    """Ray Data's "Estimated single task throughput" of the augmentation operator (images/s per task, i.e. per
    CPU), from ``Dataset.stats()``; NaN when absent. Less sensitive to other load than the wall-clock rate."""
    block = stats.split("MapBatches(augment_batch)", 1)[-1]
    match = re.search(r"Estimated single task throughput: ([0-9.]+) rows/s", block)
    return float(match.group(1)) if match else float("nan")


def timed_epoch(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def bench_source(
    name: str, parquet_str: str, cfg_overrides: list[str], cpus: list[int], n_images: int, workdir: Path
) -> list[tuple]:
    import ray

    from semlab.data.pipeline import ray_pipeline as rp

    rows = []
    for c in cpus:
        cfg = load_config(
            overrides=[
                f"train.dataset_path={parquet_str}",
                "data.map_num_cpus=1.0",
                "ray.num_workers=1",
                "ray.cpus_per_worker=0",
                *cfg_overrides,
            ]
        )
        crops_per_image = 2 + int(cfg.crops.local_crops_number)
        start_local(c, None, 1.0, str(workdir / "ray"), include_dashboard=False, loopback_only=True)
        try:
            for label, uint8 in (("stream", True), ("stream f32", False)):
                ds = rp.build_ray_dataset(cfg, emit_uint8=uint8)

                def one_epoch(ds=ds, cfg=cfg) -> int:
                    return sum(len(b["indices"]) for b in rp.epoch_batches(ds, cfg, 0, 0, 0, batch_size=32))

                one_epoch()  # warm-up: worker processes, imports
                n, dt = timed_epoch(one_epoch)
                per_task = map_task_rate(ds.stats())
                rows.append((name, c, label, n, dt, n / dt, n * crops_per_image / dt, per_task))
                print(
                    f"  {name} cpus={c} {label}: {n / dt:.1f} images/s ({per_task:.1f} per task)", flush=True
                )
            ds = rp.build_ray_dataset(cfg)
            it = rp.iter_training_batches(ds, cfg, seed=0)
            b = int(cfg.train.batch_size_per_gpu)
            steps = max(1, n_images // b)
            for _ in range(steps):  # warm-up epoch
                next(it)
            t0 = time.perf_counter()
            for _ in range(steps):
                next(it)
            dt = time.perf_counter() - t0
            it.close()  # before ray.shutdown: the stream reports to Ray when it closes
            ips = steps * b / dt
            rows.append((name, c, "train batches", steps * b, dt, ips, ips * crops_per_image, float("nan")))
            print(f"  {name} cpus={c} train batches: {steps * b / dt:.1f} images/s", flush=True)
        finally:
            ray.shutdown()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=192, help="images per source (default 192)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", default=None, help="work folder (default: a new folder under /tmp)")
    parser.add_argument("--sources", nargs="+", default=["demo", "jpeg"], choices=["demo", "jpeg"])
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="semlab-data-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = ["train.batch_size_per_gpu=32", "data.shuffle_buffer_size=64"]
    cfg = load_config(overrides=overrides)
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    try:
        for source in args.sources:
            if source == "demo":
                src = f"Demo:split=TRAIN:root={workdir / 'demo'}:n_per_class={max(1, args.images // 10)}"
            else:
                src = china_tree(workdir / "china", args.images)
            print(f"{source}: {src}", flush=True)
            parquet_str = prepare(src, workdir / f"shards-{source}")
            rate = in_process_rate(src, cfg, min(args.images, 64))
            crops = 2 + int(cfg.crops.local_crops_number)
            results.append((source, 1, "in-process (no Ray, 1 thread)", 64, 0.0, rate, rate * crops, rate))
            print(f"  {source} in-process: {rate:.1f} images/s", flush=True)
            results += bench_source(source, parquet_str, overrides, args.cpus, args.images, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out = io.StringIO()
    out.write("| source | Ray CPUs | path | images | images/s | crops/s | images/s per map task |\n")
    out.write("|---|---|---|---|---|---|---|\n")
    for source, c, label, n, _dt, ips, cps, per_task in results:
        task = "" if np.isnan(per_task) else f"{per_task:.1f}"
        out.write(f"| {source} | {c} | {label} | {n} | {ips:.1f} | {cps:.0f} | {task} |\n")
    print(out.getvalue())
    load = os.getloadavg()[0]
    print(f"cpu count: {os.cpu_count()}, numpy {np.__version__}, load average after: {load:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
