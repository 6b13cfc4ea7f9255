"""This process's resident memory as the Linux kernel counts it, for the benchmarks that measure a
peak: read a /proc/self/status field, reset the peak counter (VmHWM), give freed memory back first."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def status_mib(field: str) -> float:
    """A /proc/self/status field in MiB ("VmRSS", "VmHWM"); NaN where the kernel has none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so each run's peak is its own; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Give memory freed by earlier work back to the kernel (glibc keeps it resident otherwise), so
    that the next peak above the starting RSS counts everything the next run allocates."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
