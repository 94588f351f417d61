"""Ray Data streaming of Parquet shards (semlab.data.pipeline.ray_pipeline) on a real local Ray, 2 CPUs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from semlab.config import load_config
from semlab.data.datasets.demo import DEMO_CLASSES
from semlab.data.datasets.shards import prepare_shards
from semlab.data.pipeline import ray_pipeline as rp
from semlab.data.pipeline.normalize import normalize_uint8
from semlab.orchestration.cluster import start_local
from semlab.orchestration.trainer import make_data_config

N_PER_CLASS = 4
N = len(DEMO_CLASSES) * N_PER_CLASS  # TRAIN images of the tiny Demo
B = 4


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    demo = tmp_path_factory.mktemp("demo")
    prepare_shards(f"Demo:root={demo}:n_per_class={N_PER_CLASS}", str(out), rows_per_shard=5, progress=False)
    return out


def make_cfg(shard_dir: Path, *extra: str):
    return load_config(
        overrides=[
            f"train.dataset_path=Parquet:path={shard_dir}",
            f"train.batch_size_per_gpu={B}",
            "crops.global_crops_size=64",
            "crops.local_crops_size=48",
            "crops.local_crops_number=2",
            "student.patch_size=16",
            "data.map_num_cpus=0.5",
            "data.shuffle_buffer_size=8",
            "data.map_batch_size=4",
            "ray.num_workers=2",
            "ray.cpus_per_worker=0.5",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def ray_session():
    import ray

    temp = tempfile.mkdtemp(prefix="semlab-rt-", dir="/tmp")
    start_local(2, None, 0.25, temp, include_dashboard=False)  # the default: on loopback
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _first_rows(shard_dir: Path, n: int = 3) -> dict[str, np.ndarray]:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    table = pq.read_table(shard_dir / manifest["splits"]["TRAIN"]["shards"][0]["path"]).slice(0, n)
    return {
        "image": np.array(table.column("image").to_pylist(), dtype=object),
        "label": table.column("label").to_numpy(),
        "index": table.column("index").to_numpy(),
    }


# ---- no Ray needed ------------------------------------------------------------------------------------


def test_augment_batch_is_a_function_of_seed_epoch_index_and_uint8_is_exact(shard_dir):
    cfg = make_cfg(shard_dir)
    crops = rp._crops_key(cfg)
    batch = _first_rows(shard_dir)
    u8 = rp.augment_batch(batch, crops=crops, seed=0, epoch=3)
    f32 = rp.augment_batch(batch, crops=crops, seed=0, epoch=3, emit_uint8=False)
    assert u8["global_crops"].dtype == np.uint8 and u8["global_crops"].shape == (3, 2, 3, 64, 64)
    assert u8["local_crops"].shape == (3, 2, 3, 48, 48)
    assert f32["global_crops"].dtype == np.float32
    # uint8 across the object store, normalised in the worker: bit-identical to the float pipeline
    for key in ("global_crops", "local_crops"):
        assert torch.equal(normalize_uint8(torch.from_numpy(u8[key])), torch.from_numpy(f32[key]))
    # same (seed, epoch, index) -> same crops, whatever the batch; another epoch or seed -> other crops
    alone = rp.augment_batch({k: v[1:2] for k, v in batch.items()}, crops=crops, seed=0, epoch=3)
    np.testing.assert_array_equal(alone["global_crops"][0], u8["global_crops"][1])
    other_epoch = rp.augment_batch(batch, crops=crops, seed=0, epoch=4)
    other_seed = rp.augment_batch(batch, crops=crops, seed=1, epoch=3)
    assert not np.array_equal(other_epoch["global_crops"], u8["global_crops"])
    assert not np.array_equal(other_seed["global_crops"], u8["global_crops"])
    np.testing.assert_array_equal(u8["index"], batch["index"])
    np.testing.assert_array_equal(u8["label"], batch["label"])


def test_cpu_budget_check():
    rp.check_cpu_budget(2, num_workers=2, cpus_per_worker=0.5, map_num_cpus=0.5)
    with pytest.raises(rp.RayDataConfigError, match="wait forever.*cpus_per_worker"):
        rp.check_cpu_budget(2, num_workers=2, cpus_per_worker=1.0, map_num_cpus=0.5)


def test_execution_options_from_config(shard_dir):
    default = rp.data_execution_options(make_cfg(shard_dir))
    assert default.preserve_order and default.resource_limits.cpu == float("inf")
    capped_cfg = make_cfg(shard_dir, "data.max_cpus=1.5", "data.max_object_store_gb=0.5")
    capped = rp.data_execution_options(capped_cfg)
    assert capped.resource_limits.cpu == 1.5 and capped.resource_limits.object_store_memory == 0.5 * 1024**3
    assert make_data_config(make_cfg(shard_dir))._datasets_to_split == ["train"]


def test_non_parquet_dataset_is_refused(shard_dir):
    cfg = make_cfg(shard_dir, "train.dataset_path=Demo:split=TRAIN")
    with pytest.raises(rp.RayDataConfigError, match="prepare_data.py"):
        rp.build_ray_dataset(cfg, check_resources=False)


# ---- a real local Ray -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_local_ray_is_bounded_and_on_loopback(ray_session):
    ray = ray_session
    assert ray.cluster_resources()["CPU"] == 2
    assert ray.cluster_resources()["object_store_memory"] <= 0.3 * 1024**3
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"


@pytest.mark.slow
@pytest.mark.ray
def test_starving_configuration_fails_fast(ray_session, shard_dir):
    cfg = make_cfg(shard_dir, "ray.cpus_per_worker=1.0")
    with pytest.raises(rp.RayDataConfigError, match="would get no CPU"):
        rp.build_ray_dataset(cfg)


@pytest.mark.slow
@pytest.mark.ray
def test_single_consumer_stream_is_deterministic_and_complete(ray_session, shard_dir):
    cfg = make_cfg(shard_dir)
    steps = N // B

    def two_epochs(seed, epochs=2):
        it = rp.iter_training_batches(rp.build_ray_dataset(cfg, seed=seed), cfg, seed=seed, rank=0)
        return [next(it) for _ in range(epochs * steps)]

    run = two_epochs(0)
    batch = run[0]
    assert batch["collated_global_crops"].shape == (2 * B, 3, 64, 64)
    assert batch["collated_local_crops"].shape == (2 * B, 3, 48, 48)
    assert batch["collated_global_crops"].dtype == torch.float32
    assert batch["collated_masks"].shape == (2 * B, 16) and batch["collated_masks"].dtype == torch.bool
    assert batch["labels"].shape == (B,) and batch["indices"].dtype == torch.long
    assert (
        int(batch["n_masked_patches"][0])
        == batch["mask_indices_list"].numel()
        == int(batch["collated_masks"].sum())
    )
    assert batch["masks_weight"].shape == batch["mask_indices_list"].shape
    epochs = [torch.cat([b["indices"] for b in run[e * steps : (e + 1) * steps]]).tolist() for e in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(N))  # every sample exactly once per epoch
    assert epochs[0] != epochs[1]  # a fresh shuffle each epoch
    # labels travel with their samples
    labels = {int(i): int(y) for b in run for i, y in zip(b["indices"], b["labels"])}
    source = _first_rows(shard_dir, 5)
    assert all(labels[int(i)] == int(y) for i, y in zip(source["index"], source["label"]))
    # the same seed replays the same stream bit for bit; another seed does not
    again = two_epochs(0, epochs=1)
    for a, b in zip(run[:steps], again, strict=True):
        assert torch.equal(a["indices"], b["indices"])
        assert torch.equal(a["collated_global_crops"], b["collated_global_crops"])
        assert torch.equal(a["collated_masks"], b["collated_masks"])
    other = two_epochs(1, epochs=1)
    assert [b["indices"].tolist() for b in other] != [b["indices"].tolist() for b in run[:steps]]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_train_two_workers_disjoint_and_complete(ray_session, shard_dir, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config):
        """Ray Train worker: two epochs of training batches; writes what it saw to a file per rank.
        (Nested, so that Ray pickles it by value: workers cannot import this test module.)"""
        import ray.train

        from semlab.data.pipeline import ray_pipeline

        cfg = config["cfg"]
        rank = ray.train.get_context().get_world_rank()
        it = ray_pipeline.iter_training_batches(
            ray.train.get_dataset_shard("train"), cfg, seed=0, epoch_start=config["epoch_start"], rank=rank
        )
        steps = config["steps_per_epoch"]
        seen, first = [], []
        for _ in range(2):
            batches = [next(it) for _ in range(steps)]
            seen.append(torch.cat([b["indices"] for b in batches]).tolist())
            first.append((int(batches[0]["indices"][0]), batches[0]["collated_global_crops"][0].numpy()))
        np.savez(
            os.path.join(config["out"], f"rank{rank}.npz"),
            seen=np.array(seen),
            first_index=np.array([f[0] for f in first]),
            first_crop=np.stack([f[1] for f in first]),
        )

    cfg = make_cfg(shard_dir)
    epoch_start = 5
    ds = rp.build_ray_dataset(cfg, epoch_start=epoch_start)
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg,
            "out": str(out),
            "epoch_start": epoch_start,
            "steps_per_epoch": N // 2 // B,
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ds},
        dataset_config=make_data_config(cfg),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_results"), name="stream"),
    )
    trainer.fit()
    ranks = [np.load(out / f"rank{r}.npz") for r in range(2)]
    for epoch in range(2):
        a, b = (set(r["seen"][epoch].tolist()) for r in ranks)
        assert len(a) == len(b) == N // 2  # no duplicates within a worker
        assert a.isdisjoint(b) and a | b == set(range(N))  # disjoint, every sample exactly once
    # crops inside Ray Train are the pure function of (seed, epoch, index): epoch counts from epoch_start
    rows = {int(i): j for j, i in enumerate(pq.read_table(shard_dir / "TRAIN").column("index").to_numpy())}
    table = pq.read_table(shard_dir / "TRAIN")
    for r in ranks:
        for epoch in range(2):
            index = int(r["first_index"][epoch])
            row = table.slice(rows[index], 1)
            batch = {
                "image": np.array(row.column("image").to_pylist(), dtype=object),
                "label": row.column("label").to_numpy(),
                "index": row.column("index").to_numpy(),
            }
            expected = rp.augment_batch(
                batch, crops=rp._crops_key(cfg), seed=0, epoch=epoch_start + epoch, emit_uint8=False
            )
            np.testing.assert_array_equal(r["first_crop"][epoch], expected["global_crops"][0, 0])
