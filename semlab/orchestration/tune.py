"""Ray Tune sweep over the SEM hyperparameters ``student.L`` (simplices) and ``student.temp`` (tau).

Each trial is a whole pretraining: a Tune function trial (the "driver", 0.01 CPU) builds
the TorchTrainer of :mod:`semlab.orchestration.trainer` for the base config with the trial's
``student.L`` / ``student.temp`` and fits it. ``TuneReportCallback`` forwards every
``ray.train.report`` of rank 0 to Tune, so a trial's results are its checkpoint-time metrics and
the final report (``knn_top1_teacher``... when ``evaluation.knn_dataset_*`` are set).

Layout under the sweep directory ``D``::

    D/L<L>_temp<tau>/                 output dir of a trial (checkpoints, eval/, metrics, MLflow record)
    D/ray_results/L<L>_temp<tau>/     Ray Train storage of a trial (its reported checkpoints)
    D/ray_results/<sweep name>/       Ray Tune's experiment state

Trials are named by their hyperparameters, so rerunning an interrupted sweep resumes every trial
from its last checkpoint (Ray Train's same-name resume) and finished trials return immediately.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

KNN_METRIC = "knn_top1_teacher"
LOSS_METRIC = "total"
DRIVER_CPUS = 0.01  # a trial's driver only waits on its TorchTrainer; Tune refuses an empty request


def trial_dirname(L: int, temp: float) -> str:
    """``L16_temp0.5``: the output dir / Ray run name of the trial (L, tau)."""
    return f"L{int(L)}_temp{float(temp):g}"


def default_metric(cfg: DictConfig) -> tuple[str, str]:
    """(metric, mode): the teacher's k-NN top-1 (max) when the k-NN sets are configured, else the loss (min).

    The SSL loss is a weak selection criterion across L and tau (its scale depends on both); prefer the k-NN.
    """
    if cfg.evaluation.knn_dataset_train and cfg.evaluation.knn_dataset_val:
        return KNN_METRIC, "max"
    return LOSS_METRIC, "min"


def trial_config(base: dict[str, Any], L: int, temp: float) -> DictConfig:
    """The base config (a resolved container) with ``student.L``, ``student.temp`` and the MLflow
    run name set."""
    from semlab.config import config_from_container
    from semlab.config.checks import check_sem

    cfg = config_from_container(base)
    cfg.student.L = int(L)
    cfg.student.temp = float(temp)
    check_sem(cfg.student.L, cfg.student.V, cfg.student.temp, arch=str(cfg.student.arch))
    cfg.mlflow.run_name = trial_dirname(L, temp)
    return cfg


def train_driver(config: dict[str, Any]) -> None:
    """One Tune trial: fit the TorchTrainer of (L, tau) and forward its reports to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from semlab.orchestration.trainer import build_trainer

    L, temp = int(config["student.L"]), float(config["student.temp"])
    cfg = trial_config(config["base"], L, temp)
    name = trial_dirname(L, temp)
    cfg.ray.run_name = name
    cfg.ray.storage_path = str(Path(config["sweep_dir"]) / "ray_results")
    trainer = build_trainer(
        cfg,
        Path(config["sweep_dir"]) / name,
        resume=True,
        name=name,
        callbacks=[TuneReportCallback()],
        mlflow=bool(config.get("mlflow", True)),
        knn=True,
    )
    trainer.fit()


def run_sweep(
    cfg: DictConfig,
    sweep_dir: str | Path,
    L_values: Sequence[int],
    temp_values: Sequence[float],
    *,
    max_concurrent_trials: int = 1,
    name: str = "sem_sweep",
    mlflow: bool = True,
) -> Any:
    """Grid over ``L_values`` x ``temp_values``; returns the Tune ``ResultGrid`` (Ray must be initialised,
    with its dashboard: see :func:`semlab.orchestration.cluster.require_state_api`).

    ``max_concurrent_trials`` bounds how many pretrainings share the cluster at once; each one asks
    for ``ray.num_workers`` workers of ``ray.cpus_per_worker`` CPUs (and GPUs).
    """
    from ray import tune

    from semlab.config.checks import check_sem
    from semlab.orchestration.cluster import require_state_api

    if not L_values or not temp_values:
        raise ValueError("a sweep needs at least one value of student.L and one of student.temp")
    for temp in temp_values:
        check_sem(temp=temp)
    require_state_api()
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    param_space = {
        "student.L": tune.grid_search([int(v) for v in L_values]),
        "student.temp": tune.grid_search([float(v) for v in temp_values]),
        # Tune's param_space is plain data (Tune records each trial's config): the one place where a
        # semlab config travels as a dict; trial_config turns it back into a DictConfig.
        "base": OmegaConf.to_container(cfg, resolve=True),
        "sweep_dir": str(sweep_dir),
        "mlflow": bool(mlflow),
    }
    tuner = tune.Tuner(
        tune.with_resources(train_driver, {"CPU": DRIVER_CPUS}),
        param_space=param_space,
        # No metric/mode for Tune itself: a grid needs no searcher, and Tune would reject every
        # intermediate report that lacks the final k-NN metric. ``summarize`` ranks the trials.
        tune_config=tune.TuneConfig(max_concurrent_trials=int(max_concurrent_trials)),
        run_config=tune.RunConfig(name=name, storage_path=str(sweep_dir / "ray_results")),
    )
    return tuner.fit()


def summarize(results: Any, metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """One row per trial: L, temp, the metric's last value, the trial's error (if any); best first."""
    rows = []
    for result in results:
        cfg = result.config or {}
        value = (result.metrics or {}).get(metric)
        rows.append(
            {
                "student.L": cfg.get("student.L"),
                "student.temp": cfg.get("student.temp"),
                metric: value,
                "error": str(result.error) if result.error else None,
            }
        )
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0.0))
    return rows
