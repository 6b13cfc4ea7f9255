"""The cost of one explanation: time and peak memory of each explain.Explainer method, beside one plain inference.

    .venv/bin/python -m benchmarks.explain [--size 64 128 256] [--methods gradcam integrated_gradients occlusion]
        [--max-size integrated_gradients=128 occlusion=64] [--device cpu|cuda] [--repeat 3] [--steps 16] [--window 16]
        [--quiet-load 1.2 --quiet-wait 1800] [--out benchmarks/results]

The network (demo weights, or --checkpoint) explains one chest-like volume at S (export.volumes.chest,
the volume benchmarks.cpu_engines times; [1, 1, S, S, S] float32 in [-1, 1]), FP32, batch 1.
"Inference" is the classifier's forward pass under torch.inference_mode: what ct_classifier does for
one study. Every explanation is timed in the same process as inferences, interleaved
(explanation, inference, inference, explanation, ...), so its ratio to inference compares the same
minutes of the machine.

Cost of each method for one study at S (F = one forward pass, B = one backward pass; explain/attribution.py):
- gradcam: F + a backward pass through the pooling and the FC layer only (layer4's output is the
  leaf); the memory of an inference pass; resolution S/8 per axis.
- integrated_gradients: steps x (F + full B to the input) + 1 F; the memory of one full backward pass.
- occlusion: (S / window)^3 + 1 F (one per window position, plus the unoccluded one), inference memory.

CPU: each (method, S) runs in a fresh child process (`child`), so that no earlier measurement's
heap counts in its peak: the model and the volume are loaded, everything is warmed up once at S=16,
the resident memory then is the baseline, and each call's peak is the kernel's VmHWM after resetting
it (clear_refs 5) just before the call, freed memory given back first (malloc_trim). The first call
of the method in that process gives the reported peak. Inference's peak comes from a child of its
own. Before each child the 1-minute load average may be waited for (--quiet-load); the load before
and the CPU other processes used during the child (/proc/stat, less the child's own CPU time) are
recorded with each row; with --quiet-load, a measurement during which other processes used more
than 0.2 cores is taken again (twice at most; the disturbed attempts stay in the JSON).
CUDA: in this process (torch.cuda's peak counters are reset per call):
peak allocated and reserved above the weights and the volume, the CUDA context measured as in
gpu_check, whether the call fits an 8 GB card, by running it again with the caching allocator capped
at an 8 GB card's 7936 MiB minus that context (a measurement, not an estimate), cuDNN's TF32 off (IEEE FP32).

(method, S) beyond --max-size METHOD=S are listed as "not measured" with the reason; nothing is
extrapolated. Writes explain-<device>.json and explain-<device>.md into --out, prints the table and
one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import option_types
from benchmarks.load import write_results
from benchmarks.process_memory import cpu_model, cpuinfo_field, release_freed_memory, reset_peak, status_mib
from contract import MAX_SIZE
from contract.arguments import integer
from serve.sizing import CARD_BYTES  # what an 8 GB card gives CUDA (as benchmarks.gpu_check)

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = "inference"
METHODS = ("gradcam", "integrated_gradients", "occlusion")  # explain.METHODS, without importing captum here
WARM_UP_SIZE = 16
QUIET_OTHERS_CORES = 0.2  # with --quiet-load: a CPU measurement during which others used more is taken again
# one CPU measurement in a fresh interpreter, its Config as JSON in argv[1]; prints the row as JSON
CHILD = "import json, sys; from benchmarks.explain import Config, child; print(json.dumps(child(Config(**json.loads(sys.argv[1])))))"
COST = {
    INFERENCE: "F",
    "gradcam": "F + backward through pooling and FC; inference memory",
    "integrated_gradients": "steps x (F + full B to the input) + F; one full backward's memory",
    "occlusion": "((S / window)^3 + 1) F; inference memory",
}


@dataclass(frozen=True)
class Config:
    """One measurement: a method (or plain inference) at S, as the child process runs it."""

    method: str
    size: int
    device: str = "cpu"
    repeat: int = 3
    round_budget_s: float = 60.0  # no new round once the measurement has run this long (one round at least)
    steps: int = 16
    window: int = 16
    threads: int = 0
    checkpoint: str | None = None


def passes(method: str, size: int, steps: int, window: int) -> str:
    """The cost formula evaluated for this configuration (counts of passes, not a time)."""
    if method == "integrated_gradients":
        return f"{steps} x (F + B) + F"
    if method == "occlusion":
        return f"{(size // window) ** 3 + 1} F"
    if method == "gradcam":
        return "F + B(fc)"
    return "F"


# ---------------------------------------------------------------- the measured calls


def _network(checkpoint: str | None):
    from export import build_classifier, demo_weights, load_checkpoint

    weights = load_checkpoint(checkpoint) if checkpoint else demo_weights()
    return build_classifier(weights), weights.source


def _volume(size: int):
    from export.volumes import chest

    return chest(size, 7, lesion=True).numpy()


def _callables(network, config: Config, size: int, device: str):
    """(explain, infer): one explanation, one inference, each returning only when its result is on the host."""
    import torch

    from explain import Explainer

    explainer = None
    if config.method != INFERENCE:
        explainer = Explainer(network, size=size, device=device, method=config.method, steps=config.steps, window=min(config.window, size))

    def infer(volume):
        with torch.inference_mode():
            return torch.softmax(network(volume), dim=1).cpu()

    return explainer, infer


def child(config: Config) -> dict:
    """One (method, S) on the CPU in this (fresh) process: times, peaks, and the baseline they sit on."""
    import torch

    from preprocess.workers import available_cpus

    threads = config.threads or available_cpus()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    network, source = _network(config.checkpoint)
    volume = torch.from_numpy(_volume(config.size))
    # warm-up at S=16: imports (captum, autograd), thread pools, the allocator
    small = torch.from_numpy(_volume(WARM_UP_SIZE))
    warm_explainer, infer = _callables(network, config, WARM_UP_SIZE, "cpu")
    infer(small)
    if warm_explainer is not None:
        warm_explainer(small.numpy())
    explainer, _ = _callables(network, config, config.size, "cpu")
    del warm_explainer, small
    release_freed_memory()
    baseline = status_mib("VmRSS")
    load_s = time.perf_counter() - started
    exact = reset_peak()
    calls: dict[str, list[dict]] = {config.method: []} if explainer is None else {config.method: [], INFERENCE: []}
    measure_started = time.perf_counter()
    rounds = 0
    while rounds < config.repeat and (rounds == 0 or time.perf_counter() - measure_started < config.round_budget_s):
        order = list(calls) if rounds % 2 == 0 else list(reversed(calls))  # the method first in round 0: a clean peak
        for name in order:
            release_freed_memory()
            exact = reset_peak() and exact
            before = status_mib("VmRSS")
            cpu_started, call_started = time.process_time(), time.perf_counter()
            if name == INFERENCE:
                infer(volume)
            else:
                explanation = explainer(volume)
                assert explanation.attribution.shape == (config.size,) * 3
                del explanation
            seconds = time.perf_counter() - call_started
            peak = status_mib("VmHWM")
            calls[name].append(
                {
                    "s": round(seconds, 4),
                    "cpu_s": round(time.process_time() - cpu_started, 3),
                    "rss_before_mib": round(before, 1),
                    "peak_rss_mib": round(peak, 1) if exact else None,
                }
            )
        rounds += 1
    first = calls[config.method][0]
    result = {
        "method": config.method,
        "size": config.size,
        "device": "cpu",
        "threads": threads,
        "weights": source,
        "rounds": rounds,
        "load_s": round(load_s, 2),
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": first["peak_rss_mib"],
        "peak_above_baseline_mib": round(first["peak_rss_mib"] - baseline, 1) if exact else None,
        "s": statistics.median(c["s"] for c in calls[config.method]),
        "calls": calls,
    }
    if INFERENCE in calls and config.method != INFERENCE:
        result["inference_s"] = statistics.median(c["s"] for c in calls[INFERENCE])
        result["ratio"] = result["s"] / result["inference_s"]
        result["paired_ratios"] = [round(e["s"] / i["s"], 3) for e, i in zip(calls[config.method], calls[INFERENCE])]
    else:
        result["inference_s"], result["ratio"] = result["s"], 1.0
    return result


def _cpu_times() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(threshold: float | None, limit_s: float, log=print) -> dict:
    """Wait (up to limit_s) until the 1-minute load average is at most threshold; say what it was."""
    started = time.monotonic()
    load = os.getloadavg()[0]
    while threshold is not None and load > threshold and time.monotonic() - started < limit_s:
        log(f"explain: 1-minute load {load:.2f} > {threshold}: waiting")
        time.sleep(15)
        load = os.getloadavg()[0]
    return {
        "load_1min": round(load, 2),
        "waited_s": round(time.monotonic() - started),
        "quiet": threshold is None or load <= threshold,
    }


def measure_cpu_child(config: Config, quiet: float | None, quiet_wait_s: float, log=print) -> dict:
    """Runs `child` in a fresh interpreter; adds the load before it and what others used during it."""
    before = wait_for_quiet(quiet, quiet_wait_s, log)
    busy, steal = _cpu_times()
    own = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(asdict(config))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the child for {config.method} at S={config.size} failed: {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    busy_after, steal_after = _cpu_times()
    own_cpu = _children_cpu() - own
    result["load_1min_before"] = before["load_1min"]
    result["quiet_before"] = before["quiet"]
    result["waited_for_quiet_s"] = before["waited_s"]
    result["child_wall_s"] = round(wall, 1)
    result["others_cpu_cores"] = round(max(busy_after - busy - own_cpu, 0.0) / wall, 2)  # other processes, in cores
    result["steal_cores"] = round((steal_after - steal) / wall, 2)
    return result


def measure_cuda(config: Config, context_bytes: int | None = None) -> dict:
    """One (method, S) on the GPU in this process: medians after a warm-up, peaks per call, and a run
    under an 8 GB cap (caching allocator limited to the card's 7936 MiB minus the CUDA context)."""
    import torch

    network, source = _network(config.checkpoint)
    network = network.to("cuda").eval()
    saved_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # IEEE FP32, as TorchClassifier's fp32
    try:
        volume = torch.from_numpy(_volume(config.size)).to("cuda")
        explainer, infer = _callables(network, config, config.size, "cuda")
        names = [config.method] if explainer is None else [config.method, INFERENCE]

        def call(name: str) -> None:
            if name == INFERENCE:
                infer(volume)
            else:
                explainer(volume)  # returns the attribution on the host: synchronised
            torch.cuda.synchronize()

        for name in names:
            call(name)  # warm-up: cuDNN's algorithms, captum's imports
        if context_bytes is None:
            free, total = torch.cuda.mem_get_info()
            context_bytes = (total - free) - torch.cuda.memory_reserved()
        peaks = {}
        for name in names:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            call(name)
            peaks[name] = {
                "resident_mib": round(resident / 2**20),  # weights + the volume
                "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
                "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20),
            }
        times: dict[str, list[float]] = {name: [] for name in names}
        started = time.perf_counter()
        rounds = 0
        while rounds < config.repeat and (rounds == 0 or time.perf_counter() - started < config.round_budget_s):
            for name in names if rounds % 2 == 0 else reversed(names):
                call_started = time.perf_counter()
                call(name)
                times[name].append(round(time.perf_counter() - call_started, 5))
            rounds += 1
        total = torch.cuda.get_device_properties(0).total_memory
        cap = CARD_BYTES - context_bytes
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0))
        try:
            call(config.method)
            fits = True
        except torch.cuda.OutOfMemoryError:
            fits = False
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.allow_tf32 = saved_tf32
    peak = peaks[config.method]
    result = {
        "method": config.method,
        "size": config.size,
        "device": "cuda",
        "device_name": torch.cuda.get_device_name(0),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "weights": source,
        "rounds": rounds,
        "s": statistics.median(times[config.method]),
        "calls": times,
        **peak,
        "peaks": peaks,
        "context_mib": round(context_bytes / 2**20),
        "cap_mib": round(cap / 2**20),
        "fits_8gb": fits,
        "context_plus_peak_reserved_mib": round(context_bytes / 2**20) + peak["peak_reserved_mib"],
    }
    if INFERENCE in times and config.method != INFERENCE:
        result["inference_s"] = statistics.median(times[INFERENCE])
        result["ratio"] = result["s"] / result["inference_s"]
    else:
        result["inference_s"], result["ratio"] = result["s"], 1.0
    return result


