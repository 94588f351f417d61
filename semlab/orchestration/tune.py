"""Ray Tune sweep of pretrainings over any config keys (a sweep file, or the ``--L/--temp`` grid).

Each trial is a whole pretraining: a Tune function trial (the "driver", 0.01 CPU) builds
the TorchTrainer of :mod:`semlab.orchestration.trainer` for the base config with the trial's
values and fits it. ``TuneReportCallback`` forwards every ``ray.train.report`` of rank 0 to Tune:
the in-training k-NN (``accuracy/knn_top1``, at every ``evaluation.eval_period_iterations``), the
checkpoint-time metrics and the final report (``knn_top1_teacher``...).

What is searched, how and when trials stop comes from a :class:`SweepSpec`
(:mod:`semlab.orchestration.sweep_spec`): ASHA stops a trial on ``iteration`` (grace period and rungs in
iterations) by its metric; reports without the metric (checkpoints) are let through
(``TUNE_DISABLE_STRICT_METRIC_CHECKING``), the scheduler skips them.

Layout under the sweep directory ``D``::

    D/<trial name>/                   output dir of a trial (checkpoints, eval/, metrics, MLflow record)
    D/ray_results/<trial name>/       Ray Train storage of a trial (its reported checkpoints)
    D/ray_results/<sweep name>/       Ray Tune's experiment state (what ``Tuner.restore`` reads)
    D/sweep_<sweep name>.yaml         the sweep as it was started (a changed rerun is refused)

A trial is named by its values (``L8_temp0.5``); when anything is sampled (or ``num_samples`` > 1)
the Tune trial id is appended. Rerunning an interrupted sweep restores it with ``Tuner.restore``:
finished and early-stopped trials are not rerun, unfinished ones resume from their last checkpoint
(Ray Train's same-name resume), errored ones are reported with their error and not retried.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from semlab.orchestration.sweep_spec import (
    SweepSpec,
    SweepSpecError,
    grid_spec,
    spec_yaml,
    tune_param_space,
    tune_scheduler,
    tune_search_alg,
)

logger = logging.getLogger(__name__)

KNN_METRIC = "knn_top1_teacher"
LOSS_METRIC = "total"
DRIVER_CPUS = 0.01  # a trial's driver only waits on its TorchTrainer; Tune refuses an empty request
SWEPT_KEYS = "swept_keys"
_PLAIN = re.compile(r"[A-Za-z0-9._+-]{1,32}")  # a value written as is in a trial name


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(value: Any) -> str:
    """A value as it appears in a trial name: floats to 4 significant digits; a string that is not a
    plain word (a dataset string, a path) as its last path part made file-name safe, plus 6 hex digits of
    its SHA-1 so that two values never share a name (``ImageFolder:root=/d/val`` -> ``val-1f3a9c``)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").rsplit("/", 1)[-1]).strip("-.")[:16]
    digest = hashlib.sha1(text.encode()).hexdigest()[:6]
    return f"{tail}-{digest}" if tail else digest


def trial_name(values: dict[str, Any], trial_id: str | None = None) -> str:
    """``L8_temp0.5`` (last part of each key + value, see :func:`_fmt`), ``_<trial id>`` appended when
    given. The name is a file name: it is the trial's output directory and its MLflow run name."""
    name = "_".join(f"{_short(k)}{_fmt(v)}" for k, v in values.items())
    return f"{name}_{trial_id}" if trial_id else name


def trial_dirname(L: int, temp: float) -> str:
    """``L16_temp0.5``: the output dir / Ray run name of the grid trial (L, tau)."""
    return trial_name({"student.L": int(L), "student.temp": float(temp)})


def default_metric(cfg: DictConfig) -> tuple[str, str]:
    """(metric, mode) of the final report: the teacher's k-NN top-1 (max) when the k-NN sets are
    configured, else the loss (min). The SSL loss is a weak selection criterion across L and tau (its
    scale depends on both); prefer the k-NN."""
    if cfg.evaluation.knn_dataset_train and cfg.evaluation.knn_dataset_val:
        return KNN_METRIC, "max"
    return LOSS_METRIC, "min"


