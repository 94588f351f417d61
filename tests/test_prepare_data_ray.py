"""Shard preparation as Ray Data work on a local cluster of 2 simulated nodes (1 CPU each, 127.0.0.1).

``ray.cluster_utils.Cluster`` starts a head and a second node as separate raylets; the demo dataset
is written as 12 shards of 3 rows by ``prepare_shards_on_ray``. The shards must have been written on both
nodes, be byte-identical to those of the single-machine path (same plan, same sha256), and a rerun
must keep them all (resumable: verified by checksum, nothing rewritten).
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEMO = "Demo:split=TRAIN:n_per_class=4"


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head + 1 node on 127.0.0.1 in a private temp dir. ``Cluster`` would also write (and at shutdown
    delete) the machine-wide ``/tmp/ray/ray_current_cluster`` pointer, which other users' ``ray.init()``
    on this shared machine would follow: both are disabled here, and Ray is joined by address."""
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    from semlab.orchestration.cluster import _bind_loopback

    _bind_loopback()
    patch = pytest.MonkeyPatch()
    patch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    patch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    temp_dir = tempfile.mkdtemp(prefix="semlab-prep-", dir="/tmp")
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 150 * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "include_dashboard": False, "temp_dir": temp_dir},
    )
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        patch.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_prepare_data_runs_on_both_nodes(two_node_cluster, tmp_path):
    import ray

    from semlab.data.datasets.shards import prepare_shards
    from semlab.orchestration.shard_preparation import prepare_shards_on_ray

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    options = {"splits": ["TRAIN"], "rows_per_shard": 3, "progress": False}
    manifest, runner = prepare_shards_on_ray(DEMO, str(tmp_path / "ray"), max_workers=2, **options)
    shards = manifest["splits"]["TRAIN"]["shards"]
    assert len(shards) >= 10
    assert set(runner.nodes) == nodes, f"shards per node: {dict(runner.nodes)}"
    assert sum(runner.nodes.values()) == len(shards)

    local = prepare_shards(DEMO, str(tmp_path / "local"), **options)
    assert [s["sha256"] for s in shards] == [s["sha256"] for s in local["splits"]["TRAIN"]["shards"]]

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "TRAIN").glob("part-*.parquet")}
    again, _ = prepare_shards_on_ray(DEMO, str(tmp_path / "ray"), max_workers=2, **options)
    assert again["splits"]["TRAIN"]["shards"] == shards
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # kept, not rewritten