# ---------------------------------------------------------------- the run and its report


def _limits(entries: list[str]) -> dict[str, int]:
    limits = {}
    for entry in entries:
        method, _, size = entry.partition("=")
        if method not in METHODS or not size.isdigit():
            raise SystemExit(f"--max-size takes METHOD=S with METHOD one of {', '.join(METHODS)}, not {entry!r}")
        limits[method] = int(size)
    return limits


def run(
    sizes: list[int],
    methods: list[str],
    *,
    device: str = "cpu",
    max_size: dict[str, int] | None = None,
    repeat: int = 3,
    steps: int = 16,
    window: int = 16,
    threads: int = 0,
    checkpoint: str | None = None,
    quiet: float | None = None,
    quiet_wait_s: float = 1800.0,
    log=print,
) -> dict:
    """Every (method, S) asked for, inference first at each S; the ones over max_size listed as not measured."""
    import torch

    from contract import validate_size
    from export import load_checkpoint

    for size in sizes:
        validate_size(size)
    if checkpoint:
        load_checkpoint(checkpoint)  # one that cannot be used fails here, not in each child's traceback
    max_size = max_size or {}
    result: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "captum": _version("captum"),
        "volume": "export.volumes.chest(S, seed 7, lesion): a chest phantom on the S^3 grid, [1, 1, S, S, S] float32 in [-1, 1]",
        "precision": "fp32",
        "steps": steps,
        "window": window,
        "repeat": repeat,
        "quiet_load": quiet,
        "cost": COST,
        "rows": [],
        "not_measured": [],
    }
    context = None
    for size in sizes:
        for method in [INFERENCE, *methods]:
            limit = max_size.get(method)
            if limit is not None and size > limit:
                result["not_measured"].append(
                    {"method": method, "size": size, "reason": f"too slow to measure here (--max-size {method}={limit})"}
                )
                continue
            config = Config(method, size, device, repeat, steps=steps, window=window, threads=threads, checkpoint=checkpoint)
            log(f"explain: {method} at S={size} on {device}")
            if device == "cuda":
                row = measure_cuda(config, context)
                context = row["context_mib"] * 2**20
                result["device_name"] = row["device_name"]
            else:
                row = measure_cpu_child(config, quiet, quiet_wait_s, log)
                disturbed = []
                # quiet before is not quiet throughout: measured again (twice at most) when others used the CPU meanwhile
                while quiet is not None and row["others_cpu_cores"] > QUIET_OTHERS_CORES and len(disturbed) < 2:
                    log(f"explain: other processes used {row['others_cpu_cores']} cores during it: measuring again")
                    disturbed.append({k: row[k] for k in ("s", "inference_s", "ratio", "others_cpu_cores", "load_1min_before")})
                    row = measure_cpu_child(config, quiet, quiet_wait_s, log)
                row["disturbed_attempts"] = disturbed
                result["threads"] = row["threads"]
            row["passes"] = passes(method, size, steps, min(window, size))
            result["rows"].append(row)
    result["weights"] = result["rows"][0]["weights"] if result["rows"] else None
    return result


