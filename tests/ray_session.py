"""One private Ray cluster for a test module, with Ray Train's test-speed settings."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

FAST_RAY_TRAIN = {  # quicker failure detection and no preemption watcher: test speed only
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@contextmanager
def ray_session(start: Callable[[str], object], prefix: str) -> Iterator[None]:
    """Set ``FAST_RAY_TRAIN``, call ``start(temp_dir)`` (which initialises Ray in a fresh short temp
    dir: Ray's socket paths are length-limited), and on exit shut Ray down, delete the temp dir and
    restore the environment."""
    import ray

    saved = {k: os.environ.get(k) for k in FAST_RAY_TRAIN}
    os.environ.update(FAST_RAY_TRAIN)
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        start(temp_dir)
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def small_local_ray(prefix: str) -> Iterator[None]:
    """A private 2-CPU Ray in this process (no dashboard, 300 MB object store), via :func:`ray_session`."""

    def start(temp_dir: str) -> None:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, _temp_dir=temp_dir)

    with ray_session(start, prefix):
        yield


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process visible in /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, cmdline)
    return table
