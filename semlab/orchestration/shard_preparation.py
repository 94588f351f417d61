"""Shard preparation as Ray Data work, spread over the cluster's CPU nodes.

``experiments/prepare_data.py --ray`` hands :func:`semlab.data.datasets.shards.prepare_shards` the
runner made here. The shard indices of a split become a Ray Dataset (one row per shard), mapped by a
pool of actors (``ShardWriter``): each actor opens the source dataset and the output filesystem
once, then for every shard it is given runs the same :func:`ensure_shard` as the single-machine
path: read the image files, validate each (corrupt ones are counted and skipped), write the
Parquet file atomically, record its sha256 (a verified shard is kept, so a rerun resumes). The pool
grows up to ``max_workers`` actors of ``cpus_per_worker`` CPUs: Ray places them on any node with
free CPUs, and the autoscaler adds CPU nodes (cluster.yaml's ``cpu_data`` group) while actors wait.

Each result row names the node that wrote the shard; :func:`ray_data_runner` keeps them in
``nodes`` (``{node_id: shards written or checked}``), logged per split.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class ShardWriter:
    """Ray Data actor: ensures the shards whose indices it is given (see the module doc)."""

    def __init__(self, split_str: str, plan: Any, output: str, split_dir: str) -> None:
        from semlab.data.datasets.factory import make_dataset
        from semlab.data.datasets.parquet import open_filesystem

        self.dataset = make_dataset(split_str)
        self.plan, self.split_dir = plan, split_dir
        self.fs = open_filesystem(output)[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        from semlab.data.datasets.shards import ensure_shard

        node = ray.get_runtime_context().get_node_id()
        ks, records, written = [], [], []
        for k in batch["k"].tolist():
            record, wrote = ensure_shard(self.dataset, self.plan, int(k), self.fs, self.split_dir)
            ks.append(int(k))
            records.append(json.dumps(record))
            written.append(bool(wrote))
        n = len(ks)
        return {
            "k": np.asarray(ks, dtype=np.int64),
            "record": np.asarray(records, dtype=object),
            "written": np.asarray(written, dtype=bool),
            "node_id": np.asarray([node] * n, dtype=object),
            "pid": np.asarray([os.getpid()] * n, dtype=np.int64),
        }


class RayDataRunner:
    """A ``ShardRunner`` (``prepare_split(runner=...)``) that runs the shards as Ray Data work."""

    def __init__(self, max_workers: int | None = None, cpus_per_worker: float = 1.0) -> None:
        self.max_workers = max_workers
        self.cpus_per_worker = float(cpus_per_worker)
        self.nodes: Counter[str] = Counter()

    def pool_size(self, num_shards: int) -> int:
        """``max_workers`` when given, else as many actors as the cluster has CPUs for (at most one per
        shard)."""
        import ray

        if self.max_workers:
            size = int(self.max_workers)
        else:
            size = int(ray.cluster_resources().get("CPU", 1) // max(self.cpus_per_worker, 1e-9))
        return max(1, min(size, num_shards))

    def __call__(
        self, split_str: str, plan: Any, output: str, split_dir: str, shards: list[int]
    ) -> Iterator[tuple[int, dict, bool]]:
        import ray.data

        size = self.pool_size(len(shards))
        ds = ray.data.from_items([{"k": k} for k in shards], override_num_blocks=len(shards))
        mapped = ds.map_batches(
            ShardWriter,
            fn_constructor_args=(split_str, plan, output, split_dir),
            batch_size=1,
            num_cpus=self.cpus_per_worker,
            # all actors asked for at once (pending ones make the autoscaler add CPU nodes); work starts
            # as soon as one is up
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size),
        )
        logger.info("%d shards as Ray Data work on up to %d actors of %g CPUs", len(shards), size,
                    self.cpus_per_worker)
        for row in mapped.iter_rows():
            self.nodes[str(row["node_id"])] += 1
            yield int(row["k"]), json.loads(row["record"]), bool(row["written"])
        logger.info("shards per node: %s", dict(self.nodes))


def prepare_shards_on_ray(
    dataset_str: str,
    output: str,
    address: str = "auto",
    max_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    **kwargs: Any,
) -> tuple[dict[str, Any], RayDataRunner]:
    """Join (or start, ``address='local'``) the Ray cluster and run ``prepare_shards`` with a
    :class:`RayDataRunner`; returns the manifest and the runner (its ``nodes``)."""
    from omegaconf import OmegaConf

    from semlab.data.datasets.shards import prepare_shards
    from semlab.orchestration.cluster import connect

    connect(OmegaConf.create({"ray": {"address": address, "object_store_memory_gb": 2.0}}))
    runner = RayDataRunner(max_workers=max_workers, cpus_per_worker=cpus_per_worker)
    manifest = prepare_shards(dataset_str, output, runner=runner, **kwargs)
    return manifest, runner
