"""What the benchmarks read of a process and of this machine from /proc: a process's resident memory
as the Linux kernel counts it (a /proc/<pid>/status field; for this process's peak, the peak counter
VmHWM reset and freed memory given back first), and the CPU model a results file names."""

from __future__ import annotations

import ctypes
import gc
import platform
from pathlib import Path


def status_mib(field: str, pid: int | str = "self") -> float:
    """A /proc/<pid>/status field in MiB ("VmRSS", "VmHWM"), of this process by default; NaN where
    the kernel has none (a process that has exited but not been reaped); OSError when no such process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
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


def cpuinfo_field(name: str) -> str | None:
    """The first /proc/cpuinfo line's value for `name` ("model name", "flags"); None where it has none."""
    path = Path("/proc/cpuinfo")
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU's model name, what a results file names the machine by; else what the platform says."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()
