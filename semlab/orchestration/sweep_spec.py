"""The sweep file: what a Ray Tune sweep searches, how many trials, on what, ranked how, stopped when.

A sweep file is YAML (``experiments/sweeps/demo.yaml``)::

    name: demo_asha                  # Ray Tune experiment name, the MLflow parent run's name
    search_space:                    # any config key -> one of:
      student.L: {grid: [8, 16]}           #   every value (a grid dimension)
      student.V: {choice: [8, 16]}         #   one at random per sample
      student.temp: {loguniform: [0.1, 1.0]}
      optim.base_lr: {uniform: [0.01, 0.03]}
      crops.local_crops_number: {randint: [2, 5]}   # integers in [low, high)
    num_samples: 2                   # samples of the random dimensions (x every grid point)
    max_concurrent_trials: 1
    resources_per_trial: {num_workers: 1, cpus_per_worker: 1.0, use_gpu: false, gpus_per_worker: 0}
    metric: accuracy/knn_top1        # default: the in-training k-NN (max)
    mode: max
    scheduler: {type: asha, grace_period: 60, reduction_factor: 2}   # or {type: none}; iterations
    search_alg: {type: random, seed: 0}                              # or {type: optuna} (extra)
    overrides: [train.max_iterations=120]   # config overrides of every trial (before the command line's)

:func:`load_sweep_spec` validates it against the pretraining config (every key must exist, every
range must make sense) and raises :class:`SweepSpecError` naming the entry and what to write
instead. :func:`grid_spec` is the ``--L/--temp`` shorthand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

DEFAULT_METRIC = "accuracy/knn_top1"  # semlab.eval.training_knn.TRAINING_KNN_METRIC
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "use_gpu", "gpus_per_worker")
TOP_KEYS = {
    "name", "search_space", "num_samples", "max_concurrent_trials", "resources_per_trial", "metric", "mode",
    "scheduler", "search_alg", "overrides",
}  # fmt: skip
_MISSING = object()


class SweepSpecError(ValueError):
    """The sweep file is not valid; the message names the entry and the fix."""


@dataclass
class SweepSpec:
    """A validated sweep file (see the module doc)."""

    name: str = "sem_sweep"
    search_space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    num_samples: int = 1
    max_concurrent_trials: int = 1
    resources_per_trial: dict[str, Any] = field(default_factory=dict)
    metric: str = DEFAULT_METRIC
    mode: str = "max"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    search_alg: dict[str, Any] = field(default_factory=lambda: {"type": "random"})
    text: str = ""  # the file as written (logged to the MLflow parent run)

    def is_pure_grid(self) -> bool:
        """Only grid dimensions and one sample: each trial is named by its values alone."""
        return self.num_samples == 1 and all("grid" in d for d in self.search_space.values())


def _check_dimension(key: str, dim: Any) -> dict[str, list[Any]]:
    if not isinstance(dim, dict) or len(dim) != 1 or next(iter(dim)) not in DISTRIBUTIONS:
        raise SweepSpecError(
            f"search_space.{key}: write one of {{grid: [..]}}, {{choice: [..]}}, {{uniform: [low, high]}}, "
            f"{{loguniform: [low, high]}}, {{randint: [low, high]}}; got {dim!r}"
        )
    kind, values = next(iter(dim.items()))
    if not isinstance(values, list) or not values:
        raise SweepSpecError(f"search_space.{key}.{kind}: needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise SweepSpecError(f"search_space.{key}.{kind}: needs [low, high] numbers, got {values!r}")
        low, high = values
        if not low < high:
            raise SweepSpecError(f"search_space.{key}.{kind}: low must be < high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise SweepSpecError(f"search_space.{key}.loguniform: low must be > 0, got {low!r}")
        if kind == "randint" and not all(float(v).is_integer() for v in values):
            raise SweepSpecError(f"search_space.{key}.randint: needs integers [low, high), got {values!r}")
    return {kind: list(values)}


def _positive_int(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepSpecError(f"{key}: must be an integer >= 1, got {value!r}")
    return value


def _check_scheduler(raw: Any) -> dict[str, Any]:
    sched = {"type": "none"} if raw in (None, "none") else raw
    if not isinstance(sched, dict) or str(sched.get("type", "")).lower() not in ("none", "asha"):
        raise SweepSpecError(
            f"scheduler: write {{type: none}} or {{type: asha, grace_period: N, reduction_factor: R}}; "
            f"got {raw!r}"
        )
    sched = {**sched, "type": str(sched["type"]).lower()}
    if sched["type"] == "asha":
        unknown = set(sched) - {"type", "grace_period", "reduction_factor"}
        if unknown:
            raise SweepSpecError(
                f"scheduler: unknown keys {sorted(unknown)}; ASHA takes grace_period, reduction_factor"
            )
        grace, factor = sched.setdefault("grace_period", 1), sched.setdefault("reduction_factor", 2)
        if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
            raise SweepSpecError(f"scheduler.grace_period: iterations, an integer >= 1; got {grace!r}")
        if not isinstance(factor, int | float) or factor < 2:
            raise SweepSpecError(f"scheduler.reduction_factor: a number >= 2, got {factor!r}")
    return sched


def _check_search_alg(raw: Any) -> dict[str, Any]:
    alg = {"type": "random"} if raw in (None, "random") else raw
    if not isinstance(alg, dict) or str(alg.get("type", "")).lower() not in ("random", "optuna"):
        raise SweepSpecError(f"search_alg: write {{type: random, seed: 0}} or {{type: optuna}}; got {raw!r}")
    return {**alg, "type": str(alg["type"]).lower()}


def parse_sweep_spec(raw: Any, cfg: DictConfig, text: str = "") -> SweepSpec:
    """Validate the mapping of a sweep file against ``cfg`` (every searched key must exist in it)."""
    if not isinstance(raw, dict):
        raise SweepSpecError(
            f"a sweep file is a YAML mapping with keys {sorted(TOP_KEYS)}; got {type(raw).__name__}"
        )
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SweepSpecError(f"unknown sweep keys {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    space = raw.get("search_space") or {}
    if not isinstance(space, dict) or not space:
        raise SweepSpecError(
            "search_space: name at least one config key, e.g. student.temp: {grid: [0.5, 1.0]}"
        )
    checked = {}
    for key, dim in space.items():
        if OmegaConf.select(cfg, str(key), default=_MISSING) is _MISSING:
            raise SweepSpecError(
                f"search_space.{key}: no such config key (see semlab/config/ssl_default.yaml)"
            )
        checked[str(key)] = _check_dimension(str(key), dim)
    resources = raw.get("resources_per_trial") or {}
    if not isinstance(resources, dict) or set(resources) - set(RESOURCE_KEYS):
        raise SweepSpecError(
            f"resources_per_trial: keys among {list(RESOURCE_KEYS)} (the ray.* keys); got {resources!r}"
        )
    mode = str(raw.get("mode", "max"))
    if mode not in ("max", "min"):
        raise SweepSpecError(f"mode: max or min, got {mode!r}")
    return SweepSpec(
        name=str(raw.get("name") or "sem_sweep"),
        search_space=checked,
        num_samples=_positive_int(raw, "num_samples", 1),
        max_concurrent_trials=_positive_int(raw, "max_concurrent_trials", 1),
        resources_per_trial=dict(resources),
        metric=str(raw.get("metric") or DEFAULT_METRIC),
        mode=mode,
        scheduler=_check_scheduler(raw.get("scheduler")),
        search_alg=_check_search_alg(raw.get("search_alg")),
        text=text,
    )


def read_sweep_file(path: str | Path) -> tuple[Any, str]:
    """(the parsed YAML, its text) of the sweep file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise SweepSpecError(f"sweep file {path} not found")
    text = path.read_text()
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as exc:
        raise SweepSpecError(f"sweep file {path} is not valid YAML: {exc}") from None


