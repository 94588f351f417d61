"""Linear probe: the grid recovers a known linear structure, selection is honest, the seed's CLI runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semlab.data.datasets.demo import DEMO_CLASSES
from semlab.eval.linear import (
    BEST_CLASSIFIER_FILE,
    RESULTS_FILE,
    LinearGrid,
    best_of,
    evaluate_grid,
    grid_specs,
    linear_input,
    load_linear_classifier,
    scale_lr,
    train_grid,
)
from semlab.eval.probe_data import InfiniteSampler, holdout_split

REPO = Path(__file__).resolve().parents[1]
D_BLOCK, N_BLOCKS, C = 8, 4, 10


def fake_blocks(x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """``get_intermediate_layers(n=4, return_class_token=True)``-shaped outputs whose CLS tokens are
    four 8-dim slices of x, and whose patch tokens are noise."""
    g = torch.Generator().manual_seed(int(x.abs().sum().item() * 1000) % 2**31)
    return tuple(
        (torch.randn(x.shape[0], 3, D_BLOCK, generator=g), x[:, D_BLOCK * i : D_BLOCK * (i + 1)])
        for i in range(N_BLOCKS)
    )


def batches(x: torch.Tensor, y: torch.Tensor, bs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0] - bs + 1, bs):
            yield x[perm[i : i + bs]], y[perm[i : i + bs]]


def synthetic(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_BLOCK * N_BLOCKS, C, generator=g)
    x = torch.randn(n, D_BLOCK * N_BLOCKS, generator=g)
    return x, (x @ w).argmax(1)


def fit_and_select(x_tr, y_tr, x_ho, y_ho, iters=250):
    specs = grid_specs([0.1, 1.0], [1, 4], [False, True], batch_size=128)
    grid = LinearGrid(specs, fake_blocks(x_tr[:2]), C)
    train_grid(grid, fake_blocks, batches(x_tr, y_tr, 128), iters, torch.device("cpu"))
    held = evaluate_grid(grid, fake_blocks, [(x_ho[i : i + 500], y_ho[i : i + 500])
                                             for i in range(0, len(x_ho), 500)], torch.device("cpu"))
    return grid, held


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is fastest, and far faster on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_grid_recovers_a_linear_map_and_not_shuffled_labels(one_thread):
    torch.manual_seed(0)
    x, y = synthetic(4000)
    x_tr, y_tr, x_ho, y_ho = x[:3000], y[:3000], x[3000:], y[3000:]
    grid, held = fit_and_select(x_tr, y_tr, x_ho, y_ho)
    best = best_of(held)
    assert held[best]["top1"] > 90.0, held
    # labels depend on all 32 dims: the last-block CLS alone (8 dims) cannot, 4 blocks can
    assert grid.specs[best].n_blocks == 4
    assert max(v["top1"] for k, v in held.items() if grid.specs[k].n_blocks == 1) < 60.0
    assert all(v["top5"] >= v["top1"] for v in held.values())

    # shuffled training labels: nothing to learn, held-out accuracy stays near the majority-class rate
    perm = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(1))
    _, held_shuffled = fit_and_select(x_tr, y_tr[perm], x_ho, y_ho)
    majority = 100.0 * np.bincount(y_ho.numpy(), minlength=C).max() / len(y_ho)
    assert max(v["top1"] for v in held_shuffled.values()) < majority + 8.0


def test_linear_input_and_grid_shapes():
    x = torch.randn(5, 32)
    out = fake_blocks(x)
    assert linear_input(out, 1, False).shape == (5, 8)
    assert torch.equal(linear_input(out, 4, False), x)
    assert linear_input(out, 4, True).shape == (5, 40)
    assert torch.equal(linear_input(out, 1, True)[:, 8:], out[-1][0].mean(1))
    sem = torch.rand(5, 64)
    assert torch.equal(linear_input(sem, 1, False), sem)
    specs = grid_specs([1e-3, 1e-2], [1, 4], [False, True], batch_size=512, world_size=4)
    assert len(specs) == 8 and len({s.name for s in specs}) == 8
    assert specs[0].scaled_lr == pytest.approx(1e-3 * 512 * 4 / 256) == scale_lr(1e-3, 512, 4)
    assert [s.n_blocks for s in grid_specs([1e-3, 1e-2], [1, 4], [False, True], 64, protocol="sem")] == [1, 1]
    with pytest.raises(ValueError, match="learning_rates"):
        grid_specs([], [1], [False], 64)


def test_holdout_split_is_deterministic_stratified_and_disjoint():
    labels = np.repeat(np.arange(5), [10, 20, 1, 40, 9])
    tr, ho = holdout_split(labels, 0.2, seed=3)
    tr2, ho2 = holdout_split(labels, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(ho, ho2)
    assert not set(tr) & set(ho) and len(tr) + len(ho) == len(labels)
    counts = np.bincount(labels[ho], minlength=5)
    assert counts.tolist() == [2, 4, 0, 8, 2]  # round(0.2 * n_c), >= 1 when n_c >= 2, never a whole class
    assert not np.array_equal(holdout_split(labels, 0.2, seed=4)[1], ho)
    with pytest.raises(ValueError, match="val_fraction"):
        holdout_split(labels, 1.0)
    it = iter(InfiniteSampler([3, 5, 7], seed=0))
    first = [next(it) for _ in range(9)]
    assert sorted(first[:3]) == [3, 5, 7] and sorted(first[3:6]) == [3, 5, 7]


# ----------------------------------------------------------------------------- the command line
SEED_EVAL_ARGS = [
    "--config-file", "dinov2/configs/eval/vitl14_L512.yaml",
    "--pretrained-weights", "<OUT>/eval/training_24999/teacher_checkpoint.pth",
    "--output-dir", "<OUT>/eval/training_24999/linear",
    "--train-dataset", "ImageNet:split=TRAIN:root=<DATA>:extra=<DATA>",
    "--val-dataset", "ImageNet:split=VAL:root=<DATA>:extra=<DATA>",
]


def _linear_cli():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import linear as cli  # experiments/linear.py
    finally:
        sys.path.pop(0)
    return cli


def test_seed_command_line_parses_to_the_eval_recipe():
    from semlab.config import load_config

    cli = _linear_cli()
    args = cli.parse_args(SEED_EVAL_ARGS + ["linear.epochs=2"])
    cfg = load_config(cli.resolve_recipe(args.config_file), cli.overrides_from_flags(args) + args.overrides)
    student = cfg.student
    assert (student.arch, student.L, student.V, student.patch_size) == ("vit_large_sem", 512, 256, 14)
    assert cfg.evaluation.sem_temp == pytest.approx(1e-5) and cfg.linear.epochs == 2
    # the reference's protocol: last block only, whole train set, best classifier picked on val
    assert list(cfg.linear.n_last_blocks) == [1] and cfg.linear.val_fraction == 0.0
    assert args.train_dataset.startswith("ImageNet:split=TRAIN") and not args.use_sem


def _teacher_checkpoint(path: Path) -> Path:
    """A teacher checkpoint of the demo model in semlab's layout ({"teacher": backbone.* + dino_head.*})."""
    from semlab.config import load_config
    from semlab.models import DINOHead, build_model_from_cfg

    torch.manual_seed(0)
    teacher, dim = build_model_from_cfg(load_config("train/demo_tiny"), only_teacher=True)
    state = {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
    head = DINOHead(dim, 32, hidden_dim=16, bottleneck_dim=8)
    state.update({f"dino_head.{k}": v for k, v in head.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"teacher": state}, path)
    return path


TINY = ["linear.epochs=1", "linear.epoch_length=6", "linear.batch_size=32", "linear.num_workers=0",
        "linear.learning_rates=[0.001,0.1]"]
TRAIN_DS, VAL_DS = "Demo:split=TRAIN:n_per_class=12", "Demo:split=VAL:n_per_class=6"


@pytest.mark.slow
def test_seed_command_runs_on_the_demo(tmp_path):
    """The seed's eval command, with the demo recipe and datasets, as a real subprocess."""
    import subprocess

    ckpt = _teacher_checkpoint(tmp_path / "out" / "eval" / "training_9" / "teacher_checkpoint.pth")
    out = tmp_path / "out" / "eval" / "training_9" / "linear"
    cmd = [sys.executable, str(REPO / "experiments" / "linear.py"), "--config-file", "train/demo_tiny",
           "--pretrained-weights", str(ckpt), "--output-dir", str(out), "--train-dataset", TRAIN_DS,
           "--val-dataset", VAL_DS, *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is fastest
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val top-1" in proc.stdout and "images/s" in proc.stdout
    assert "[reference: trained on all of train, best classifier picked on val]" in proc.stdout
    assert "SEM temperature tau = 1e-05 (the evaluation recipe eval/vitl14_L512)" in proc.stdout
    res = json.loads((out / RESULTS_FILE).read_text())
    assert res["protocol"] == "cls" and res["iterations"] == 6
    assert res["selection"] == "val" and res["selection_protocol"].startswith("reference")
    assert res["train_crop_scale"] == [0.5, 1.0]  # the demo recipe's probe crops
    assert res["final_loss_min"] <= res["final_loss_mean"]
    c = len(DEMO_CLASSES)  # the reference protocol: no holdout, the whole train set
    assert res["sizes"] == {"train": 12 * c, "holdout": 0, "val": 6 * c}
    assert len(res["classifiers"]) == 2 * 1 * 2  # lrs x n_last_blocks {1} x avgpool {no,yes}
    val = {k: v["val_top1"] for k, v in res["classifiers"].items()}
    assert val[res["best_classifier"]] == max(val.values()) == res["val_top1"]
    assert res["val_top1"] == res["classifiers"][res["best_classifier"]]["val_top1"]
    assert 0.0 <= res["val_top1"] <= res["val_top5"] <= 100.0
    clf, meta = load_linear_classifier(out / BEST_CLASSIFIER_FILE)
    assert meta["name"] == res["best_classifier"] and clf.num_classes == len(DEMO_CLASSES)
    assert clf.in_dim == 96 * meta["n_last_blocks"] + (96 if meta["avgpool"] else 0)


@pytest.mark.slow
def test_sem_protocol_probes_the_raw_simplex_on_parquet_shards(tmp_path, one_thread):
    from semlab.data.datasets.shards import prepare_shards

    shards = tmp_path / "shards"
    prepare_shards("Demo:split=TRAIN:n_per_class=6", str(shards), splits=["TRAIN", "VAL"], rows_per_shard=25,
                   progress=False)
    cli = _linear_cli()
    ckpt = _teacher_checkpoint(tmp_path / "ckpt" / "teacher_checkpoint.pth")
    out = tmp_path / "linear_sem"
    rc = cli.main(["--config-file", "train/demo_tiny", "--pretrained-weights", str(ckpt), "--output-dir",
                   str(out), "--train-dataset", f"Parquet:path={shards}:split=TRAIN",
                   "--val-dataset", f"Parquet:path={shards}:split=VAL", "--use-sem", "--no-progress",
                   "--val-fraction", "0.1", *TINY])
    assert rc == 0
    res = json.loads((out / RESULTS_FILE).read_text())
    assert res["protocol"] == "sem" and res["sem_temp"] == pytest.approx(1e-5)
    assert res["selection"] == "holdout" and res["selection_protocol"].startswith("holdout")
    c = len(DEMO_CLASSES)  # semlab's option: round(0.1 * 6) = 1 held-out image per class
    assert res["sizes"] == {"train": 5 * c, "holdout": c, "val": 6 * c}
    held = {k: v["holdout_top1"] for k, v in res["classifiers"].items()}
    assert held[res["best_classifier"]] == max(held.values()) == res["holdout_top1"]
    assert sorted(res["classifiers"]) == ["sem_lr0_001", "sem_lr0_1"]
    clf, meta = load_linear_classifier(out / BEST_CLASSIFIER_FILE)
    assert clf.in_dim == 16 * 16  # L * V of the demo model
    bad = cli.main(["--config-file", "train/demo_tiny", "--pretrained-weights", str(tmp_path / "missing.pth"),
                    "--output-dir", str(out), "--train-dataset", TRAIN_DS, "--val-dataset", VAL_DS, *TINY])
    assert bad == 2


def test_block_counts_beyond_the_model_depth_are_dropped():
    from semlab.eval.linear import usable_block_counts
    from semlab.models import build_backbone

    two_blocks = build_backbone("vit_small", depth=2, embed_dim=24, num_heads=2, img_size=28)
    assert usable_block_counts([1, 4], two_blocks) == [1]
    assert usable_block_counts([4], two_blocks) == [2]
    with pytest.raises(ValueError, match="positive"):
        usable_block_counts([0], two_blocks)
