"""A Ray head restart loses every Ray-side record of a run (no GCS fault tolerance is configured):
the run fails, and the same command on the new head resumes from the last checkpoint on disk.

The test runs a 1-worker demo pretraining on a private cluster; the worker dies at iteration 4 with
``ray.max_failures=0``, so the run fails as it does when its head goes away. The cluster is then shut
down and a fresh one started (a restarted head: new GCS, no actors, no Train state), and the run is
submitted again under the same name and output dir. It must resume at iteration 4 (checkpoint 3), log
every iteration once, and match an uninterrupted run's losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray_session import ray_session
from test_ray_train import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ITERATIONS = 8


def start_cluster(temp_dir: str) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, _temp_dir=temp_dir)


def fit(out: Path, fault: dict | None = None):
    from semlab.config import load_config
    from semlab.orchestration.trainer import fit as ray_fit

    cfg = load_config("demo_tiny", [*TINY, "ray.num_workers=1", "train.batch_size_per_gpu=8",
                                    f"train.max_iterations={ITERATIONS}", "ray.max_failures=0"])
    return ray_fit(cfg, out, name="restart", fault=fault, mlflow=False, knn=False)


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "training_metrics.json").read_text().splitlines()]
    its = [r["iteration"] for r in lines]
    assert len(its) == len(set(its)), f"an iteration was logged twice: {its}"
    return {r["iteration"]: r["total"] for r in lines}


def test_a_run_lost_with_its_head_resumes_on_the_restarted_head(tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    with ray_session(start_cluster, "semlab-hr-"):
        fit(ref)
        failed = None
        try:
            result = fit(out, fault={"iteration": 4, "rank": 0})
            failed = result.error
        except Exception as exc:  # Ray raises TrainingFailedError for a run out of retries
            failed = exc
        assert failed is not None, "the run did not fail"
    assert sorted(losses(out)) == [0, 1, 2, 3]
    with ray_session(start_cluster, "semlab-hr2-"):  # the restarted head: nothing of the first one
        result = fit(out)
    assert result.error is None and result.metrics["iteration"] == ITERATIONS - 1
    got, want = losses(out), losses(ref)
    assert sorted(got) == list(range(ITERATIONS))
    torch.testing.assert_close(torch.tensor([got[i] for i in range(ITERATIONS)], dtype=torch.float64),
                               torch.tensor([want[i] for i in range(ITERATIONS)], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
