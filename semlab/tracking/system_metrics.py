"""System metrics of the training process's machine, sampled at each log period for MLflow.

Read from Linux's ``/proc`` and torch, without psutil (MLflow's own system-metrics monitor needs
psutil and, for GPUs, pynvml, which the training image need not have). Keys, under ``system/``:

    cpu_percent              machine CPU use since the previous sample (all cores, 0-100)
    memory_used_gb           machine memory in use (MemTotal - MemAvailable)
    memory_percent           the same, in % of MemTotal
    process_rss_gb           resident memory of this process (rank 0's worker)
    gpu<i>_memory_allocated_gb / gpu<i>_memory_reserved_gb / gpu<i>_max_memory_allocated_gb
                             torch's CUDA allocator, per visible device (GPU only)
    gpu<i>_utilization       % of time a kernel ran (torch.cuda.utilization; needs pynvml)

Missing sources (another OS, no GPU) leave their keys out; sampling never raises.
"""

from __future__ import annotations

from pathlib import Path

import torch

GB = 1024**3


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def _process_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class SystemMetrics:
    """``sample()`` -> ``{"system/<key>": value}``; CPU use is measured between two samples."""

    def __init__(self) -> None:
        self._last_cpu = _cpu_times()

    def sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        cpu = _cpu_times()
        if cpu is not None and self._last_cpu is not None and cpu[1] > self._last_cpu[1]:
            busy, total = cpu[0] - self._last_cpu[0], cpu[1] - self._last_cpu[1]
            metrics["system/cpu_percent"] = 100.0 * busy / total
        self._last_cpu = cpu
        mem = _meminfo()
        if "MemTotal" in mem and "MemAvailable" in mem:
            used = mem["MemTotal"] - mem["MemAvailable"]
            metrics["system/memory_used_gb"] = used / GB
            metrics["system/memory_percent"] = 100.0 * used / mem["MemTotal"]
        rss = _process_rss()
        if rss is not None:
            metrics["system/process_rss_gb"] = rss / GB
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                metrics[f"system/gpu{i}_memory_allocated_gb"] = torch.cuda.memory_allocated(i) / GB
                metrics[f"system/gpu{i}_memory_reserved_gb"] = torch.cuda.memory_reserved(i) / GB
                metrics[f"system/gpu{i}_max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(i) / GB
                try:
                    metrics[f"system/gpu{i}_utilization"] = float(torch.cuda.utilization(i))
                except Exception:  # noqa: BLE001 - pynvml missing: no utilization, the rest stays
                    pass
        return metrics
