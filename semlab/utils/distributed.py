"""The one set of rank / world-size helpers, with and without an initialised process group
(and ``default_device``).

Every layer that needs a rank uses these (``losses`` for the all-reduced centering, ``train``,
``tracking``); Ray workers have a process group (Ray Train creates it), so the same helpers apply.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_enabled() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank in the default process group (0 without one)."""
    return dist.get_rank() if is_enabled() else 0


def launcher_rank() -> int:
    """:func:`get_rank` when a process group exists, else the launcher's ``RANK`` variable (torchrun
    sets it before the group is created), else 0."""
    if is_enabled():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def get_world_size() -> int:
    """World size of the default process group (1 without one)."""
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_enabled() and get_world_size() > 1:
        dist.barrier()


def default_device() -> torch.device:
    """CUDA when available, else the CPU: where a single-process run puts its model."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
