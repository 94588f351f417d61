"""The Ray path's staged collation (semlab.data.pipeline.crop_batches) equals the one-call collation.

Rows arrive from Ray Data in batches of any size (an epoch of N rows ends in N mod B); tensors, recut and
masks must give exactly the batch dicts that ``collate_data_and_cast`` gives on the same rows grouped by B,
with the same mask generator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semlab.config import load_config
from semlab.data.pipeline.collate import collate_data_and_cast
from semlab.data.pipeline.crop_batches import make_mask_drawer, recut, rows_to_crop_tensors, with_masks
from semlab.data.pipeline.loaders import make_masking
from semlab.data.pipeline.normalize import normalize_uint8

B = 4


def rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "global_crops": rng.integers(0, 256, (n, 2, 3, 32, 32), dtype=np.uint8),
        "local_crops": rng.integers(0, 256, (n, 3, 3, 16, 16), dtype=np.uint8),
        "label": rng.integers(0, 10, n),
        "index": np.arange(n) + 100,
    }


def chunks(data: dict[str, np.ndarray], sizes: list[int]):
    start = 0
    for size in sizes:
        yield {k: v[start : start + size] for k, v in data.items()}
        start += size


def reference_batches(cfg, data: dict[str, np.ndarray], normalise: bool, seed: int) -> list[dict]:
    """collate_data_and_cast on consecutive groups of B rows, one generator for the whole stream."""
    generator, n_tokens = make_masking(cfg)
    rng = np.random.default_rng(seed)
    out = []
    n = len(data["index"])
    for start in range(0, n - n % B, B):
        samples = []
        for i in range(start, start + B):
            g, loc = torch.from_numpy(data["global_crops"][i]), torch.from_numpy(data["local_crops"][i])
            if normalise:
                g, loc = normalize_uint8(g), normalize_uint8(loc)
            crops = {"global_crops": list(g.unbind(0)), "local_crops": list(loc.unbind(0))}
            samples.append((crops, int(data["label"][i]), int(data["index"][i])))
        out.append(
            collate_data_and_cast(
                samples,
                mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                mask_probability=float(cfg.ibot.mask_sample_probability),
                n_tokens=n_tokens,
                mask_generator=generator,
                random=rng,
            )
        )
    return out


@pytest.mark.parametrize("normalise", [True, False])
def test_staged_collation_equals_collate_data_and_cast_across_epoch_ends(normalise):
    cfg = load_config(
        "train/demo_tiny", ["crops.global_crops_size=32", "crops.local_crops_size=16", "student.patch_size=8"]
    )
    data = rows(23)
    # Ray Data's batches: full ones, an epoch's end of 3 rows, then batches offset by it
    sizes = [4, 4, 3, 0, 4, 4, 1, 2, 1]  # an empty batch is skipped
    assert sum(sizes) == 23
    tensors = (rows_to_crop_tensors(b, normalise) for b in chunks(data, sizes))
    draw = make_mask_drawer(cfg, seed=11)
    ours = [with_masks(b, draw) for b in recut(tensors, B)]
    ref = reference_batches(cfg, data, normalise, seed=11)
    assert len(ours) == len(ref) == 5  # 23 rows: 5 batches of 4, 3 rows wait for the next epoch
    for a, b in zip(ours, ref, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(b[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype, key
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key
    assert ours[0]["collated_global_crops"].dtype == (torch.float32 if normalise else torch.uint8)


def test_recut_passes_full_batches_through_and_copies_a_joined_batch_once():
    full = rows_to_crop_tensors(rows(B), normalise=False)
    (same,) = list(recut(iter([full]), B))
    assert same["global_crops"] is full["global_crops"]  # no copy for an aligned batch
    parts = [rows_to_crop_tensors(b, normalise=False) for b in chunks(rows(B, seed=1), [1, 3])]
    (joined,) = list(recut(iter(parts), B))
    assert joined["global_crops"].is_contiguous() and joined["global_crops"].shape == (2 * B, 3, 32, 32)
    # crop-major: crop 0 of the 4 samples, then crop 1; the first sample came from the first part
    assert torch.equal(joined["global_crops"][0], parts[0]["global_crops"][0])
    assert torch.equal(joined["global_crops"][B], parts[0]["global_crops"][1])
    assert torch.equal(joined["global_crops"][1], parts[1]["global_crops"][0])
    assert joined["indices"].tolist() == [100, 101, 102, 103]


def test_float_crops_cannot_stay_for_the_device():
    data = rows(2)
    data["global_crops"] = data["global_crops"].astype(np.float32)
    with pytest.raises(ValueError, match="must be uint8"):
        rows_to_crop_tensors(data, normalise=False)
