"""A training step that issues no host synchronisation, and the deferred checks it needs.

Reading a CUDA tensor on the host (``.item()``, ``float(t)``, ``.cpu()``, ``.tolist()``, ``if t:``)
blocks the Python thread until the GPU has finished every queued kernel, so the next step's kernels
are not queued while the GPU works: the GPU idles for the host's per-step overhead. The eager step
(``train.sync_free_step: false``) reads the losses and the gradient norm every step, to check
finiteness before the optimizer step. With ``train.sync_free_step: true`` they stay on the device:

- ``finite = all(isfinite(losses))`` is a device boolean per step, collected by :class:`FiniteWatch`;
- at each log period, before every checkpoint and at the last iteration, one transfer reads the
  window's flags; a non-finite step raises ``NonFiniteLossError`` naming the first bad iteration.

What changes: the optimizer may have stepped on up to ``log_period - 1`` iterations after the first
non-finite loss before the run stops (the eager step stops before that step). No checkpoint is ever
written from those iterations: the check runs before each one, and the parameter health check
(``semlab.train.health``) runs there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DeviceStepStats:
    """One step's results on the device: losses (0-d, mean over ranks), grad norm, finiteness flag."""

    losses: dict[str, Tensor]
    grad_norm: Tensor
    finite: Tensor

    def to_host(self) -> tuple[dict[str, float], float]:
        """(losses, grad norm) as Python floats: one device-to-host transfer (a sync)."""
        keys = sorted(self.losses)
        values = torch.stack([self.losses[k] for k in keys] + [self.grad_norm.reshape(())]).cpu().tolist()
        return dict(zip(keys, values[:-1])), values[-1]


class FiniteWatch:
    """Per-step device finiteness flags since the last :meth:`first_bad` check."""

    def __init__(self) -> None:
        self._flags: list[Tensor] = []
        self._iterations: list[int] = []
        self._stats: list[DeviceStepStats] = []

    def add(self, iteration: int, stats: DeviceStepStats) -> None:
        self._flags.append(stats.finite.reshape(()))
        self._iterations.append(iteration)
        self._stats.append(stats)

    def first_bad(self) -> tuple[int, dict[str, float]] | None:
        """(iteration, losses) of the first non-finite step since the last call, or None (one sync)."""
        if not self._flags:
            return None
        flags = torch.stack(self._flags).cpu().tolist()
        found = None
        for iteration, ok, stats in zip(self._iterations, flags, self._stats):
            if not ok:
                found = (iteration, stats.to_host()[0])
                break
        self._flags, self._iterations, self._stats = [], [], []
        return found
