"""Teacher eval checkpoints as MLflow 3 LoggedModels (``mlflow.log_checkpoints: model``).

Each ``eval/training_<it>/teacher_checkpoint.pth`` becomes one LoggedModel named
``teacher_training_<it>`` whose source run is the pretraining run:

- its artifacts are the checkpoint file (and the run's ``config.yaml``), uploaded to the run's
  artifact store (``mlflow server --artifacts-destination gs://...`` on the cluster), so the MLflow
  UI's host can serve it (the model page's Artifacts tab) and anyone fetches it with
  ``mlflow.artifacts.download_artifacts(f"{model.artifact_location}/teacher_checkpoint.pth")``
  (the run's tag ``semlab.teacher_checkpoint_file.training_<it>`` holds that URI);
- the training metrics of iteration ``it`` are logged with ``model_id`` at step ``it``, so the
  model's page (and the run's "Logged models" tab) shows the checkpoint next to the metrics of the
  iteration it was taken at;
- params ``iteration`` and ``format``; tag ``semlab.checkpoint_file`` (where it was written).

Why a LoggedModel and not a run artifact or a ``file://`` tag: a LoggedModel is MLflow 3's record
of "a model at a step of a run", listed and searchable on its own (``search_logged_models``), and
its artifacts go through the same artifact store as run artifacts, which accepts multi-GB files
(the upload streams the file; no size cap as for ``artifact`` mode). The upload runs in a
background thread of rank 0, so training does not wait for it; ``wait`` (called at close) does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_PREFIX = "teacher_training_"
CHECKPOINT_FILE = "teacher_checkpoint.pth"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def create_teacher_model(client: Any, experiment_id: str, run_id: str, path: Path, iteration: int) -> Any:
    """Create the (pending) LoggedModel of teacher checkpoint ``path`` and return it."""
    model = client.create_logged_model(
        experiment_id=experiment_id,
        name=f"{MODEL_PREFIX}{int(iteration)}",
        source_run_id=run_id,
        params={"iteration": str(int(iteration)), "format": "{'teacher': state_dict} (torch.save)"},
        tags={"semlab.checkpoint_file": str(Path(path).resolve())},
        model_type="semlab.teacher_checkpoint",
    )
    return model


def upload_teacher_model(
    client: Any, model_id: str, run_id: str, path: Path, iteration: int, metrics: dict[str, float]
) -> str:
    """Upload the checkpoint (+ config) as the model's artifacts, link the iteration's metrics to it
    and mark it READY (FAILED, re-raising, when something fails); returns ``model_id``."""
    from mlflow.entities import Metric

    try:
        with tempfile.TemporaryDirectory(prefix="semlab_teacher_model_") as tmp:
            _link_or_copy(Path(path), Path(tmp) / CHECKPOINT_FILE)
            config = Path(path).parent / "config.yaml"
            if config.is_file():
                shutil.copy2(config, Path(tmp) / "config.yaml")
            client.log_model_artifacts(model_id, tmp)
        ts = int(time.time() * 1000)
        linked = [Metric(k, float(v), ts, int(iteration), model_id=model_id, run_id=run_id)
                  for k, v in metrics.items()]
        if linked:
            client.log_batch(run_id, metrics=linked)
    except Exception:
        client.finalize_logged_model(model_id, "FAILED")
        raise
    client.finalize_logged_model(model_id, "READY")
    return model_id


class TeacherModelUploader:
    """Logs teacher checkpoints as LoggedModels one after another in a background thread."""

    def __init__(self, client: Any, experiment_id: str, run_id: str) -> None:
        self.client, self.experiment_id, self.run_id = client, experiment_id, run_id
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semlab-teacher-model")
        self.futures: dict[int, Future] = {}

    def submit(self, path: Path, iteration: int, metrics: dict[str, float]) -> Any:
        """Create the model now (one quick request), upload its files in the background; returns the
        ``LoggedModel`` (``models:/<model_id>``; files under ``artifact_location``)."""
        model = create_teacher_model(self.client, self.experiment_id, self.run_id, Path(path), iteration)
        self.futures[int(iteration)] = self._pool.submit(
            upload_teacher_model, self.client, model.model_id, self.run_id, Path(path), int(iteration),
            dict(metrics),
        )
        return model

    def wait(self) -> dict[int, str]:
        """Wait for every upload; ``{iteration: model_id}`` of those that succeeded (failures warn)."""
        done: dict[int, str] = {}
        for iteration, future in sorted(self.futures.items()):
            try:
                done[iteration] = future.result()
            except Exception as exc:  # the store is out of our hands: never crash training
                logger.warning("could not log the teacher checkpoint of iteration %d to MLflow: %r",
                               iteration, exc)
        self._pool.shutdown(wait=True)
        return done
