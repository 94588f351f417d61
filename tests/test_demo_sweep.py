"""benchmarks/demo_sweep: the variant renderer and one tiny sweep run end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "demo_sweep"))

import variants  # noqa: E402


def test_every_variant_renders_a_two_tone_texture() -> None:
    for name in variants.VARIANTS:
        image = variants.render(3, np.random.default_rng([1, 2]), name)
        assert image.size == (112, 112) and image.mode == "RGB"
        luma = np.asarray(image.convert("L"), dtype=np.float32)
        assert np.percentile(luma, 95) - np.percentile(luma, 5) > 0.6 * variants.MIN_CONTRAST, name
    grey = np.asarray(variants.render(0, np.random.default_rng(0), "one_grey"), dtype=np.float32)
    assert np.abs(grey[..., 0] - grey[..., 1]).mean() < 10  # grey up to the per-channel noise


@pytest.mark.slow
def test_sweep_runs_a_tiny_plan(tmp_path: Path) -> None:
    small = [
        "optim.epochs=1",
        "train.OFFICIAL_EPOCH_LENGTH=2",
        "train.batch_size_per_gpu=4",
        "train.dataset_path=Demo:split=TRAIN:n_per_class=3",
        "evaluation.knn_dataset_train=Demo:split=TRAIN:n_per_class=3",
        "evaluation.knn_dataset_val=Demo:split=VAL:n_per_class=2",
        "knn.nb_knn=[2]",
        "knn.batch_size=16",
    ]
    plan = {
        "base": small,
        "groups": {"A": {"pools": {"demo": {}}, "runs": [{"name": "r", "pool": "demo", "ov": []}]}},
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/demo_sweep/sweep.py"),
        "--plan",
        str(tmp_path / "plan.json"),
    ]
    cmd += ["--group", "A", "--out", str(out), "--workers", "0"]
    env = dict(os.environ, SEMLAB_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    pool, run = (json.loads(line) for line in out.read_text().splitlines())
    assert pool == {"pool": "demo", "batches": 2, "seconds": pool["seconds"]}
    assert run["run"] == "r" and run["iterations"] == 2
    assert set(run["knn"]) == {"teacher", "teacher_sem_raw", "teacher_train_tau", "random_init", "raw_pixels"}
    assert all(0.0 <= v <= 100.0 for v in run["knn"].values())
