"""Cost of one full training checkpoint: the sharded DCP save against the old gather + ``torch.save``.

For a CPU-sized SEM ViT (student + teacher + heads + both AdamW moments, built from the recipe's
defaults with a smaller backbone), on ``--world-size`` CPU processes over gloo with the model
sharded by FSDP2 as in training (one process: unsharded):

- ``dcp``: :func:`semlab.train.checkpointing.save_checkpoint` (``torch.distributed.checkpoint`` of
  the sharded state dicts; in one process the one shard is everything);
- ``gather+torch.save``: what semlab did before: full state dicts (``full_state_dict=True,
  cpu_offload=True``) then ``torch.save`` of one file.

It reports, per rank, wall time, the peak host memory above the baseline during the save (a 5 ms
sampler of ``VmRSS``) and the bytes that rank wrote, and the state's size, so that the figures can be
scaled to the recipe (see benchmarks/RESULTS.md).

    python benchmarks/checkpoint_cost.py --arch vit_small --world-size 3 --repeats 3 student.L=64
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from semlab.config import load_config  # noqa: E402
from semlab.train.checkpointing import save_checkpoint  # noqa: E402
from semlab.train.meta_arch import SSLMetaArch  # noqa: E402
from semlab.train.param_groups import build_optimizer  # noqa: E402


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Highest VmRSS seen while the ``with`` block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRss:
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def build(arch: str, overrides: list[str]):
    cfg = load_config("train/vitl14_sem_L512", [
        f"student.arch={arch}", "MODEL.pretrained_backbone=", "train.max_to_keep=0",
        "student.drop_path_rate=0", *overrides,
    ])  # fmt: skip
    model = SSLMetaArch(cfg)
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    for group in optimizer.param_groups:  # materialise both AdamW moments as a real step would
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}  # fmt: skip
    return cfg, model, optimizer


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(rank: int, world: int, port: int, args: argparse.Namespace, root: str) -> None:
    """One rank: build, shard, then time both ways of checkpointing; rank 0 prints the table."""
    import torch.distributed as dist

    from semlab.train.parallel import parallelize

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg, model, optimizer = build(args.arch, args.overrides)
    if world > 1:
        parallelize(model, cfg, torch.device("cpu"))
        optimizer = build_optimizer(model.get_params_groups(), cfg)
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}  # fmt: skip
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    rows = []
    for name in ("dcp", "gather+torch.save"):
        times, peaks, written = [], [], 0
        for r in range(args.repeats):
            out = Path(root) / f"{name.replace('+', '_')}_{r}"
            if world > 1:
                dist.barrier()
            with PeakRss() as mem:
                t0 = time.perf_counter()
                if name == "dcp":
                    path = save_checkpoint(model, optimizer, r, out, cfg)
                    mine = [p for p in path.iterdir() if p.name.startswith(f"__{rank}_")]
                    mine += [p for p in path.iterdir() if rank == 0 and not p.name.startswith("__")]
                else:
                    model_sd = get_model_state_dict(model, options=full)
                    optim_sd = get_optimizer_state_dict(model, optimizer, options=full)
                    mine = []
                    if rank == 0:
                        out.mkdir(parents=True, exist_ok=True)
                        torch.save({"model": model_sd, "optimizer": optim_sd}, out / "model.pth")
                        mine = [out / "model.pth"]
                    del model_sd, optim_sd
                    if world > 1:
                        dist.barrier()
                times.append(time.perf_counter() - t0)
            peaks.append(mem.peak - mem.base)
            written = sum(p.stat().st_size for p in mine)
            if world > 1:
                dist.barrier()
            if rank == 0:
                shutil.rmtree(out, ignore_errors=True)
        rows.append((name, min(times), sorted(times)[len(times) // 2], max(peaks), written))
    gathered = [rows]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
    if rank == 0:
        state = tensor_bytes(model.state_dict()) + tensor_bytes(optimizer.state_dict()["state"])
        print(f"arch {args.arch} {' '.join(args.overrides)}, {world} rank(s): "
              f"training state {state / 2**30:.2f} GiB (the whole model, sharded over the ranks)")
        for r, rank_rows in enumerate(gathered):
            for name, best, median, peak, wrote in rank_rows:
                print(f"rank {r} {name:18s} best {best:6.2f} s  median {median:6.2f} s  "
                      f"peak host memory +{peak / 2**30:.2f} GiB  wrote {wrote / 2**30:.2f} GiB")
    if world > 1:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vit_small", help="student.arch of the measured model")
    parser.add_argument("--world-size", type=int, default=1, help="CPU processes (FSDP2 over gloo)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. student.L=64")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="semlab-ckpt-bench-"))
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if args.world_size > 1:
        torch.multiprocessing.spawn(measure, args=(args.world_size, port, args, str(root)),
                                    nprocs=args.world_size)  # fmt: skip
    else:
        measure(0, 1, port, args, str(root))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
