"""Checks of settings that OmegaConf's key check cannot see: the SEM settings and the retired
initial-weights keys. Each error names the config key to change.

- :func:`check_sem`: ``student.L`` >= 0; ``student.L`` > 0 needs ``student.V`` > 1; an ``*_sem``
  architecture needs ``student.L`` > 0; temperatures (``student.temp``, ``evaluation.sem_temp``)
  > 0. The models call it with their keyword arguments (which come from those keys), the model
  builder and the sweep with the config's values: one rule, one wording.
- :func:`check_training_config`: what a pretraining needs before it starts: the student's SEM
  settings together, ``train.batch_size_per_gpu`` >= 1, ``train.OFFICIAL_EPOCH_LENGTH`` >= 1,
  ``train.param_abs_limit`` > 0. The command line and :func:`semlab.train.pretraining.prepare_run`
  call it, so a bad value stops the run before any model, data or MLflow run exists.
- :func:`check_initial_weights`: ``MODEL.pretrained_backbone`` is the one key for "start from these
  weights"; ``MODEL.WEIGHTS`` and ``student.pretrained_weights`` stay in the defaults (empty, as in
  the reference's resolved config) and are refused when set.
"""

from __future__ import annotations

from typing import Any

from semlab.config.loading import ConfigError

RETIRED_WEIGHT_KEYS = (("MODEL", "WEIGHTS"), ("student", "pretrained_weights"))


def check_sem(
    L: int | None = None,
    V: int | None = None,
    temp: float | None = None,
    *,
    arch: str | None = None,
    temp_key: str = "student.temp",
    building: bool = False,
) -> None:
    """Raise :class:`ConfigError` (a ``ValueError``) naming the key when a given SEM setting is wrong.

    ``building``: a SEM layer is being built, so ``L`` must be > 0 too."""
    if building and not int(L or 0) > 0:
        raise ConfigError(f"student.L={L}: a SEM layer needs L > 0 simplices")
    if arch is not None and arch.removesuffix("_memeff").endswith("_sem") and not int(L or 0) > 0:
        plain = arch.removesuffix("_memeff").removesuffix("_sem")
        raise ConfigError(
            f"student.arch={arch} needs L > 0: set student.L > 0 (and student.V > 1) "
            f"or use student.arch={plain}"
        )
    if L is not None and int(L) < 0:
        raise ConfigError(f"student.L={L}: the number of SEM simplices must be >= 0 (0 = no SEM)")
    if L is not None and int(L) > 0 and (V is None or int(V) <= 1):
        raise ConfigError(
            f"student.L={L} turns SEM on but student.V={V}: set student.V > 1 (vertices per simplex)"
        )
    if temp is not None and not float(temp) > 0.0:
        raise ConfigError(f"{temp_key}={temp}: the SEM softmax temperature must be > 0")


def check_initial_weights(cfg: Any) -> None:
    """Refuse the retired initial-weights keys when set (see the module doc)."""
    for section, key in RETIRED_WEIGHT_KEYS:
        value = cfg[section].get(key, "") if section in cfg else ""
        if value:
            raise ConfigError(
                f"{section}.{key}={value} is not used by semlab: set MODEL.pretrained_backbone={value} "
                "instead (it takes a released backbone, a teacher checkpoint or a semlab full checkpoint)"
            )


def check_config(cfg: Any) -> None:
    """The checks a loaded config gets: retired weight keys and ``evaluation.sem_temp``. The
    ``student`` SEM settings are checked where they are used together (model build, sweep trial),
    so that a recipe may set ``student.L`` and an override ``student.V``."""
    if "evaluation" in cfg:
        check_sem(temp=cfg.evaluation.sem_temp, temp_key="evaluation.sem_temp")
    check_initial_weights(cfg)


def check_training_config(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the key of the first setting a pretraining cannot start with."""
    student = cfg.student
    check_sem(student.L, student.V, student.temp, arch=str(student.arch))
    for key in ("batch_size_per_gpu", "OFFICIAL_EPOCH_LENGTH"):
        if int(cfg.train[key]) < 1:
            raise ConfigError(f"train.{key}={cfg.train[key]}: must be >= 1")
    limit = cfg.train.get("param_abs_limit", 1.0)
    if not float(limit) > 0:
        raise ConfigError(
            f"train.param_abs_limit={limit}: must be > 0 (the largest |weight| a trusted checkpoint holds)"
        )