def sweep_overrides(raw: Any) -> list[str]:
    """The ``overrides`` list of a sweep file (``key=value`` strings applied to every trial's config)."""
    overrides = raw.get("overrides") or [] if isinstance(raw, dict) else []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SweepSpecError(f"overrides: a list of key=value strings, got {overrides!r}")
    return list(overrides)


def load_sweep_spec(path: str | Path, cfg: DictConfig) -> SweepSpec:
    """Read and validate the sweep file at ``path`` (``cfg`` should include its ``overrides``)."""
    raw, text = read_sweep_file(path)
    return parse_sweep_spec(raw, cfg, text)


def spec_yaml(spec: SweepSpec) -> str:
    """The validated sweep as YAML (what ``experiments/sweep.py`` records and a restore must match)."""
    fields = ("name", "search_space", "num_samples", "max_concurrent_trials", "resources_per_trial", "metric",
              "mode", "scheduler", "search_alg")  # fmt: skip
    return yaml.safe_dump({f: getattr(spec, f) for f in fields}, sort_keys=True)


def grid_spec(L_values: list[int], temp_values: list[float], **kwargs: Any) -> SweepSpec:
    """The ``--L/--temp`` shorthand: a grid over ``student.L`` x ``student.temp``."""
    space = {
        "student.L": {"grid": [int(v) for v in L_values]},
        "student.temp": {"grid": [float(v) for v in temp_values]},
    }
    return SweepSpec(search_space=space, **kwargs)


def tune_param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune search space of ``spec`` (``tune.grid_search``, ``tune.choice``, ``tune.uniform``...)."""
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(int(v[0]), int(v[1])),
    }
    return {key: make[kind](values) for key, dim in spec.search_space.items() for kind, values in dim.items()}


def tune_scheduler(spec: SweepSpec, max_iterations: int) -> Any:
    """ASHA on ``iteration`` (grace period and rungs in iterations), or None."""
    if spec.scheduler["type"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="iteration",
        metric=spec.metric,
        mode=spec.mode,
        max_t=max(int(max_iterations), int(spec.scheduler["grace_period"]) + 1),
        grace_period=int(spec.scheduler["grace_period"]),
        reduction_factor=float(spec.scheduler["reduction_factor"]),
    )


def tune_search_alg(spec: SweepSpec) -> Any:
    """None for random sampling (Tune's default), or an Optuna searcher (the ``optuna`` extra,
    :mod:`semlab.orchestration.optuna_search`) that learns from the reports carrying the metric (the
    in-training k-NN) and ignores the others."""
    if spec.search_alg["type"] != "optuna":
        return None
    if any("grid" in d for d in spec.search_space.values()):
        raise SweepSpecError("search_alg optuna cannot search grid dimensions; use choice instead of grid")
    try:
        from semlab.orchestration.optuna_search import optuna_searcher
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise SweepSpecError(
            f"search_alg optuna needs the optuna package: pip install 'semlab[optuna]' ({exc})"
        ) from None
    seed = spec.search_alg.get("seed")
    return optuna_searcher(spec.metric, spec.mode, None if seed is None else int(seed))