def _cpu_flags() -> list[str]:
    """The vector instruction sets that decide the CPU's FP32 rate (machines of one name differ)."""
    return sorted(set((cpuinfo_field("flags") or "").split()) & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"})


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def table(result: dict) -> list[str]:
    """The markdown table: measured rows and 'not measured' ones, by S then method."""
    cuda = result["device"] == "cuda"
    columns = ["method", "S", "time s", "ratio to inference"]
    if cuda:
        columns += ["peak allocated MiB (above weights + volume)", "peak reserved MiB", "fits 8 GB", "passes"]
    else:
        columns += ["peak RSS MiB", "above baseline MiB", "passes", "load before", "others' CPU"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * 5 + "---|" * (len(columns) - 6)]
    rows = [(r["size"], _order(r["method"]), r) for r in result["rows"]]
    rows += [(n["size"], _order(n["method"]), n) for n in result["not_measured"]]
    for _, _, row in sorted(rows, key=lambda entry: entry[:2]):
        name = row["method"]
        if "reason" in row:
            missing = ["not measured"] * (5 if cuda else 4)
            formula = passes(name, row["size"], result["steps"], min(result["window"], row["size"]))
            lines.append("| " + " | ".join([name, str(row["size"]), *missing, formula, *([] if cuda else ["", ""])]) + " |")
            continue
        ratio = f"{row['ratio']:.2f}" + ("" if name == INFERENCE else f" (inference {_seconds(row['inference_s'])} s)")
        if cuda:
            lines.append(
                f"| {name} | {row['size']} | {_seconds(row['s'])} | {ratio} | {row['peak_allocated_mib']} "
                f"({row['peak_allocated_mib'] - row['resident_mib']}) | {row['peak_reserved_mib']} | "
                f"{'yes' if row['fits_8gb'] else 'no'} | {row['passes']} |"
            )
        else:
            lines.append(
                f"| {name} | {row['size']} | {_seconds(row['s'])} | {ratio} | {row['peak_rss_mib']} | "
                f"{row['peak_above_baseline_mib']} | {row['passes']} | {row['load_1min_before']} | {row['others_cpu_cores']} |"
            )
    return lines


def _order(method: str) -> int:
    return ([INFERENCE, *METHODS].index(method)) if method in (INFERENCE, *METHODS) else 99


def _seconds(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def markdown(result: dict) -> str:
    device = result.get("device_name") or f"{result['cpu']}, {result['cpu_cores']} cores, {' '.join(result.get('cpu_flags', []))}"
    lines = [
        f"# The cost of one explanation ({result['device']}: {device})",
        "",
        f"`{result['command']}` on {result['date']}; torch {result['torch']}, captum {result['captum']}, Python {result['python']}"
        + (f", {result['threads']} threads" if result.get("threads") else "")
        + f". Weights: {result.get('weights')}. Volume: {result['volume']}. FP32, batch 1; integrated_gradients "
        f"with {result['steps']} steps, occlusion with a window of {result['window']} voxels (stride = window). "
        f"Time: median of up to {result['repeat']} calls, explanations and inferences interleaved in one process; "
        "ratio: the explanation's median over inference's median in that process.",
        "",
        *table(result),
        "",
    ]
    if result["device"] == "cuda":
        row = next((r for r in result["rows"] if r["method"] != INFERENCE), None)
        lines += [
            "Memory: torch.cuda.max_memory_allocated / max_memory_reserved during one call (peak counters reset before it); "
            f'the CUDA context of this process: {row["context_mib"] if row else "?"} MiB. "fits 8 GB": the call ran again '
            f"with the caching allocator capped at 7936 MiB (an 8 GB card) minus that context ({row['cap_mib'] if row else '?'} MiB) "
            "without running out of memory (measured, not estimated).",
            "",
        ]
    else:
        quiet = result["quiet_load"]
        loads = [r["load_1min_before"] for r in result["rows"]]
        others = [r["others_cpu_cores"] for r in result["rows"]]
        if loads:
            lines += [
                f"Load: 1-minute load average {min(loads)}-{max(loads)} before the measurements, other processes "
                f"used {min(others)}-{max(others)} cores while they ran; measurements taken again because others used more than "
                f"{QUIET_OTHERS_CORES} cores: {sum(len(r.get('disturbed_attempts', [])) for r in result['rows'])}.",
                "",
            ]
        lines += [
            "Memory: the peak resident set (VmHWM, reset before the call) of a fresh process per (method, S) during the "
            "method's first call there, and that peak above the process's resident memory with the model and volume loaded "
            'and everything warmed up at S=16 (baseline). Inference\'s row is a process of its own. "load before": the '
            "1-minute load average when the process started"
            + (f" (each waited for <= {quiet})" if quiet is not None else "")
            + "; \"others' CPU\": cores other processes used while it ran (/proc/stat less the process's own CPU time).",
            "",
        ]
    lines += [
        "Cost per study at S (F = one forward pass, B = one backward pass; `explain/attribution.py`):",
        "",
        "- gradcam: F + a backward pass through the pooling and the FC layer only (layer4's output is the leaf), "
        "an inference pass's memory; resolution S/8 per axis.",
        "- integrated_gradients: steps x (F + full B to the input) + 1 F, one full backward pass's memory; voxel resolution.",
        "- occlusion: ((S / window)^3 + 1) F, inference memory; resolution: the window.",
        "",
    ]
    if result["not_measured"]:
        lines += ["Not measured (no number is extrapolated):", ""]
        lines += [f"- {n['method']} at S={n['size']}: {n['reason']}" for n in result["not_measured"]]
        lines.append("")
    return "\n".join(lines)


def write(result: dict, out: Path) -> tuple[Path, Path]:
    name = f"explain-{result['device']}"
    write_results(out, name, result, markdown(result))
    return out / f"{name}.json", out / f"{name}.md"


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    from explain.attribution import MAX_OCCLUSION_PASSES, MAX_STEPS  # here, not above: captum stays out of each child's baseline

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.explain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", type=option_types.SIZE, nargs="+", default=[64, 128, 256], metavar="S", help="S values, voxels per side")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"explain.Explainer methods to measure, of {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--max-size",
        nargs="*",
        default=["integrated_gradients=128", "occlusion=64"],
        metavar="METHOD=S",
        help="the largest S measured per method; larger ones are listed as not measured",
    )
    parser.add_argument("--device", type=option_types.torch_device, choices=("cpu", "cuda"), default="cpu", help="where the network runs")
    parser.add_argument(
        "--repeat",
        type=option_types.COUNT,
        default=3,
        metavar="N",
        help="calls of each per measurement, at most (no new round once past 60 s)",
    )
    parser.add_argument(
        "--steps",
        type=integer(1, MAX_STEPS),
        default=16,
        metavar="N",
        help=f"integrated_gradients steps, at most {MAX_STEPS} (the default is the Explainer's)",
    )
    parser.add_argument(
        "--window",
        type=integer(1, MAX_SIZE),
        default=16,
        metavar="VOXELS",
        help="occlusion window, voxels per side, dividing each S occlusion is measured at (above S: S; the default is the Explainer's)",
    )
    parser.add_argument(
        "--threads", type=option_types.THREADS, default=0, metavar="N", help="CPU threads; 0: every CPU this process may use"
    )
    parser.add_argument("--checkpoint", metavar="PATH", help="a checkpoint instead of the seeded demo weights; omitted: demo weights")
    parser.add_argument(
        "--quiet-load",
        type=option_types.SECONDS,
        metavar="LOAD",
        help="wait before each CPU measurement until the 1-minute load average is at most this; omitted: no wait",
    )
    parser.add_argument(
        "--quiet-wait",
        type=option_types.SECONDS,
        default=1800.0,
        metavar="SECONDS",
        help="longest wait for quiet per measurement, s (with --quiet-load)",
    )
    parser.add_argument(
        "--out",
        type=option_types.out_folder,
        default="benchmarks/results",
        metavar="DIR",
        help="folder for explain-<device>.json and .md",
    )
    args = parser.parse_args(argv)
    max_size = _limits(args.max_size)
    if "occlusion" in args.methods:  # the window explain.Explainer takes at each S occlusion is measured at
        for size in (s for s in args.size if s <= max_size.get("occlusion", MAX_SIZE)):
            window = min(args.window, size)
            if size % window or (size // window) ** 3 + 1 > MAX_OCCLUSION_PASSES:
                parser.error(
                    f"--window {args.window}: explain.Explainer takes no occlusion window of {window} at S={size} "
                    f"(it must divide S, and (S / window)^3 + 1 forward passes be at most {MAX_OCCLUSION_PASSES})"
                )
    result = run(
        args.size,
        args.methods,
        device=args.device,
        max_size=max_size,
        repeat=args.repeat,
        steps=args.steps,
        window=args.window,
        threads=args.threads,
        checkpoint=args.checkpoint,
        quiet=args.quiet_load,
        quiet_wait_s=args.quiet_wait,
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    result["command"] = option_types.command_line(parser, argv)
    json_path, md_path = write(result, args.out)
    print("\n".join(table(result)))
    summary = {
        "json": str(json_path),
        "markdown": str(md_path),
        "rows": [{k: r.get(k) for k in ("method", "size", "s", "ratio", "peak_rss_mib", "peak_allocated_mib")} for r in result["rows"]],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
