"""DLC export: codes round-trip through Parquet and equal the argmax of the raw SEM output."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_tiny_vit, import_experiment, write_teacher_checkpoint

from semlab.data.datasets.demo import DEMO_CLASSES
from semlab.eval.dlc import (
    CODES_FILE,
    HISTOGRAM_FILE,
    SUMMARY_FILE,
    code_usage,
    export_dlc,
    read_codes_parquet,
    write_codes_parquet,
)
from semlab.models import build_backbone

L, V = 8, 16


def tiny_sem(seed: int = 0) -> torch.nn.Module:
    return build_tiny_vit(seed, embed_dim=48, depth=2, num_heads=3, patch_size=14, num_register_tokens=4,
                          init_values=None, L=L, V=V)


@pytest.mark.slow
def test_codes_roundtrip_parquet_equals_argmax_of_raw_sem(tmp_path):
    model = tiny_sem()
    x = torch.randn(21, 3, 56, 56)
    y = torch.arange(21) % 4
    summary = export_dlc(model, torch.utils.data.TensorDataset(x, y), tmp_path, batch_size=8, progress=False,
                         metadata={"checkpoint": "random-init"})
    idx, labels, codes, meta = read_codes_parquet(tmp_path / CODES_FILE)
    with torch.no_grad():
        expected = model.sem_raw(x, temp=1e-5).view(21, L, V).argmax(-1).numpy()
        expected_t1 = model.sem_raw(x, temp=1.0).view(21, L, V).argmax(-1).numpy()
    assert codes.dtype == np.uint16 and codes.shape == (21, L)
    assert np.array_equal(codes.astype(np.int64), expected)
    assert np.array_equal(expected, expected_t1)  # argmax does not depend on tau
    assert np.array_equal(idx, np.arange(21)) and np.array_equal(labels, y.numpy())
    assert meta == {"L": str(L), "V": str(V), "checkpoint": "random-init"}
    schema = pq.read_schema(tmp_path / CODES_FILE)
    assert str(schema.field("codes").type) == f"fixed_size_list<element: uint16>[{L}]"
    on_disk = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert on_disk["entropy_bits"] == summary["entropy_bits"] and on_disk["L"] == L
    assert (tmp_path / HISTOGRAM_FILE).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_code_usage_statistics():
    V4 = 4
    codes = np.stack([np.zeros(8), np.arange(8) % 4, np.array([0, 0, 0, 0, 0, 0, 1, 1])], axis=1)
    s = code_usage(codes.astype(np.uint16), V4)
    h_last = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert s["per_simplex_entropy_bits"] == pytest.approx([0.0, 2.0, h_last], abs=1e-6)
    assert s["per_simplex_used_vertices"] == [1, 4, 2]
    assert s["entropy_bits"]["min"] == pytest.approx(0.0) and s["entropy_bits"]["max"] == pytest.approx(2.0)
    assert s["used_vertices"] == {"mean": pytest.approx(7 / 3), "min": 1, "max": 4}
    assert s["max_entropy_bits"] == 2.0 and s["distinct_codes"] == 6  # (0,k,0) for k<4, (0,2,1), (0,3,1)


def test_bad_codes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="codes must lie in"):
        write_codes_parquet(tmp_path / "c.parquet", np.full((2, 3), 9), np.zeros(2), V=4)
    plain = build_backbone("vit_tiny", embed_dim=48, depth=1, num_heads=3, patch_size=14, img_size=56)
    with pytest.raises(ValueError, match="SEM"):
        export_dlc(plain, torch.utils.data.TensorDataset(torch.randn(2, 3, 56, 56), torch.zeros(2)), tmp_path,
                   progress=False)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, above all on a loaded machine
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_extract_dlc_command_on_the_demo(tmp_path, capsys, one_thread):
    """experiments/extract_dlc.py on a demo teacher checkpoint; the Parquet codes equal the argmax of
    ``sem_raw`` recomputed on the same images."""
    from semlab.config import load_config
    from semlab.data import make_dataset
    from semlab.eval.dlc import make_dlc_transform
    from semlab.eval.linear import build_eval_backbone
    from semlab.models import build_model_from_cfg

    cfg = load_config("train/demo_tiny")
    torch.manual_seed(1)
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    ckpt = write_teacher_checkpoint(tmp_path / "eval" / "training_9" / "teacher_checkpoint.pth", teacher)
    extract_dlc = import_experiment("extract_dlc")
    dataset = "Demo:split=VAL:n_per_class=3"
    n = 3 * len(DEMO_CLASSES)
    out = tmp_path / "dlc"
    rc = extract_dlc.main(["--config-file", "train/demo_tiny", "--pretrained-weights", str(ckpt), "--dataset",
                           dataset, "--output", str(out), "--batch-size", "7", "--no-progress"])
    assert rc == 0
    assert f"DLC code usage over {n} images" in capsys.readouterr().out
    idx, labels, codes, meta = read_codes_parquet(out / CODES_FILE)
    assert meta["L"] == "16" and meta["V"] == "16" and meta["dataset"] == dataset
    # the reference's extraction: CenterCrop of the image as it is (no resize first), float32
    ds = make_dataset(dataset, transform=make_dlc_transform(cfg.linear.crop_size))
    raw_image = make_dataset(dataset)[0][0]
    assert raw_image.size != (cfg.linear.resize_size, cfg.linear.resize_size)  # a resize would change it
    model = build_eval_backbone(cfg, ckpt)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        raw = model.sem_raw(x, temp=cfg.evaluation.sem_temp)
    assert raw.shape == (n, 16 * 16)
    assert np.array_equal(codes.astype(np.int64), raw.view(n, 16, 16).argmax(-1).numpy())
    assert np.array_equal(labels, ds.labels) and np.array_equal(idx, np.arange(n))
    usage = json.loads((out / SUMMARY_FILE).read_text())
    assert 1 <= usage["used_vertices"]["min"] <= usage["used_vertices"]["max"] <= 16
    # a plain (non-SEM) model has no codes: a clear error, exit code 2
    assert extract_dlc.main(["--config-file", "train/demo_tiny", "--dataset", dataset, "--output", str(out),
                             "student.L=0", "student.arch=vit_tiny", "--no-progress"]) == 2
    assert "has no SEM" in capsys.readouterr().err
