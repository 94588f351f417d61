"""Per-iteration schedules of the DINOv2 recipe: lr, weight decay, teacher momentum and temperature.

A schedule is a table indexed by iteration ``it`` (0-based). ``CosineScheduler`` is

    it <  F                : 0                                         (freeze)
    F <= it < F + W        : linear from ``start_warmup_value`` to ``base_value``
                             (``numpy.linspace``: both ends included)
    F + W <= it < T        : final + (base - final) * (1 + cos(pi * j / (T - F - W))) / 2,
                             j = it - F - W
    it >= T                : ``final_value``

with F = ``freeze_iters``, W = ``warmup_iters``, T = ``total_iters`` (the DINOv2 definition:
the cosine reaches ``final_value`` only in the limit; past the end the final value is held).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig


class CosineScheduler:
    """Freeze, linear warmup, then half-cosine decay; indexable by iteration (see module doc)."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        total_iters, warmup_iters, freeze_iters = int(total_iters), int(warmup_iters), int(freeze_iters)
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError(
                f"schedule lengths must be >= 0, got total={total_iters}, warmup={warmup_iters}, "
                f"freeze={freeze_iters}"
            )
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup ({warmup_iters}) + freeze ({freeze_iters}) iterations exceed the schedule's "
                f"{total_iters} iterations: lower optim.warmup_epochs / freeze epochs or raise optim.epochs"
            )
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.total_iters = total_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        n_cos = total_iters - warmup_iters - freeze_iters
        j = np.arange(n_cos)
        cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * j / max(n_cos, 1)))
        self.schedule = np.concatenate((freeze, warmup, cosine)).astype(np.float64)
        assert len(self.schedule) == total_iters

    def __getitem__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"schedule index must be >= 0, got {it}")
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters


@dataclass
class Schedules:
    """The five schedules a training step reads (all indexed by iteration)."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    def at(self, it: int) -> dict[str, float]:
        return {
            "lr": self.lr[it],
            "wd": self.wd[it],
            "mom": self.momentum[it],
            "teacher_temp": self.teacher_temp[it],
            "last_layer_lr": self.last_layer_lr[it],
        }


def build_schedules(cfg: DictConfig) -> Schedules:
    """The DINOv2 schedules from a config whose ``optim.lr`` is already set (``apply_scaling_rules``).

    - lr: warmup 0 -> ``optim.lr`` over ``warmup_epochs`` epochs, cosine to ``min_lr`` at
      ``epochs`` epochs (an epoch is ``train.OFFICIAL_EPOCH_LENGTH`` iterations).
    - wd: cosine ``weight_decay`` -> ``weight_decay_end``; momentum: cosine
      ``momentum_teacher`` -> ``final_momentum_teacher``.
    - teacher temp: linear ``warmup_teacher_temp`` -> ``teacher_temp`` over
      ``warmup_teacher_temp_epochs``, then constant.
    - last-layer lr: the lr schedule with 0 for the first ``freeze_last_layer_epochs`` epochs.
    """
    epoch_len = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    total = int(cfg.optim.epochs) * epoch_len
    if total <= 0:
        raise ValueError("optim.epochs * train.OFFICIAL_EPOCH_LENGTH must be > 0")
    if not cfg.optim.lr or cfg.optim.lr <= 0:
        raise ValueError(
            "optim.lr is not set: call semlab.config.apply_scaling_rules(cfg, world_size) before "
            "building the schedules"
        )
    lr_kwargs = dict(
        base_value=float(cfg.optim.lr),
        final_value=float(cfg.optim.min_lr),
        total_iters=total,
        warmup_iters=int(cfg.optim.warmup_epochs * epoch_len),
        start_warmup_value=0.0,
    )
    lr = CosineScheduler(**lr_kwargs)
    wd = CosineScheduler(float(cfg.optim.weight_decay), float(cfg.optim.weight_decay_end), total)
    momentum = CosineScheduler(
        float(cfg.teacher.momentum_teacher), float(cfg.teacher.final_momentum_teacher), total
    )
    temp_iters = int(cfg.teacher.warmup_teacher_temp_epochs * epoch_len)
    teacher_temp = CosineScheduler(
        base_value=float(cfg.teacher.teacher_temp),
        final_value=float(cfg.teacher.teacher_temp),
        total_iters=temp_iters,
        warmup_iters=temp_iters,
        start_warmup_value=float(cfg.teacher.warmup_teacher_temp),
    )
    last_layer_lr = CosineScheduler(**lr_kwargs)
    last_layer_lr.schedule[: int(cfg.optim.freeze_last_layer_epochs * epoch_len)] = 0.0
    return Schedules(lr=lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp, last_layer_lr=last_layer_lr)
