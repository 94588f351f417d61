"""data.normalize_on_device: uint8 crops normalised on the device equal the CPU-normalised float crops.

The augmentation's pixels are integers in [0, 255] before its normalisation, so the uint8 path loses
nothing: the comparison is exact up to float32 rounding (far inside the 1/255 of one pixel level).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from synthetic_batches import TINY_SSL, synthetic_batch

from semlab.config import load_config
from semlab.data.pipeline.augment import DataAugmentationDINO
from semlab.data.pipeline.crop_batches import rows_to_crop_tensors
from semlab.data.pipeline.loaders import make_local_data_iterator
from semlab.data.pipeline.normalize import CROP_KEYS, normalize_uint8, to_device_normalized
from semlab.train.meta_arch import SSLMetaArch

ONE_LEVEL = 1.0 / (255 * 0.225)  # one pixel level in normalised units (largest std channel: smallest step)


def photo_jpeg(w: int = 500, h: int = 375) -> bytes:
    """A JPEG with smooth structure and noise (so jitter, blur and solarize all change pixels)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 37.0), 128 + 90 * np.cos(yy / 23.0), (xx + yy) % 256], -1)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_uint8_crops_normalised_equal_the_float_crops(monkeypatch):
    # PIL's process-wide pixel limit is lowered by other tests' loaders (data.max_image_pixels): reset it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 178956970)
    data = photo_jpeg()
    float_aug = DataAugmentationDINO(local_crops_size=98, local_crops_number=8)
    uint8_aug = DataAugmentationDINO(local_crops_size=98, local_crops_number=8, emit_uint8=True)
    for seed in range(6):  # 60 crops: every colour operation and blur/solarize branch occurs
        ref, ours = float_aug(data, rng=seed), uint8_aug(data, rng=seed)
        for key in ("global_crops", "local_crops"):
            for a, b in zip(ref[key], ours[key]):
                assert b.dtype == torch.uint8 and a.dtype == torch.float32
                err = (normalize_uint8(b) - a).abs().max().item()
                assert err < 1e-5 < ONE_LEVEL, err


def test_local_loader_batches_uint8_and_device_normalisation_matches():
    base = [
        "train.dataset_path=Demo:split=TRAIN:n_per_class=4",
        "train.num_workers=0",
        "train.batch_size_per_gpu=4",
    ]
    batches = {}
    for flag in ("false", "true"):
        cfg = load_config("train/demo_tiny", [*base, f"data.normalize_on_device={flag}"])
        it = make_local_data_iterator(cfg, seed=3)
        batches[flag] = next(it)
        it.close()
    ref, ours = batches["false"], batches["true"]
    assert all(ours[k].dtype == torch.uint8 for k in CROP_KEYS)
    moved = to_device_normalized(ours, torch.device("cpu"))
    for key in CROP_KEYS:
        assert moved[key].dtype == torch.float32
        assert (moved[key] - ref[key]).abs().max().item() < 1e-5
    assert torch.equal(moved["collated_masks"], ref["collated_masks"])


def test_ray_collate_keeps_uint8_when_normalising_on_device():
    rng = np.random.default_rng(0)
    batch = {
        "global_crops": rng.integers(0, 256, (4, 2, 3, 70, 70), dtype=np.uint8),
        "local_crops": rng.integers(0, 256, (4, 4, 3, 42, 42), dtype=np.uint8),
        "label": np.arange(4),
        "index": np.arange(4),
    }
    on_host = rows_to_crop_tensors(batch, normalise=True)
    kept = rows_to_crop_tensors(batch, normalise=False)
    assert kept["global_crops"].dtype == torch.uint8 and on_host["global_crops"].dtype == torch.float32
    moved = to_device_normalized(
        {"collated_global_crops": kept["global_crops"], "collated_local_crops": kept["local_crops"]},
        torch.device("cpu"),
    )
    for key in CROP_KEYS:
        assert (moved[key] - on_host[key.removeprefix("collated_")]).abs().max().item() < 1e-5


def test_training_step_on_uint8_batch_equals_float_batch():
    cfg = load_config("train/demo_tiny", TINY_SSL)
    u8 = synthetic_batch(cfg)
    g = torch.Generator().manual_seed(0)
    for key in CROP_KEYS:
        u8[key] = torch.randint(0, 256, u8[key].shape, generator=g, dtype=torch.uint8)
    as_float = {**u8, **{k: normalize_uint8(u8[k]) for k in CROP_KEYS}}
    results = []
    for batch in (as_float, u8):
        torch.manual_seed(0)
        model = SSLMetaArch(cfg)
        results.append(model.forward_backward(batch, teacher_temp=0.07))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=0, atol=0)
