"""benchmarks/train_step.py runs end to end on CPU (the GPU figures in RESULTS.md come from the same code)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_batches import TINY_SSL_48

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["single", "fsdp2-one-rank"])
def test_train_step_benchmark_cpu_smoke(fsdp: bool) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu"]
    cmd += ["--config-file", "train/demo_tiny", "--batch", "2", "--warmup", "1", "--steps", "2", *TINY_SSL_48]
    if fsdp:
        cmd.append("--fsdp")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fsdp"] is fsdp and result["batch"] == 2 and result["steps"] == 2
    assert result["losses_finite"] is True and result["images_per_s"] > 0
    assert set(result["losses"]) >= {"dino_global_crops_loss", "ibot_loss", "total"}


@pytest.mark.slow
def test_train_step_benchmark_checks_variants_against_eager() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu"]
    cmd += ["--config-file", "train/demo_tiny", "--batch", "2", "--warmup", "1", "--steps", "1", *TINY_SSL_48]
    cmd += ["--variants", "eager,chunked-ce,packed-sdpa,compile,flex", "--compile-backend", "aot_eager"]
    cmd += ["--feeds", "fixed,threaded"]  # threaded: batches assembled as on the Ray Data path
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| variant | images/s | MFU |" in out.stdout
    variants = {r["variant"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])["variants"]}
    assert variants["eager"]["is_reference"] is True
    for name in ("chunked-ce", "packed-sdpa", "compile", "eager [threaded input]"):
        assert variants[name]["check_ok"] is True and variants[name]["grad_err"] < 1e-3, variants[name]
    fed = variants["eager [threaded input]"]
    assert fed["losses_finite"] is True and fed["losses"] != variants["eager"]["losses"]  # other batches
    assert variants["flex"]["status"].startswith("skipped")  # no CPU backward


@pytest.mark.slow
def test_train_step_benchmark_refuses_cuda_without_gpu() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal only applies without one")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--config-file", "train/demo_tiny"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "--device cpu" in out.stderr


def test_flops_estimate_matches_the_reference_count_for_the_recipe() -> None:
    """benchmarks/flops.py's analytic count is within 2% of the reference profiler's 2.197 TFLOP/image,
    and scales with the model (ViT-S is far cheaper), so MFU for other archs is a fair estimate."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flops import tflop_per_image

    from semlab.config import load_config

    recipe = load_config("train/vitl14_sem_L512", ["MODEL.pretrained_backbone="])
    assert abs(tflop_per_image(recipe) - 2.197) / 2.197 < 0.02
    small = load_config("train/vitl14_sem_L512", ["MODEL.pretrained_backbone=", "student.arch=vit_small_sem"])
    assert tflop_per_image(small) < tflop_per_image(recipe) / 4
