"""Does the demo recipe learn? Many short pretrainings on one machine, sharing pre-augmented batches.

Each run is the real ``do_train`` loop of ``train/demo_tiny`` plus overrides, followed by the k-NN report
of ``semlab.eval.knn_report`` (teacher CLS, SEM raw; random init and raw pixels once per pool). What makes
a sweep cheap is the data: a *pool* is the first N batches of ``make_local_data_iterator`` for a dataset --
exactly the batches a real run of that dataset sees -- computed once (``--workers`` processes) and kept on
the device; runs cycle through it, so a run with more iterations than the pool repeats its batches.

A plan (JSON) names groups of runs; one process runs one group, so several groups can share one GPU::

    {"base": ["knn.batch_size=256"],                       # overrides of every run
     "groups": {"A": {"pools": {"grey": {"variant": "one_grey"}, "demo": {}},
                      "runs": [{"name": "grey_t02", "pool": "grey", "ov": ["teacher.teacher_temp=0.02"]}]}}}

A pool is the Demo dataset, or ``{"variant": name}`` for a ``variants.py`` dataset under ``--data-dir`` (made
if missing), plus optional ``"ov"`` overrides (those that change the batches, e.g. ``student.patch_size``).
One JSON line per pool and run goes to stdout and ``--out``: training seconds, the DINO global loss at a
few iterations (``ln K x 2 / 10`` = 1.109 for K=256 means collapsed to uniform targets) and the k-NN top-1.

    python benchmarks/demo_sweep/sweep.py --plan benchmarks/demo_sweep/temperature.json --group C \\
        --data-dir /tmp/demo_variants --out /tmp/sweep_C.jsonl

The figures in benchmarks/RESULTS.md ("How the demo got here") came from ``collapse.json`` and
``temperature.json`` on a lent H200 (4 groups at once); their "v2" rows used the Demo dataset as it was then
(demo-v2), which the ``mosaic`` variant reproduces in design but not pixel for pixel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import variants  # noqa: E402

from semlab.config import load_config  # noqa: E402
from semlab.data.pipeline.loaders import make_local_data_iterator  # noqa: E402
from semlab.eval.knn_report import knn_report  # noqa: E402
from semlab.train.loop import METRICS_FILE, do_train, max_iterations  # noqa: E402
from semlab.train.meta_arch import SSLMetaArch  # noqa: E402
from semlab.train.pretraining import seed_everything  # noqa: E402

LOSS_AT = (9, 99, 199, 399, 719, 1439, 2879)


def pool_overrides(spec: dict[str, Any], data_dir: Path) -> list[str]:
    """Dataset overrides of a pool spec (see the module doc) followed by its own ``ov``."""
    overrides = []
    if spec.get("variant"):
        root = variants.generate(data_dir, spec["variant"])
        overrides = [
            f"train.dataset_path=ImageFolder:root={root}/train",
            f"evaluation.knn_dataset_train=ImageFolder:root={root}/train",
            f"evaluation.knn_dataset_val=ImageFolder:root={root}/val",
        ]
    return overrides + list(spec.get("ov", []))


def build_pool(cfg: Any, n_batches: int, device: torch.device) -> list[dict[str, Any]]:
    """The first ``n_batches`` training batches of ``cfg``, moved to ``device``."""
    data = make_local_data_iterator(cfg)
    try:
        return [
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(data).items()}
            for _ in range(n_batches)
        ]
    finally:
        data.close()


def run_one(cfg: Any, pool: list[dict[str, Any]], device: torch.device, baselines: bool) -> dict[str, Any]:
    """Train on the cycled pool, then k-NN; returns the record fields of the run."""
    seed_everything(int(cfg.train.seed))
    model = SSLMetaArch(cfg).to(device)
    cfg.train.checkpoint_period_iterations = 10**9  # the final checkpoint only
    cfg.evaluation.eval_period_iterations = 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        do_train(cfg, model, itertools.cycle(pool), out, resume=False)
        history = [json.loads(line) for line in (Path(out) / METRICS_FILE).read_text().splitlines()]
    train_s = time.time() - t0
    report = knn_report(cfg, model.teacher.backbone, None, baselines=baselines)
    loss = {
        h["iteration"]: round(h["dino_global_crops_loss"], 3) for h in history if h["iteration"] in LOSS_AT
    }
    return {
        "train_s": round(train_s, 1),
        "knn": {k: round(v, 2) for k, v in report["top1"].items()},
        "loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plan", required=True, help="plan JSON (see the module doc)")
    parser.add_argument("--group", required=True, help="which group of the plan this process runs")
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    parser.add_argument("--data-dir", default="outputs/demo_variants", help="where variants are generated")
    parser.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 1, 1))
    parser.add_argument("--deadline", type=float, default=float("inf"), help="no new run after this many s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    plan = json.loads(Path(args.plan).read_text())
    if args.group not in plan.get("groups", {}):
        raise SystemExit(
            f"plan {args.plan} has no group {args.group!r}; it has {sorted(plan.get('groups', {}))}"
        )
    group = plan["groups"][args.group]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pools: dict[str, list[dict[str, Any]]] = {}
    start = time.time()

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")

    for run in group["runs"]:
        if time.time() - start > args.deadline:
            emit({"run": run["name"], "skipped": "deadline"})
            continue
        name = run["pool"]
        overrides = (
            plan.get("base", []) + pool_overrides(group["pools"][name], Path(args.data_dir)) + run["ov"]
        )
        cfg = load_config("train/demo_tiny", [*overrides, f"train.num_workers={args.workers}"])
        baselines = name not in pools
        if baselines:
            t0 = time.time()
            n_batches = int(cfg.optim.epochs) * int(cfg.train.OFFICIAL_EPOCH_LENGTH)
            n_batches = min(n_batches, int(group["pools"][name].get("batches", 720)))
            pools[name] = build_pool(cfg, n_batches, device)
            emit({"pool": name, "batches": n_batches, "seconds": round(time.time() - t0, 1)})
        record = {"run": run["name"], "pool": name, "ov": run["ov"], "iterations": max_iterations(cfg)}
        record.update(run_one(cfg, pools[name], device, baselines))
        emit(record)


if __name__ == "__main__":
    main()