def apply_values(base: dict[str, Any], values: dict[str, Any], name: str) -> DictConfig:
    """The base config (a resolved container) with the trial's ``values`` and the MLflow run name
    ``name``; the SEM settings are checked."""
    from semlab.config import config_from_container
    from semlab.config.checks import check_sem

    cfg = config_from_container(base)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    check_sem(cfg.student.L, cfg.student.V, cfg.student.temp, arch=str(cfg.student.arch))
    cfg.mlflow.run_name = name
    return cfg


def trial_config(base: dict[str, Any], L: int, temp: float) -> DictConfig:
    """The base config with ``student.L``, ``student.temp`` and the MLflow run name set."""
    return apply_values(base, {"student.L": int(L), "student.temp": float(temp)}, trial_dirname(L, temp))


def train_driver(config: dict[str, Any]) -> None:
    """One Tune trial: fit the TorchTrainer of its values and forward its reports to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from semlab.orchestration.trainer import build_trainer

    values = {key: config[key] for key in config[SWEPT_KEYS]}
    trial_id = None if config.get("pure_grid", True) else tune.get_context().get_trial_id()
    name = trial_name(values, trial_id)
    cfg = apply_values(config["base"], values, name)
    cfg.ray.run_name = name
    cfg.ray.storage_path = str(Path(config["sweep_dir"]) / "ray_results")
    if config.get("parent_run_id"):
        with open_dict(cfg):
            cfg.mlflow.tags["mlflow.parentRunId"] = config["parent_run_id"]
            cfg.mlflow.tags["semlab.sweep"] = config["sweep_name"]
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


def check_same_sweep(sweep_dir: Path, spec: SweepSpec) -> None:
    """Record the sweep in ``D/sweep_<name>.yaml``; a rerun with other settings under the same name
    is refused (``Tuner.restore`` would silently keep the first settings)."""
    from semlab.utils.atomic import atomic_write_text

    path = sweep_dir / f"sweep_{spec.name}.yaml"
    record = spec_yaml(spec)
    if path.is_file() and path.read_text() != record:
        raise SweepSpecError(
            f"{path} records another sweep of the name '{spec.name}' in {sweep_dir}; "
            "give the changed sweep a new name (or a new --output-dir) instead of restoring the old one"
        )
    atomic_write_text(path, record)


def run_sweep(
    cfg: DictConfig,
    sweep_dir: str | Path,
    L_values: Sequence[int] = (),
    temp_values: Sequence[float] = (),
    *,
    spec: SweepSpec | None = None,
    max_concurrent_trials: int = 1,
    name: str = "sem_sweep",
    mlflow: bool = True,
    parent_run_id: str | None = None,
) -> Any:
    """Run (or restore) the sweep ``spec`` (default: the grid ``L_values`` x ``temp_values``); returns
    the Tune ``ResultGrid`` (Ray must be initialised, with its dashboard: see
    :func:`semlab.orchestration.cluster.require_state_api`).

    ``max_concurrent_trials`` bounds how many pretrainings share the cluster at once; each one asks
    for ``ray.num_workers`` workers of ``ray.cpus_per_worker`` CPUs (and GPUs).
    ``parent_run_id``: the sweep's MLflow parent run; each trial's run becomes its child.
    """
    from ray import tune

    from semlab.config.checks import check_sem
    from semlab.orchestration.cluster import require_state_api
    from semlab.train.loop import max_iterations

    if spec is None:
        if not L_values or not temp_values:
            raise ValueError("a sweep needs at least one value of student.L and one of student.temp")
        for temp in temp_values:
            check_sem(temp=temp)
        spec = grid_spec(
            list(L_values), list(temp_values), name=name, max_concurrent_trials=max_concurrent_trials
        )
    base = OmegaConf.to_container(cfg, resolve=True)
    base["ray"].update(spec.resources_per_trial)  # resources per trial: the ray.* keys of each trial
    require_state_api()
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    check_same_sweep(sweep_dir, spec)
    param_space = {
        **tune_param_space(spec),
        SWEPT_KEYS: list(spec.search_space),
        "pure_grid": spec.is_pure_grid(),
        # Tune's param_space is plain data (Tune records each trial's config): the one place where a
        # semlab config travels as a dict; apply_values turns it back into a DictConfig.
        "base": base,
        "sweep_dir": str(sweep_dir),
        "mlflow": bool(mlflow),
        "parent_run_id": parent_run_id or "",
        "sweep_name": spec.name,
    }
    scheduler, search_alg = tune_scheduler(spec, max_iterations(cfg)), tune_search_alg(spec)
    if scheduler is not None or search_alg is not None:
        # checkpoint reports carry no k-NN: let them through, the scheduler and searcher skip them
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(train_driver, {"CPU": DRIVER_CPUS})
    experiment = sweep_dir / "ray_results" / spec.name
    if tune.Tuner.can_restore(str(experiment)):
        logger.info("restoring the sweep %s: finished and stopped trials are not rerun", experiment)
        tuner = tune.Tuner.restore(
            str(experiment), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
        )  # fmt: skip
        return tuner.fit()
    seed = spec.search_alg.get("seed")
    if seed is not None and search_alg is None:
        from ray.tune.search import BasicVariantGenerator

        # a SearchAlgorithm of our own: Tune does not apply max_concurrent_trials to it, so pass it here
        search_alg = BasicVariantGenerator(
            random_state=int(seed), max_concurrent=int(spec.max_concurrent_trials)
        )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        # No metric/mode for Tune itself: the scheduler and searcher carry theirs, and ``summarize``
        # ranks the trials by the sweep's metric.
        tune_config=tune.TuneConfig(
            max_concurrent_trials=int(spec.max_concurrent_trials),
            num_samples=int(spec.num_samples),
            scheduler=scheduler,
            search_alg=search_alg,
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(sweep_dir / "ray_results")),
    )
    return tuner.fit()


def stop_reason(result: Any, max_iter: int) -> str:
    """Why a trial stopped: ``failed`` (it raised), ``finished`` (it reached its last iteration) or
    ``early-stopped`` (the scheduler stopped it before)."""
    if result.error:
        return "failed"
    iteration = (result.metrics or {}).get("iteration")
    return "finished" if iteration is not None and int(iteration) >= max_iter - 1 else "early-stopped"


def summarize(results: Any, metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """:func:`trial_rows`, best first (:func:`rank_rows`)."""
    return rank_rows(trial_rows(results, metric), metric, mode)


def rank_rows(rows: list[dict[str, Any]], metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """``rows`` best first by ``metric`` (rows without it last); equal values in the order of their
    trial names, so the best trial does not depend on the order Tune lists results in (a restored
    sweep lists them in another order than the run that made them)."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(
        rows,
        key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0.0, r["trial"]),
    )


