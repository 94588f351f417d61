"""Block masking, the collate into the batch dict, and the local data iterator (sampler, resume)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from semlab.data import CorruptImageError, MaskingGenerator, collate_data_and_cast, make_local_data_iterator
from semlab.data.datasets.demo import DEMO_CLASSES
from semlab.data.pipeline.loaders import EpochShuffleSampler

# ---- masking -----------------------------------------------------------------------------------------


def test_masking_generator_counts_and_shapes() -> None:
    gen = MaskingGenerator(input_size=(16, 16), max_num_patches=128)
    rng = random.Random(0)
    assert gen(0, rng=rng).sum() == 0 and gen(0).shape == (16, 16) and gen(0).dtype == bool
    ratios = []
    for n in (4, 10, 25, 50, 77, 100, 128):
        for _ in range(20):
            mask = gen(n, rng=rng)
            assert mask.shape == (16, 16) and mask.dtype == bool
            assert 0 < mask.sum() <= n  # never more than asked
            ratios.append(mask.sum() / n)
    assert np.mean(ratios) > 0.8  # and usually close to it
    # blocks, not scattered pixels: most masked patches have a masked 4-neighbour
    mask = gen(60, rng=rng)
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (neighbours & mask).sum() >= 0.9 * mask.sum()


def test_masking_generator_is_deterministic_with_any_rng() -> None:
    gen = MaskingGenerator(input_size=(14, 14), max_num_patches=98)
    assert np.array_equal(gen(40, rng=random.Random(3)), gen(40, rng=random.Random(3)))
    assert np.array_equal(gen(40, rng=np.random.default_rng(3)), gen(40, rng=np.random.default_rng(3)))
    assert np.array_equal(gen(40, rng=7), gen(40, rng=7))
    assert not np.array_equal(gen(40, rng=random.Random(3)), gen(40, rng=random.Random(4)))


# ---- collate -----------------------------------------------------------------------------------------


def fake_samples(batch: int, n_local: int = 3, g: int = 28, loc: int = 14, with_index: bool = True) -> list:
    samples = []
    for i in range(batch):
        crops = {
            "global_crops": [torch.full((3, g, g), 10.0 * i + k) for k in range(2)],
            "local_crops": [torch.full((3, loc, loc), 100.0 + 10.0 * i + k) for k in range(n_local)],
        }
        crops["global_crops_teacher"] = crops["global_crops"]
        samples.append((crops, i % 3, 1000 + i) if with_index else (crops, i % 3))
    return samples


def test_collate_shapes_and_crop_major_order() -> None:
    batch, n_local, grid = 4, 3, 2
    gen = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    out = collate_data_and_cast(
        fake_samples(batch, n_local),
        (0.1, 0.5),
        0.5,
        torch.float16,
        grid * grid,
        gen,
        random=random.Random(0),
    )
    assert out["collated_global_crops"].shape == (2 * batch, 3, 28, 28)
    assert out["collated_global_crops"].dtype == torch.float16
    assert out["collated_local_crops"].shape == (n_local * batch, 3, 14, 14)
    # crop-major: row k * B + i is sample i's crop k
    assert out["collated_global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]
    assert out["collated_local_crops"][batch, 0, 0, 0].item() == 101.0
    assert (
        out["collated_masks"].shape == (2 * batch, grid * grid) and out["collated_masks"].dtype == torch.bool
    )
    assert out["labels"].tolist() == [0, 1, 2, 0] and out["labels"].dtype == torch.long
    assert out["indices"].tolist() == [1000, 1001, 1002, 1003]
    no_index = collate_data_and_cast(
        fake_samples(2, with_index=False), n_tokens=4, mask_generator=gen, random=1
    )
    assert no_index["indices"].tolist() == [-1, -1]


@pytest.mark.parametrize(("batch", "probability", "ratio"), [(8, 0.5, (0.1, 0.5)), (5, 0.3, (0.2, 0.4))])
def test_collate_masks_ratios_and_weights(batch: int, probability: float, ratio: tuple[float, float]) -> None:
    grid = 16
    n_tokens = grid * grid
    gen = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * n_tokens)
    rng = np.random.default_rng(0)
    for _ in range(10):
        out = collate_data_and_cast(
            fake_samples(batch, 1), ratio, probability, torch.float32, n_tokens, gen, random=rng
        )
        masks = out["collated_masks"]
        counts = masks.sum(-1)
        n_masked_crops = int(2 * batch * probability)
        assert (counts > 0).sum() <= n_masked_crops
        assert (counts == 0).sum() >= 2 * batch - n_masked_crops
        # each masked crop asked for at most N * ratio_max patches; and at least N * ratio_min was asked
        assert counts.max() <= n_tokens * ratio[1]
        assert sorted(counts.tolist())[-n_masked_crops] >= 0.5 * n_tokens * ratio[0]
        probs = np.linspace(ratio[0], ratio[1], n_masked_crops + 1)
        assert out["upperbound"] == sum(int(n_tokens * p) for p in probs[1:])
        assert out["n_masked_patches"].tolist() == [int(counts.sum())] <= [out["upperbound"]]
        assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
        # masks_weight: 1 / (masked patches of its crop) for each masked patch -> sums to 1 per masked crop
        weights = torch.zeros_like(masks, dtype=torch.float32)
        weights.view(-1)[out["mask_indices_list"]] = out["masks_weight"]
        per_crop = weights.sum(-1)
        assert torch.allclose(per_crop[counts > 0], torch.ones(int((counts > 0).sum())))
        assert torch.all(per_crop[counts == 0] == 0)


def test_collate_is_deterministic_and_shuffles_masked_crops() -> None:
    gen = MaskingGenerator(input_size=(8, 8), max_num_patches=32)
    samples = fake_samples(16, 1, g=8, loc=4)
    a = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, 64, gen, random=random.Random(1))
    b = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, 64, gen, random=random.Random(1))
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    positions = set()
    for seed in range(20):
        out = collate_data_and_cast(
            samples, (0.1, 0.5), 0.5, torch.float32, 64, gen, random=random.Random(seed)
        )
        positions |= set(out["collated_masks"].any(-1).nonzero().flatten().tolist())
    assert len(positions) > 20  # masked crops land anywhere in the batch, not always the first half


# ---- the local data iterator -------------------------------------------------------------------------


def test_sampler_epochs_ranks_and_resume() -> None:
    n = 10
    single = EpochShuffleSampler(n, seed=3)
    it = iter(single)
    epochs = [[next(it) for _ in range(n)] for _ in range(3)]
    for e, keys in enumerate(epochs):
        assert sorted(k[0] for k in keys) == list(range(n))  # each epoch is a permutation
        assert {k[1] for k in keys} == {e}
    assert [k[0] for k in epochs[0]] != [k[0] for k in epochs[1]]  # reshuffled every epoch
    again = iter(EpochShuffleSampler(n, seed=3))
    assert [next(again) for _ in range(2 * n)] == epochs[0] + epochs[1]  # deterministic
    assert [k[0] for k in epochs[0]] != [k[0] for k in iter_n(EpochShuffleSampler(n, seed=4), n)]

    # 3 ranks: disjoint, together the global stream
    world = 3
    per_rank = [iter_n(EpochShuffleSampler(n, rank=r, world_size=world, seed=3), 10) for r in range(world)]
    positions = sorted(k[2] for keys in per_rank for k in keys)
    assert positions == list(range(30))
    stream = {k[2]: k[0] for k in epochs[0] + epochs[1] + epochs[2]}
    for keys in per_rank:
        assert all(stream[g] == index for index, _, g in keys)
    first_epoch = [k[0] for keys in per_rank for k in keys if k[1] == 0]
    assert sorted(first_epoch) == list(range(n))

    # resume: starting at k gives the tail of the uninterrupted sequence
    full = iter_n(EpochShuffleSampler(n, rank=1, world_size=2, seed=3), 25)
    assert iter_n(EpochShuffleSampler(n, rank=1, world_size=2, seed=3, start=7), 18) == full[7:]


def iter_n(sampler: EpochShuffleSampler, count: int) -> list:
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def tiny_cfg(cache: Path, num_workers: int = 0, batch: int = 4) -> object:
    return OmegaConf.create(
        {
            "train": {
                "dataset_path": f"Demo:split=TRAIN:root={cache}:n_per_class=1",
                "batch_size_per_gpu": batch,
                "num_workers": num_workers,
                "seed": 11,
            },
            "crops": {
                "global_crops_scale": [0.32, 1.0],
                "local_crops_scale": [0.05, 0.32],
                "local_crops_number": 2,
                "global_crops_size": 28,
                "local_crops_size": 14,
            },
            "ibot": {"mask_ratio_min_max": [0.1, 0.5], "mask_sample_probability": 0.5},
            "student": {"patch_size": 7},
        }
    )


def take(iterator, count: int) -> list[dict]:
    batches = [next(iterator) for _ in range(count)]
    iterator.close()
    return batches


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_local_iterator_batches_and_exact_resume(tmp_path: Path) -> None:
    n = len(DEMO_CLASSES)  # one image per class
    cfg = tiny_cfg(tmp_path, batch=3)  # n = 8 images, batch 3: epochs end inside batches
    assert n % 3
    batches = take(make_local_data_iterator(cfg), 6)
    first = batches[0]
    assert first["collated_global_crops"].shape == (6, 3, 28, 28)
    assert first["collated_local_crops"].shape == (6, 3, 14, 14)
    assert first["collated_masks"].shape == (6, 16)
    assert first["labels"].shape == (3,) and first["indices"].shape == (3,)
    seen = torch.cat([b["indices"] for b in batches])
    assert sorted(seen[:n].tolist()) == list(range(n))  # the first epoch visits every image once
    assert seen[:n].tolist() != seen[n : 2 * n].tolist()  # the second epoch is reshuffled
    resumed = take(make_local_data_iterator(cfg, start_iter=3), 3)
    assert_same_batches(resumed, batches[3:])
    rank1 = take(make_local_data_iterator(cfg, rank=1, world_size=2), 1)[0]
    rank0 = take(make_local_data_iterator(cfg, rank=0, world_size=2), 1)[0]
    assert not set(rank0["indices"].tolist()) & set(rank1["indices"].tolist())
    with pytest.raises(ValueError, match="rank"):
        make_local_data_iterator(cfg, rank=2, world_size=2)


@pytest.mark.slow
def test_local_iterator_same_batches_with_workers(tmp_path: Path) -> None:
    in_process = take(make_local_data_iterator(tiny_cfg(tmp_path, num_workers=0)), 3)
    with_workers = take(make_local_data_iterator(tiny_cfg(tmp_path, num_workers=2)), 3)
    assert_same_batches(in_process, with_workers)


def test_local_iterator_names_a_corrupt_file(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(3):
        (tmp_path / "data/a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(tmp_path / f"data/a/{i}.jpg")
    (tmp_path / "data/a/3_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = tiny_cfg(tmp_path)
    cfg.train.dataset_path = f"ImageFolder:root={tmp_path / 'data'}"
    iterator = make_local_data_iterator(cfg)
    with pytest.raises(CorruptImageError, match="3_broken.jpg"):
        take(iterator, 2)  # 8 samples from 4 files: the broken one is among them
