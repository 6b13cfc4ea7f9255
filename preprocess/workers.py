"""How many worker threads a study may use: what this process is allowed, not the machine's size."""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), further bounded by a
    cgroup CPU quota (a container's --cpus or a Kubernetes CPU limit), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


MAX_THREADS = 1024  # threads asked of preprocess or of a model instance: far past any CPU, short of exhausting the process


def worker_threads(requested: int | None) -> int:
    """`requested` threads, or every available CPU when None or 0."""
    if requested is None or requested == 0:
        return available_cpus()
    if isinstance(requested, bool) or not isinstance(requested, int) or not 0 < requested <= MAX_THREADS:
        raise ValueError(f"threads must be an integer from 1 to {MAX_THREADS} (or 0 for every available CPU), not {requested!r}")
    return requested


def instance_threads(model: str, setting: str, instances: int) -> int:
    """A Python-backend model's `threads` parameter: "0" shares the CPUs this server may use evenly
    among the model's `instances`; anything but 0 to MAX_THREADS is refused at load time,
    naming the parameter (torch took a negative count with an error that named nothing, and 10^6
    threads with an unrelated out-of-memory error)."""
    try:
        threads = int(setting)
    except ValueError:
        raise ValueError(f"{model}: parameter threads must be an integer, not {setting!r}") from None
    if not 0 <= threads <= MAX_THREADS:
        shared = "0 (the CPUs shared among its instances)"
        raise ValueError(f"{model}: parameter threads must be {shared} to {MAX_THREADS}, not {threads}")
    return threads or max(1, available_cpus() // max(1, instances))


def instance_device(model: str, setting: str, args: dict) -> str:
    """A Python-backend model's `device` parameter as a torch device ("cpu" or "cuda:<the instance's
    GPU>"), refused at load time with the fix in the message (ct_preprocess and ct_explain share it)."""
    if setting == "cpu":
        return "cpu"
    if setting != "cuda":
        raise ValueError(f"{model}: parameter device must be 'cpu' or 'cuda', not {setting!r}")
    if args["model_instance_kind"] != "GPU":
        raise ValueError(f"{model}: device 'cuda' needs instance_group kind KIND_GPU, not {args['model_instance_kind']}")
    import torch  # only a GPU instance needs it here

    if not torch.cuda.is_available():
        raise ValueError(f"{model}: device 'cuda' but torch sees no CUDA device (a CPU-only torch build, or no GPU visible)")
    return f"cuda:{args['model_instance_device_id']}"
