"""One private Ray cluster for a test module, with Ray Train's test-speed settings."""

from __future__ import annotations

import ipaddress
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


def descendants(*roots: int) -> set[int]:
    """``roots`` and every process below them (Linux /proc)."""
    table = proc_table()
    tree, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - tree
        tree |= frontier
    return tree


def processes_naming(marker: str) -> set[int]:
    """The processes whose command line contains ``marker`` (a cluster's private temp dir), and their
    descendants; never this process."""
    own = {pid for pid, (_, cmd) in proc_table().items() if marker in cmd} - {os.getpid()}
    return descendants(*own) - {os.getpid()}


def _proc_net_address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of a ``/proc/net/tcp{,6}`` entry: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    return getattr(address, "ipv4_mapped", None) or address


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, program) of every TCP socket in LISTEN state held open by one of ``pids``
    (program: the base name of the process's first argument, ``gcs_server``, ``ray::IDLE``)."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    table = proc_table()
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in owner:  # 0A: TCP_LISTEN
                    hex_addr, hex_port = local.split(":")
                    pid = owner[inode]
                    command = os.path.basename((table.get(pid, (0, "?"))[1].split() or ["?"])[0])
                    found.append((str(_proc_net_address(hex_addr)), int(hex_port, 16), pid, command))
    return found


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback
