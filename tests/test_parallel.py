"""FSDP2 / DDP-style data parallelism of a tiny SSLMetaArch over gloo on CPU (2 processes).

Every process runs this file as a script (``python tests/test_parallel.py --rank ...``): it builds
the same tiny SSLMetaArch, takes its half of a fixed global batch, parallelises the model, runs two
optimizer steps (forward_backward, per-module clip_grad_norm_, AdamW, EMA teacher update) and
gathers the full state dict. A single-process run on the whole global batch is the reference:
with the gradients averaged correctly, the two-rank losses and parameters equal the reference's
to float32 rounding.

Robustness: gloo processes sometimes abort at interpreter exit ("terminate called without an
active exception") after finishing. Each process therefore writes a result file as its last act;
the test trusts the files and tolerates a non-zero exit code only when every file says success.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from synthetic_batches import TINY_SSL_48

HERE = Path(__file__).resolve()
GLOBAL_BATCH = 4
STEPS = 2
TIMEOUT_S = 150
TINY = [
    *TINY_SSL_48,
    "student.arch=vit_tiny",
    "student.patch_size=14",
    "student.num_register_tokens=2",
    "student.drop_path_rate=0.0",
    "train.centering=sinkhorn_knopp",
    "dino.koleo_loss_weight=0.0",  # KoLeo is per-rank by design
    f"train.batch_size_per_gpu={GLOBAL_BATCH}",
]


# --------------------------------------------------------------------------- worker side
def _per_image(cfg, n_images: int) -> list[dict[str, torch.Tensor]]:
    """Fixed per-image crops and iBOT masks (seeded), so any split of the batch is reproducible."""
    g = torch.Generator().manual_seed(1234)
    gs, ls, n_local = (
        int(cfg.crops.global_crops_size),
        int(cfg.crops.local_crops_size),
        int(cfg.crops.local_crops_number),
    )
    n_patches = (gs // int(cfg.student.patch_size)) ** 2
    images = []
    for i in range(n_images):
        masks = torch.zeros(2, n_patches, dtype=torch.bool)
        if i % 2 == 0:  # half the images carry a mask on their first global crop, as the collate does
            masks[0, torch.randperm(n_patches, generator=g)[: 1 + i % n_patches]] = True
        images.append(
            {
                "global": torch.randn(2, 3, gs, gs, generator=g),
                "local": torch.randn(n_local, 3, ls, ls, generator=g),
                "masks": masks,
            }
        )
    return images


def _collate(images: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    """The contract's batch dict (crop-major) from per-image crops."""
    n_local = images[0]["local"].shape[0]
    masks = torch.cat([torch.stack([im["masks"][c] for im in images]) for c in range(2)])
    mask_indices = masks.flatten().nonzero().flatten()
    weights = (1.0 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "collated_global_crops": torch.cat(
            [torch.stack([im["global"][c] for im in images]) for c in range(2)]
        ),
        "collated_local_crops": torch.cat(
            [torch.stack([im["local"][c] for im in images]) for c in range(n_local)]
        ),
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "masks_weight": weights.float(),
        "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
        "upperbound": int(masks.shape[1] * masks.shape[0]),
        "labels": torch.zeros(len(images), dtype=torch.long),
        "indices": torch.arange(len(images)),
    }


def run_worker(rank: int, world: int, port: int, strategy: str, out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from semlab.config import load_config
    from semlab.train.meta_arch import SSLMetaArch
    from semlab.train.parallel import is_sharded, parallelize
    from semlab.train.param_groups import build_optimizer

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config("demo_tiny", [*TINY, f"compute_precision.sharding_strategy={strategy}"])
    torch.manual_seed(rank)  # different seeds per rank: parallelize must broadcast rank 0's init
    model = SSLMetaArch(cfg)
    b = GLOBAL_BATCH // world
    images = _per_image(cfg, GLOBAL_BATCH)[rank * b : (rank + 1) * b]
    batch = _collate(images)
    parallelize(model, cfg, torch.device("cpu"))
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 1e-2 * group["lr_multiplier"], 0.04 * group["wd_multiplier"]
    losses, norms = [], []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = model.forward_backward(batch, teacher_temp=0.07)["total"].clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
        step_norm = 0.0
        for module in model.student.values():
            norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], 3.0)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            step_norm += float(norm) ** 2
        norms.append(step_norm**0.5)
        optimizer.step()
        model.update_teacher(0.9)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    torch.save(
        {k: v.detach().clone() for k, v in state.items()}, out_dir / f"state_{world}_{strategy}_{rank}.pt"
    )
    local_numel = sum(
        p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()
    )
    result = {
        "ok": True,
        "losses": losses,
        "grad_norms": norms,
        "sharded": is_sharded(model.student),
        "local_numel": local_numel,
        "full_numel": sum(v.numel() for v in state.values()),
    }
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    (out_dir / f"result_{world}_{strategy}_{rank}.json").write_text(json.dumps(result))


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--strategy", default="SHARD_GRAD_OP")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        run_worker(args.rank, args.world, args.port, args.strategy, args.out)
    except BaseException:
        name = f"result_{args.world}_{args.strategy}_{args.rank}.json"
        (args.out / name).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        raise


