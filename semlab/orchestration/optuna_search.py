"""The Optuna searcher of a sweep file's ``search_alg: {type: optuna}`` (the ``optuna`` extra).

Optuna's TPE sampler proposes each trial's values from the values and results of the trials before it.
A trial's reports reach it as intermediate values (``trial.report(value, step)``) and its last result
as the trial's value (``study.tell``). A semlab trial also reports without the metric (the checkpoint
reports carry losses only, no k-NN), and Ray's ``OptunaSearch`` would fail on those with a KeyError;
:class:`EvaluationOptunaSearch` passes on only the reports that carry a finite value of the metric.

The class lives at module level: Tune's ``tuner.pkl`` (cloudpickle) then refers to it by name, so a
restored sweep uses the installed code instead of a copy of a function-local class taken at its start.
"""

from __future__ import annotations

import math
from typing import Any

import optuna  # noqa: F401  (Ray's module imports without it and fails later; fail here, clearly)
from ray.tune.search.optuna import OptunaSearch


class EvaluationOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that learns from the reports carrying ``metric`` and skips the others."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(float(value)):
            super().on_trial_result(trial_id, result)


def optuna_searcher(metric: str, mode: str, seed: int | None) -> EvaluationOptunaSearch:
    """The searcher of ``metric`` (``max`` or ``min``), seeded for a reproducible sequence of values."""
    return EvaluationOptunaSearch(metric=metric, mode=mode, seed=seed)
