"""Rank / world-size helpers that work with and without an initialised process group."""

from __future__ import annotations

import torch.distributed as dist


def is_enabled() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_enabled() and get_world_size() > 1:
        dist.barrier()