def trial_rows(results: Any, metric: str) -> list[dict[str, Any]]:
    """One row per trial, in the order of ``results``: its name, swept values, the metric's last value
    (the final report's when it has one, else the last in-training one), the iteration reached, why it
    stopped and its error (if any)."""
    from semlab.train.loop import max_iterations

    rows = []
    for result in results:
        config = result.config or {}
        keys = config.get(SWEPT_KEYS) or ["student.L", "student.temp"]
        values = {key: config.get(key) for key in keys}
        metrics = result.metrics or {}
        value = metrics.get(metric)
        frame = result.metrics_dataframe
        if value is None and frame is not None and metric in frame:
            known = frame[metric].dropna()
            value = float(known.iloc[-1]) if len(known) else None
        try:
            base = apply_values(config["base"], values, "") if "base" in config else None
            max_iter = max_iterations(base) if base is not None else 0
        except Exception:  # a trial whose values were refused: it failed anyway
            max_iter = 0
        trial_id = None if config.get("pure_grid", True) else _trial_id(result)
        rows.append(
            {
                "trial": trial_name(values, trial_id),
                **values,
                metric: value,
                "iteration": metrics.get("iteration"),
                "stop_reason": stop_reason(result, max_iter),
                "error": str(result.error) if result.error else None,
            }
        )
    return rows


def _trial_id(result: Any) -> str | None:
    """The Tune trial id of ``result`` (from its reported metrics, else None)."""
    return (result.metrics or {}).get("trial_id")
