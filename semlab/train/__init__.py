"""Training: the DINOv2(+SEM) meta-architecture, schedules, parameter groups, checkpoints, the loop.

torch only: nothing here imports Ray or MLflow (they sit on top, through a ``Reporter``).
Heavier pieces are imported from their modules (``semlab.train.meta_arch.SSLMetaArch``,
``semlab.train.loop.do_train``, ``semlab.train.pretraining.run_pretraining``).
"""

from semlab.train.reporting import ListReporter, Reporter
from semlab.train.schedules import CosineScheduler, Schedules, build_schedules

__all__ = ["CosineScheduler", "ListReporter", "Reporter", "Schedules", "build_schedules"]
