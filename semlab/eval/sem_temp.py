"""The SEM temperature an evaluation reads.

At evaluation the reference rebuilds the backbone with its evaluation recipe's ``student.temp``
(1e-5), so every feature that passes through SEM, the CLS output included, reads nearly one-hot
simplices ``softmax(z / 1e-5)``. A training run's ``config.yaml`` carries the training tau (1 in
the seed recipe), so the evaluation commands take tau from the evaluation recipe unless the user
sets it (``--sem-temp`` or ``evaluation.sem_temp=...``), and print the value they used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EVAL_RECIPE = "eval/vitl14_L512"
OVERRIDE_KEY = "evaluation.sem_temp"


def resolve_eval_sem_temp(cfg: Any, cli_value: float | None = None, overrides: Sequence[str] = ()) -> str:
    """Set ``cfg.evaluation.sem_temp`` to the evaluation temperature and say where it came from.

    Order: ``cli_value`` (``--sem-temp``), then an explicit ``evaluation.sem_temp=`` override, then
    the evaluation recipe's value. Returns a one-line description such as
    ``"SEM temperature tau = 1e-05 (the evaluation recipe eval/vitl14_L512)"``.
    """
    from semlab.config import load_config

    if cli_value is not None:
        value, source = float(cli_value), "--sem-temp"
    elif any(o.split("=", 1)[0].strip() == OVERRIDE_KEY for o in overrides):
        value, source = float(cfg.evaluation.sem_temp), f"the override {OVERRIDE_KEY}"
    else:
        value = float(load_config(EVAL_RECIPE).evaluation.sem_temp)
        source = f"the evaluation recipe {EVAL_RECIPE}"
    if not value > 0.0:
        raise ValueError(f"the SEM temperature must be > 0, got {value} from {source}")
    cfg.evaluation.sem_temp = value
    return f"SEM temperature tau = {value:g} ({source})"
