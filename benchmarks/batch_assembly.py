"""Time the training thread waits for a batch on the Ray Data path, with the recipe's batch of 64 images.

    python benchmarks/batch_assembly.py [--rows 384] [--batches 24] [--step-ms 376] [--cpus 2]

The rows are already augmented (random uint8 crops of the recipe's shapes, 2 x 224 + 8 x 98, materialised
in the object store), so the numbers isolate what happens after the augmentation: crops to tensors
(crop-major, normalised on the host or kept uint8 for the device), exact-size batches and iBOT masks.
Two placements of that work, each with the crops normalised on the host and kept uint8:

- ``inline``: everything on the training thread (``data.prefetch_batches=0``,
  ``data.collate_prefetch_batches=0``);
- ``overlapped``: the recipe's settings -- ``iter_torch_batches`` runs the tensor conversion as its
  ``collate_fn`` in Ray Data's threads (``prefetch_batches=2``), one background thread cuts batches and
  draws masks (``collate_prefetch_batches=2``).

For each, a consumer that does nothing measures the assembly rate (batches/s, and ms per batch); a
consumer that sleeps ``--step-ms`` per batch (the step time of 170 images/s at batch 64) measures the
wait per step left on the training thread. A sleeping consumer releases the GIL; a real step's Python
thread holds it while it launches kernels, so the real wait lies between the two figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from semlab.config import load_config  # noqa: E402
from semlab.orchestration.cluster import start_local  # noqa: E402

PLACEMENTS = {
    "inline": ["data.prefetch_batches=0", "data.collate_prefetch_batches=0"],
    "overlapped": [],  # the recipe's defaults
}


def rows_dataset(n: int, cfg):
    """``n`` rows of random uint8 crops with the recipe's shapes, materialised (no augmentation cost)."""
    import ray

    g, loc = int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size)
    n_local = int(cfg.crops.local_crops_number)

    def make(batch: dict) -> dict:
        ids = np.asarray(batch["id"], dtype=np.int64)
        rng = np.random.default_rng(int(ids[0]))
        return {
            "global_crops": rng.integers(0, 256, (len(ids), 2, 3, g, g), dtype=np.uint8),
            "local_crops": rng.integers(0, 256, (len(ids), n_local, 3, loc, loc), dtype=np.uint8),
            "label": ids % 1000,
            "index": ids,
        }

    return ray.data.range(n).map_batches(make, batch_size=16).materialize()


def measure(ds, cfg, batches: int, step_s: float) -> list[float]:
    """Seconds the consumer waited in ``next()`` for each of ``batches`` batches (after 2 warm-up ones)."""
    from semlab.data.pipeline.ray_pipeline import iter_training_batches

    it = iter_training_batches(ds, cfg, seed=0, rank=0)
    for _ in range(2):
        next(it)
    waits = []
    for _ in range(batches):
        start = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - start)
        if step_s:
            time.sleep(step_s)
    it.close()
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--step-ms", type=float, default=376.0)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    start_local(args.cpus, 0, 2.0, tempfile.mkdtemp(prefix="semlab-ba-", dir="/tmp"), include_dashboard=False,
                loopback_only=True)  # fmt: skip
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    base = ["data.shuffle_buffer_size=128"]  # the recipe's 2048 rows would not fit --rows
    ds = rows_dataset(args.rows, load_config("train/vitl14_sem_L512", base))
    print(
        "| placement | crops | assembly, ms per batch of 64 (no step) | wait per step, ms (step sleeps "
        f"{args.step_ms:.0f} ms) |\n|---|---|---|---|"
    )
    for name, overrides in PLACEMENTS.items():
        for on_device in ("false", "true"):
            cfg = load_config(
                "train/vitl14_sem_L512", [*base, *overrides, f"data.normalize_on_device={on_device}"]
            )
            free = measure(ds, cfg, args.batches, 0.0)
            stepped = measure(ds, cfg, args.batches, args.step_ms / 1000)
            crops = "uint8, on the device" if on_device == "true" else "float32, on the host"
            print(
                f"| {name} | {crops} | {1000 * statistics.mean(free):.0f} | "
                f"{1000 * statistics.mean(stepped):.0f} (median {1000 * statistics.median(stepped):.0f}) |",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