# --------------------------------------------------------------------------- test side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, strategy: str, out: Path) -> list[subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE),
                "--rank",
                str(r),
                "--world",
                str(world),
                "--port",
                str(port),
                "--strategy",
                strategy,
                "--out",
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]


def _collect(procs: list[subprocess.Popen], world: int, strategy: str, out: Path) -> list[dict]:
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{world}-process {strategy} run did not finish in {TIMEOUT_S}s")
    results = []
    for r, (p, log) in enumerate(zip(procs, logs)):
        path = out / f"result_{world}_{strategy}_{r}.json"
        assert path.is_file(), f"rank {r} wrote no result (exit {p.returncode}):\n{log[-4000:]}"
        res = json.loads(path.read_text())
        assert res["ok"], f"rank {r} failed:\n{res.get('error')}\n{log[-4000:]}"
        if p.returncode != 0:  # tolerated only because the result file says success (see module doc)
            assert "terminate called" in log or p.returncode < 0, (
                f"rank {r} exit {p.returncode}:\n{log[-4000:]}"
            )
        results.append(res)
    return results


def _load_state(out: Path, world: int, strategy: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"state_{world}_{strategy}_{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """Reference (1 process) and the 2-process FSDP2 (both reshard modes) and DDP-style runs, together."""
    out = tmp_path_factory.mktemp("parallel")
    jobs = {
        (1, "SHARD_GRAD_OP"): None,
        (2, "SHARD_GRAD_OP"): None,
        (2, "FULL_SHARD"): None,
        (2, "NO_SHARD"): None,
    }
    procs = {key: _launch(key[0], key[1], out) for key in jobs}
    return out, {key: _collect(p, key[0], key[1], out) for key, p in procs.items()}


def _assert_states_close(a: dict, b: dict, atol: float, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["SHARD_GRAD_OP", "FULL_SHARD", "NO_SHARD"])
def test_two_ranks_match_single_process(runs, strategy):
    out, results = runs
    ref, two = results[(1, "SHARD_GRAD_OP")][0], results[(2, strategy)]
    for res in two:
        torch.testing.assert_close(
            torch.tensor(res["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            torch.tensor(res["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=1e-6
        )
    assert ref["losses"][0] != ref["losses"][1], "the step changed nothing: the comparison would be vacuous"
    ref_state = _load_state(out, 1, "SHARD_GRAD_OP", 0)
    # AdamW divides each gradient element by its own RMS, so an element whose gradient is at rounding
    # level moves by a sizeable fraction of lr (1e-2) on one side and not the other: a different (and
    # equally right) reduction order changed one of 9,216 fc1 weights by 7e-5 = 0.7 % of lr. Losses and
    # gradient norms above match to 1e-5; parameters match to 1 % of one step's lr.
    for rank in range(2):
        _assert_states_close(_load_state(out, 2, strategy, rank), ref_state, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_fsdp2_shards_parameters_and_gathers_full_state(runs):
    out, results = runs
    fsdp = results[(2, "SHARD_GRAD_OP")]
    assert all(r["sharded"] for r in fsdp)
    # each rank holds about half of every parameter (dim-0 shards, padding aside)
    for r in fsdp:
        assert r["local_numel"] < 0.6 * r["full_numel"]
    assert fsdp[0]["full_numel"] == results[(1, "SHARD_GRAD_OP")][0]["full_numel"]
    # the gathered full state dicts are identical on both ranks, bit for bit
    s0, s1 = _load_state(out, 2, "SHARD_GRAD_OP", 0), _load_state(out, 2, "SHARD_GRAD_OP", 1)
    _assert_states_close(s0, s1, atol=0.0, rtol=0.0)
    assert any(k.startswith("teacher.backbone.blocks.") for k in s0) and "dino_loss.center" in s0


@pytest.mark.slow
def test_no_shard_keeps_replicas_identical(runs):
    out, results = runs
    assert not any(r["sharded"] for r in results[(2, "NO_SHARD")])
    _assert_states_close(
        _load_state(out, 2, "NO_SHARD", 0), _load_state(out, 2, "NO_SHARD", 1), atol=0.0, rtol=0.0
    )


def test_single_process_is_a_noop():
    from semlab.config import load_config
    from semlab.train.meta_arch import SSLMetaArch
    from semlab.train.parallel import is_sharded, parallelize

    cfg = load_config("demo_tiny", TINY)
    model = SSLMetaArch(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model, cfg, "cpu") is model and not is_sharded(model)
    _assert_states_close(model.state_dict(), before, atol=0.0, rtol=0.0)


def test_force_shard_needs_a_process_group():
    from semlab.config import load_config
    from semlab.train.meta_arch import SSLMetaArch
    from semlab.train.parallel import ParallelError, parallelize

    cfg = load_config("demo_tiny", TINY)
    with pytest.raises(ParallelError, match="init_process_group"):
        parallelize(SSLMetaArch(cfg), cfg, "cpu", force_shard=True)


def test_bad_strategy_is_a_clear_error():
    from semlab.config import load_config
    from semlab.train.parallel import ParallelError, resolve_strategy

    cfg = load_config("demo_tiny", ["compute_precision.sharding_strategy=HYBRID"])
    with pytest.raises(ParallelError, match="SHARD_GRAD_OP"):
        resolve_strategy(cfg)


if __name__ == "__main__":
    _main(sys.argv[1:])
