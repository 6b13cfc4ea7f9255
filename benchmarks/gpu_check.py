"""The GPU checks in one run (`benchmarks/gpu_check.sh` starts it): what the torch-gpu classifier and
GPU preprocessing achieve on the card at hand, and what fits on an 8 GB card.

Sections, in this order, each written to the results as it completes (a section that fails or runs
out of time is recorded as such, and the others still run):
1. classifier: studies/s, latency and achieved TFLOP/s per batch size and precision (the served
   engine, classifier.TorchClassifier, on random volumes at S); channels-last vs contiguous at FP16;
2. memory: peak GPU memory per batch and precision under a cap that emulates an 8 GB card (the
   caching allocator limited to what such a card gives CUDA, serve.sizing.CARD_BYTES, minus the CUDA
   context this process holds), and the largest batch that fits, found by bisection above the last
   fitting batch size;
3. parity: the served engine at FP16 and BF16 vs FP32 (export's check on the parity set), and FP16
   vs FP32 on the GPU at S;
4. preprocessing: a 300 x 512 x 512 study on the device (upload and device time) vs the CPU fast path;
5. served: the ensemble on the bundled tritonserver (torch-gpu classifier, ct_preprocess on the
   device) at a few concurrency levels after an untimed round at the highest, when the server is
   installed; then one study through ct_triage_explain (the explanation models on the same device);
   the GPU memory the server held; then, with time left, the classifier's configured batching wait
   against none;
6. explain: one Grad-CAM explanation (explain.Explainer, FP32) at S beside one plain inference
   (benchmarks.explain): time, ratio, peak allocated and reserved memory, and whether it runs on an
   8 GB card (run again under the same kind of cap as the memory section).
The budget counts from gpu_check.sh's start (GPU_CHECK_STARTED: the carried packages' install and
the imports are part of the 8 minutes). A section that cannot stop midway starts only with its own
reserve and those of the sections after it left (SECTION_RESERVE_S); the classifier and memory
sections stop after their own share (SECTION_LIMIT_S) or when the sections after them need the rest;
the served section's steps end by the time the explain section needs, and each of its requests times
out by then. So a GPU run ends within 8 minutes with every section's turn kept, and what did not fit
says "no time left". Results are written after each section and each served step: a run killed
midway keeps what it measured.
`--smoke` runs every section on the CPU at a tiny S in well under a minute of compute (the test suite
runs it, so the script cannot rot between GPU runs); the memory section needs CUDA and says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from classifier import ResNet34Classifier, TorchClassifier
from export import build_classifier, check_torch_parity, demo_weights
from export.parity import FP16_BOUND, parity_inputs
from serve.sizing import CARD_BYTES
from settings import OPERATING_POINT

GIB = 1024**3
SERVED_PREPROCESS_INSTANCES = {"cuda": 4, "cpu": 2}  # ct_preprocess instances of the served section
STARTED_ENV = "GPU_CHECK_STARTED"  # gpu_check.sh's start, epoch seconds
# The time a section that cannot stop midway needs once started (served: rendering, server start and
# stop, a warm-up round and its levels): it starts only with that much left beside the reserves of the
# sections after it, which the sections before them leave them.
SECTION_RESERVE_S = {"parity": 20.0, "preprocessing": 30.0, "served": 100.0, "explain": 50.0}
# A looping section's own share of the budget: its rows past it are recorded as not measured, so that
# cuDNN autotuning at large FP32 batches cannot cost the sections after it their turn.
SECTION_LIMIT_S = {"classifier": 100.0, "memory": 60.0}
# Parts of the served section, each started only with this much of its turn left: the levels after the
# server start (a warm-up round and one level), the explained study (the first call warms ct_explain
# up), and the batching wait (its first round: a level, a reload of ct_classifier, which tritonclient's
# 60 s network timeout bounds, and a level).
SERVED_AFTER_START_S = 30.0
EXPLAINED_S = 20.0
BATCHING_WAIT_S = 90.0
SECTIONS = ("classifier", "memory", "parity", "preprocessing", "served", "explain")  # in this order
NO_TIME = "no time left"
TARGETS = {"fp16_studies_per_s": 40.0, "fp16_batch_in_8gb": 4, "preprocess_ms": 20.0, "parity_max_abs": 1e-4, "served_studies_per_s": 20.0}


@dataclass(frozen=True)
class Plan:
    """What one run measures; `--smoke` shrinks it to a CPU-sized run of the same code."""

    device: str
    size: int
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    seconds: float  # per measurement, after the warm-up
    study_shape: tuple[int, int, int]  # slices, rows, columns of the preprocessing study
    served_shape: tuple[int, int, int]
    served_levels: tuple[int, ...]
    served_requests: int
    served_wait_rounds: int  # of the batching-wait comparison, each measuring both waits
    budget_s: float  # from gpu_check.sh's start; later sections are skipped when it is spent

    @staticmethod
    def gpu() -> Plan:
        return Plan(
            "cuda", 256, (1, 2, 4, 8, 16), ("fp16", "fp32", "bf16"), 2.0, (300, 512, 512), (300, 512, 512), (1, 4, 8, 16), 24, 2, 420.0
        )

    @staticmethod
    def smoke() -> Plan:
        # its budget only has to let every section run on a busy 2-core machine (the suite's other worker,
        # other jobs): there it took 47 s alone and ran out of 240 s beside heavy load
        return Plan("cpu", 16, (1, 2), ("fp32",), 0.2, (24, 64, 64), (24, 64, 64), (1, 2), 4, 1, 480.0)


def study_tflop(size: int) -> float:
    """Floating-point operations of one forward pass at S (multiply-add = 2), counted on the meta device."""
    with torch.device("meta"):
        model = ResNet34Classifier().eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 1, size, size, size))
    return counter.get_total_flops() / 1e12


def environment(plan: Plan) -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": __import__("numpy").__version__,
        "cpu_cores": os.cpu_count(),
        "size": plan.size,
        "study_tflop": round(study_tflop(plan.size), 4),
        "device": plan.device,
    }
    if plan.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu=properties.name, gpu_memory_gib=round(properties.total_memory / GIB, 1), multiprocessors=properties.multi_processor_count
        )
    else:
        info["gpu"] = "none (smoke run on the CPU)"
    return info


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _volumes(batch: int, size: int, device: str) -> torch.Tensor:
    return torch.empty((batch, 1, size, size, size), device=device).uniform_(-1, 1)  # no temporary copy in the peak


def _timed(engine: TorchClassifier, x: torch.Tensor, seconds: float, device: str) -> tuple[int, float]:
    """Iterations and seconds of back-to-back forward passes, after one warm-up (cuDNN autotuning).
    Each pass is waited for, as the served model waits for each batch: without it the host queues
    passes ahead of the GPU and the clock the loop stops on says nothing of the work done."""
    engine(x)
    _synchronize(device)
    iterations, started = 0, time.perf_counter()
    while iterations < 3 or time.perf_counter() - started < seconds:
        engine(x)
        _synchronize(device)
        iterations += 1
        if iterations >= 2 and time.perf_counter() - started > 4 * seconds:
            break
    return iterations, time.perf_counter() - started


def _failure(error: Exception) -> str:
    """One line for a result row: an unsupported kernel (say BF16 3D convolutions) fails that row only."""
    return "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else f"{type(error).__name__}: {error}".splitlines()[0][:300]


def _limit_reason(limit_s: float) -> str:
    return f"not measured: the section's {limit_s:.0f} s were spent"


def classifier_section(classifier: ResNet34Classifier, plan: Plan, tflop: float, limit_s: float = SECTION_LIMIT_S["classifier"]) -> dict:
    ends, rows = time.monotonic() + limit_s, []
    for precision in plan.precisions:
        if time.monotonic() > ends:
            rows += [{"precision": precision, "batch": b, "layout": "channels_last", "error": _limit_reason(limit_s)} for b in plan.batches]
            continue
        try:
            engine = TorchClassifier(copy.deepcopy(classifier), device=plan.device, precision=precision)
        except RuntimeError as error:
            failure = _failure(error)
            rows += [{"precision": precision, "batch": batch, "layout": "channels_last", "error": failure} for batch in plan.batches]
            continue
        for batch in plan.batches:
            row = {"precision": precision, "batch": batch, "layout": "channels_last"}
            if time.monotonic() > ends:
                rows.append({**row, "error": _limit_reason(limit_s)})
                continue
            try:
                if plan.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                iterations, seconds = _timed(engine, _volumes(batch, plan.size, plan.device), plan.seconds, plan.device)
                per_s = iterations * batch / seconds
                row.update(
                    studies_per_s=round(per_s, 2),
                    latency_ms=round(1000 * seconds / iterations, 2),
                    tflop_per_s=_rounded(per_s * tflop),
                    iterations=iterations,
                )
                if plan.device == "cuda":
                    row["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            except RuntimeError as error:  # OutOfMemoryError included
                row["error"] = _failure(error)
            rows.append(row)
            _release(plan.device)
        del engine
        _release(plan.device)
    measured = [row for row in rows if "studies_per_s" in row]
    if not measured:
        return {"rows": rows, "best": None, "channels_last_speedup": None}
    half = [row for row in measured if row["precision"] == "fp16"] or measured
    best = max(half, key=lambda row: row["studies_per_s"])
    # the layout's effect, at the best batch of the default precision
    contiguous = {"precision": best["precision"], "batch": best["batch"], "layout": "contiguous"}
    try:
        if time.monotonic() > ends:
            contiguous["error"] = _limit_reason(limit_s)
        else:
            engine = TorchClassifier(copy.deepcopy(classifier), device=plan.device, precision=best["precision"], channels_last=False)
            iterations, seconds = _timed(engine, _volumes(best["batch"], plan.size, plan.device), plan.seconds, plan.device)
            del engine
            per_s = iterations * best["batch"] / seconds
            latency_ms = round(1000 * seconds / iterations, 2)
            contiguous.update(studies_per_s=round(per_s, 2), latency_ms=latency_ms, tflop_per_s=_rounded(per_s * tflop))
    except RuntimeError as error:
        contiguous["error"] = _failure(error)
    _release(plan.device)
    speedup = round(best["studies_per_s"] / contiguous["studies_per_s"], 3) if "studies_per_s" in contiguous else None
    return {"rows": [*rows, contiguous], "best": best, "channels_last_speedup": speedup}


def _rounded(value: float) -> float:
    return float(f"{value:.3g}")


def _release(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _fits(engine: TorchClassifier, batch: int, size: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        engine(_volumes(batch, size, "cuda"))
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return {"batch": batch, "fits": False}
    except RuntimeError as error:  # counted as not fitting, with what went wrong
        return {"batch": batch, "fits": False, "error": _failure(error)}
    finally:
        torch.cuda.empty_cache()
    return {
        "batch": batch,
        "fits": True,
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
        "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20),
    }


def memory_section(classifier: ResNet34Classifier, plan: Plan, limit_s: float = SECTION_LIMIT_S["memory"]) -> dict:
    if plan.device != "cuda":
        return {"not_measured": "needs a CUDA device"}
    ends = time.monotonic() + limit_s
    engine = TorchClassifier(copy.deepcopy(classifier), device="cuda", precision="fp32")
    engine(_volumes(1, 16, "cuda"))  # creates the cuDNN and cuBLAS handles: part of the context
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    context = (total - free) - torch.cuda.memory_reserved()  # what the allocator does not see
    cap = CARD_BYTES - context
    del engine
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    per_precision = {}
    try:
        for precision in plan.precisions:
            if time.monotonic() > ends:
                per_precision[precision] = {"error": _limit_reason(limit_s)}
                continue
            try:
                engine = TorchClassifier(copy.deepcopy(classifier), device="cuda", precision=precision)
            except RuntimeError as error:
                per_precision[precision] = {"error": _failure(error)}
                continue
            weights_mib = round(torch.cuda.memory_allocated() / 2**20)
            rows = []
            for batch in plan.batches:  # up to the first that does not fit: a larger one would not either
                if time.monotonic() > ends or (rows and not rows[-1]["fits"]):
                    break
                rows.append(_fits(engine, batch, plan.size))
            fitting = [row["batch"] for row in rows if row["fits"]]
            failing = [row["batch"] for row in rows if not row["fits"]]
            low, high = (max(fitting) if fitting else 0), (min(failing) if failing else None)
            while high is not None and high - low > 1 and time.monotonic() <= ends:  # the largest batch that fits, by bisection
                middle = (low + high) // 2
                row = _fits(engine, middle, plan.size)
                rows.append(row)
                low, high = (middle, high) if row["fits"] else (low, middle)
            per_precision[precision] = {
                "weights_mib": weights_mib,
                "rows": sorted(rows, key=lambda row: row["batch"]),
                "largest_batch": low,
                "largest_batch_bounded_by_measurement": high is None,  # every batch tried fitted
                # False: the section's time ran out before the search ended (largest_batch is then a lower bound)
                "complete": (high - low <= 1) if high is not None else len(rows) == len(plan.batches),
            }
            del engine
            torch.cuda.empty_cache()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return {"card_gib": CARD_BYTES / GIB, "context_mib": round(context / 2**20), "cap_mib": round(cap / 2**20), "precisions": per_precision}


def parity_section(classifier: ResNet34Classifier, plan: Plan) -> dict:
    result = {}
    threshold = OPERATING_POINT.threshold
    for precision in [p for p in plan.precisions if p != "fp32"] or ["fp32"]:
        try:
            report = check_torch_parity(classifier, device=plan.device, precision=precision, size=min(plan.size, 64), threshold=threshold)
        except RuntimeError as error:
            result[f"parity_set_{precision}"] = {"error": _failure(error)}
            continue
        result[f"parity_set_{precision}"] = {**report.to_dict(), "summary": report.summary()}
    if plan.device == "cuda":  # at S itself, on chest-like and random volumes: FP16 against FP32 on the GPU
        names, volumes = parity_inputs(plan.size)
        fp32 = TorchClassifier(copy.deepcopy(classifier), device="cuda", precision="fp32")
        reference = torch.cat([fp32(torch.from_numpy(volumes[i : i + 1])) for i in range(len(names))]).cpu()
        del fp32
        half = TorchClassifier(copy.deepcopy(classifier), device="cuda", precision="fp16")
        probabilities = torch.cat([half(torch.from_numpy(volumes[i : i + 1])) for i in range(len(names))]).cpu()
        del half
        difference = (probabilities - reference).abs().max().item()
        flips = [n for n, a, b in zip(names, probabilities[:, 1], reference[:, 1]) if (a >= threshold) != (b >= threshold)]
        result[f"fp16_vs_fp32_at_{plan.size}"] = {
            "max_abs_diff": difference,
            "decisions_differ_on": flips,
            "passed": difference <= FP16_BOUND and not flips,
        }
        _release("cuda")
    return result


def preprocessing_section(plan: Plan) -> dict:
    from benchmarks.preprocessing import device_report

    slices, rows, columns = plan.study_shape
    return device_report(plan.device, slices=slices, rows=rows, columns=columns, size=plan.size)


def explain_section(plan: Plan) -> dict:
    """benchmarks.explain for Grad-CAM at S on the plan's device (CPU: a fresh process per measurement),
    with cuDNN as ct_explain serves it: IEEE FP32 (benchmarks.explain turns TF32 off) and no autotuning,
    which the classifier sections turned on in this process."""
    from benchmarks.explain import run as measure_explanations

    autotuning = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        result = measure_explanations([plan.size], ["gradcam"], device=plan.device, repeat=5 if plan.device == "cuda" else 2)
    finally:
        torch.backends.cudnn.benchmark = autotuning
    if plan.device != "cuda":
        result["fits_8gb"] = "not measured: needs a CUDA device"
    return result


def served_repository(out: Path, size: int, device: str, preprocess_instances: int = 2) -> Path:
    """A rendered copy for the torch-gpu target with preprocessing and explanations on `device`: on a
    GPU they and the classifier run there (the volume stays on it); on a CPU the classifier runs on a
    KIND_CPU instance at FP32."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from export import parse_config, write_repository
    from settings import NAMES

    options = {"size": size, "preprocess_instances": preprocess_instances, "preprocess_device": device, "explain_device": device}
    write_repository(out, target="torch-gpu", demo_weights=True, **options)
    if device != "cuda":  # no GPU: the classifier on a CPU instance, at FP32
        path = out / NAMES.classifier / "config.pbtxt"
        config = parse_config(path.read_text(), str(path))
        config.instance_group[0].kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        config.parameters["precision"].string_value = "fp32"
        path.write_text(text_format.MessageToString(config))
    return out


def served_section(plan: Plan, log_file: Path, ends: float, progress) -> dict:
    """Studies through ct_triage on the bundled server, closed loop (benchmarks.load), per concurrency level,
    every step ending by `ends` (time.monotonic); `progress` is given the results so far after each step.
    The server's log is kept at `log_file`, beside the results: on a lent GPU it is the only trace."""
    from serve import ServerError
    from serve.launcher import find_installation

    try:
        find_installation()
    except ServerError as error:
        return {"not_measured": f"no bundled tritonserver here ({error}); gpu_carry.sh carries one, and says in the log why it cannot run"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:  # the rendered repository: 0.7 GB of weights
        repository = served_repository(Path(work) / "repository", plan.size, plan.device, SERVED_PREPROCESS_INSTANCES[plan.device])
        return _served(plan, repository, log_file, ends, progress)


def served_pool_bytes(plan: Plan) -> int | None:
    """The CUDA pool of the served section (serve.sizing): no more studies than twice the highest
    concurrency are in the server at once, each with at most one volume: a closed loop keeps one per
    worker in flight, and a study its client gave up on may still hold one."""
    from serve import sizing
    from settings import SERVING

    if plan.device != "cuda":
        return None
    deployment = sizing.Deployment(
        size=plan.size,
        preprocess_instances=SERVED_PREPROCESS_INSTANCES["cuda"],
        max_batch_size=SERVING.max_batch_size,
        preprocess_on_gpu=True,
    )
    return sizing.cuda_pool_bytes(deployment, in_flight=2 * max(plan.served_levels))


def _served(plan: Plan, repository: Path, log_file: Path, ends: float, progress) -> dict:
    """The served measurements on a rendered repository."""
    from benchmarks.load import closed_loop, study_timeout, triton_sender
    from preprocess import phantom
    from serve import start_on_free_ports
    from settings import SERVING

    slices, rows, columns = plan.served_shape
    payload = phantom.study_files("series", slices=slices, rows=rows, columns=columns, pixel_spacing=0.7, slice_spacing=1.0)
    pool = served_pool_bytes(plan)
    # studies through system shared memory where /dev/shm holds one region per worker (client and
    # server share this host; a 157 MB study costs seconds of serialisation on the wire)
    shm_free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    shared_memory = shm_free > 2 * max(plan.served_levels) * sum(map(len, payload))
    result = {
        "study": {"slices": slices, "rows": rows, "columns": columns, "megabytes": round(sum(map(len, payload)) / 1e6, 1)},
        "preprocess_instances": SERVED_PREPROCESS_INSTANCES[plan.device],
        "transport": "system shared memory" if shared_memory else "HTTP wire",
        "cuda_memory_pool_bytes": pool,
        "warm_up": {"not_measured": NO_TIME},
        "levels": [],
        "levels_skipped_for_time": [],
        "explained": {"not_measured": NO_TIME},
        "batching_wait": {"not_measured": NO_TIME},
    }
    gpu_memory = ServedGpuMemory(plan.device)  # what the card holds before the server starts

    def step_done() -> None:
        result["gpu_memory"] = gpu_memory.to_dict()
        progress(result)

    # the section starts with its reserve left, which holds this start, the rendering and SERVED_AFTER_START_S
    startup_s = min(SERVING.startup_timeout_s, ends - time.monotonic() - SERVED_AFTER_START_S)
    server = start_on_free_ports(repository, log_file=log_file, exit_timeout_s=5, startup_timeout_s=startup_s, cuda_memory_pool_bytes=pool)
    gpu_memory.watch(server)
    try:
        # untimed: every ct_preprocess instance's first studies at the study's size, the classifier's
        # batches. Its slowest study, scaled to a level (a study waits for those ahead of it at the
        # instances), is what a study of that level takes, about; a level whose timeouts, which end it
        # by `ends` even if every study times out, are not twice that is not started.
        most, instances = max(plan.served_levels), SERVED_PREPROCESS_INSTANCES[plan.device]
        sender = triton_sender(server.http_url, payload, timeout_s=(ends - time.monotonic()) / 2, shared_memory=shared_memory)
        try:
            warm_s = warm_up(sender, most)
            result["warm_up"] = {"concurrency": most, "slowest_s": round(warm_s, 3)}
        except Exception as error:  # the levels still run, and their failures say more
            warm_s, result["warm_up"] = 0.0, {"error": f"{type(error).__name__}: {error}"}
        step_done()
        for level in plan.served_levels:
            count = max(plan.served_requests, 2 * level)
            timeout = study_timeout(ends, level, count)
            if timeout < 2 * warm_s * max(level, instances) / most:
                result["levels_skipped_for_time"].append(level)
                continue
            sender = triton_sender(server.http_url, payload, timeout_s=timeout, shared_memory=shared_memory)
            result["levels"].append(closed_loop("triton", sender, level, count).to_dict())
            step_done()
        if ends - time.monotonic() >= EXPLAINED_S:
            try:
                result["explained"] = explained_study(server.http_url, payload, shared_memory, (ends - time.monotonic()) / 2)
            except Exception as error:  # recorded; the levels above still stand
                result["explained"] = {"error": f"{type(error).__name__}: {error}"}
            step_done()
        if ends - time.monotonic() >= BATCHING_WAIT_S:
            gpu_memory.stop()  # a reload holds two classifiers for a moment: not what the stack needs
            try:
                result["batching_wait"] = batching_waits(server, payload, plan, shared_memory, ends)
            except Exception as error:  # recorded; the levels above still stand
                result["batching_wait"] = {"error": f"{type(error).__name__}: {error}"}
            step_done()
    finally:
        gpu_memory.stop()
        server.stop()
    result["gpu_memory"] = gpu_memory.to_dict()
    return result


def warm_up(make_sender, concurrency: int) -> float:
    """One study from each of `concurrency` clients at once; the slowest one's seconds. A failure is raised."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_) -> float:
        send = make_sender()  # in its thread: tritonclient's HTTP client belongs to the thread that made it
        started = time.perf_counter()
        send()
        return time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        return max(pool.map(one, range(concurrency)))


def batching_waits(server, payload: list[bytes], plan: Plan, shared_memory: bool, ends: float) -> dict:
    """The classifier's configured batching wait against none (benchmarks.batching_wait: ct_classifier
    reloaded to each, the order reversed every other round, a round only while the time before `ends`
    holds one) at the middle concurrency level: what the GPU targets' wait should be."""
    from benchmarks.batching_wait import measure, served_wait

    configured = served_wait(server.http_url)
    level = plan.served_levels[len(plan.served_levels) // 2]
    waits = [configured, 0] if configured else [0]
    rounds, count = plan.served_wait_rounds, plan.served_requests
    results = measure(server, payload, waits=waits, levels=[level], requests=count, rounds=rounds, shared_memory=shared_memory, ends=ends)
    measured = 1 + max(r["round"] for r in results["rounds"])  # rounds that fitted in the time left
    return {"concurrency": level, "rounds": measured, "summary": results["summary"]}


def parse_smi(text: str) -> list[list[int]]:
    """The rows of nvidia-smi's `--format=csv,noheader,nounits` as integers; rows with a value the
    driver does not report ("[N/A]", "[Not Supported]") are left out."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if line.strip() and all(cell.isdigit() for cell in cells):
            rows.append([int(cell) for cell in cells])
    return rows


def _smi(query: str) -> list[list[int]]:
    done = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10, check=True)
    return parse_smi(done.stdout)


class ServedGpuMemory:
    """The GPU memory the server holds under load, as the driver reports it (nvidia-smi: CUDA contexts
    and every caching allocator's reserve included), sampled twice a second from a thread: the peak of
    the whole card and, where the driver lists them, of each of the server's processes. An upper bound
    of what the served stack needs (allocators keep what they once used, the CUDA pool is held whole), so
    within CARD_BYTES means it fits an 8 GB card; above, it is not shown not to."""

    def __init__(self, device: str):
        self.enabled = device == "cuda" and shutil.which("nvidia-smi") is not None
        self.peak: tuple[int, dict[str, int]] | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.before_mib = None
        if self.enabled:
            try:
                self.before_mib = self._card_mib()
            except Exception as error:  # no sampling then; the served section still runs
                self.enabled, self.error = False, f"{type(error).__name__}: {error}"

    @staticmethod
    def _card_mib() -> int:
        return _smi("--query-gpu=memory.used")[0][0]  # the first GPU: the one the server uses

    def watch(self, server) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._sample, args=(server,), daemon=True)
            self._thread.start()

    def _sample(self, server) -> None:
        try:
            while not self._done.wait(0.5):
                used = self._card_mib()
                if self.peak is None or used > self.peak[0]:
                    names = {server.pid: "tritonserver", **{stub.pid: stub.instance for stub in server.stubs()}}
                    held = {names[pid]: mib for pid, mib in _smi("--query-compute-apps=pid,used_memory") if pid in names}
                    self.peak = (used, held)
        except Exception as error:  # a sampling failure is a result, not the section's failure
            self.error = f"{type(error).__name__}: {error}"

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def to_dict(self) -> dict:
        if not self.enabled:
            return {"not_measured": self.error or "needs a CUDA device and nvidia-smi"}
        if self.peak is None:
            return {"not_measured": self.error or "no sample taken"}
        used, held = self.peak
        return {
            "card_before_server_mib": self.before_mib,
            "card_peak_mib": used,
            "server_peak_mib": used - self.before_mib,
            "server_within_card": used - self.before_mib <= CARD_BYTES / 2**20,
            "per_process_mib": held,
            "sampling_error": self.error,
        }


def explained_study(url: str, payload: list[bytes], shared_memory: bool, timeout_s: float) -> dict:
    """One study through ct_triage_explain (ct_explain and ct_localize on the same device), twice, each
    call bounded by `timeout_s`: that the explanation ensemble serves there, and what it costs beside ct_triage."""
    from client import RetryPolicy, TriageClient

    client = TriageClient(url, "http", explain=True, timeout_s=timeout_s, retry=RetryPolicy(attempts=1), shared_memory=shared_memory)
    seconds = []
    for _ in range(2):  # the first call includes ct_explain's warm-up
        result = client.classify(payload)
        if not result.ok:
            raise RuntimeError(f"ct_triage_explain: {result.error}")
        seconds.append(result.time_of_processing)
    return {"seconds_first": round(seconds[0], 3), "seconds": round(seconds[1], 3), "localization": result.pathology_localization}


def targets(results: dict, plan: Plan) -> dict:
    """Each target of the GPU issue, always listed: met / not met with the number, or not measured
    (met None) with the reason. A served level with a failed study counts for no target."""
    at_size = None if plan.size == 256 else f"the targets are for S=256; this run is S={plan.size}"

    def target(section: str, measured) -> dict:
        entry = results.get(section)
        reason = at_size or ("section not run" if not entry else _reason(entry))
        if reason is None:
            found = measured(entry)
            if isinstance(found, dict):
                return found
            reason = found
        return {"value": f"not measured: {reason}", "met": None}

    def classifier(entry: dict):
        rows = entry.get("rows", [])
        half = [r for r in rows if r["precision"] == "fp16" and r.get("layout") == "channels_last" and "studies_per_s" in r]
        if not half:
            return "no FP16 channels-last row measured"
        best = max(row["studies_per_s"] for row in half)
        return {"value": best, "met": best >= TARGETS["fp16_studies_per_s"]}

    def memory(entry: dict):
        fp16 = entry.get("precisions", {}).get("fp16", {})
        if "largest_batch" not in fp16:
            return _reason(fp16) or "FP16 not measured"
        return {"value": fp16["largest_batch"], "met": fp16["largest_batch"] >= TARGETS["fp16_batch_in_8gb"]}

    def preprocessing(entry: dict):
        if "device_ms" not in entry:
            return "no device time measured"
        if tuple(entry["shape"]) != (300, 512, 512):
            return f"the study is {' x '.join(map(str, entry['shape']))}, not 300 x 512 x 512"
        value, upload, parity = entry["device_ms"]["median"], entry["upload_ms"]["median"], entry["max_abs_diff_vs_fast"]
        return {
            "value": f"{value} ms on the device (upload beside it: {upload} ms), max abs diff {parity:.1e}",
            "met": value <= TARGETS["preprocess_ms"] and parity <= TARGETS["parity_max_abs"],
        }

    def gradcam(entry: dict):
        rows = [row for row in entry.get("rows", []) if row["method"] == "gradcam" and "fits_8gb" in row]
        if not rows:
            return "no Grad-CAM row with its memory measured"
        row = rows[0]
        value = f"{'fits' if row['fits_8gb'] else 'does not fit'}; context + peak reserved {row['context_plus_peak_reserved_mib']} MiB"
        return {"value": value, "met": row["fits_8gb"]}

    def served(entry: dict):
        levels = entry.get("levels", [])
        answered = [level for level in levels if level["failures"] == 0]
        failed = [f"concurrency {lv['concurrency']}: {lv['failures']} of {lv['requests']} failed" for lv in levels if lv["failures"]]
        if not levels:
            return _reason(entry.get("warm_up", {})) or "no level measured"
        if not answered:
            return {"value": f"every level had failed studies ({'; '.join(failed)})", "met": False}
        best = max(level["studies_per_s"] for level in answered)
        value = f"{best}" + (f" (levels with failed studies left out: {'; '.join(failed)})" if failed else "")
        return {"value": value, "met": best >= TARGETS["served_studies_per_s"]}

    return {
        "classifier FP16 >= 40 studies/s": target("classifier", classifier),
        "FP16 batch >= 4 in 8 GB": target("memory", memory),
        "GPU preprocessing <= 20 ms, parity <= 1e-4": target("preprocessing", preprocessing),
        "Grad-CAM at S=256 (FP32) on an 8 GB card": target("explain", gradcam),
        "served >= 20 studies/s": target("served", served),
    }


def _passed(comparison: dict) -> bool:
    return comparison["max_abs_diff"] <= comparison["bound"] and comparison["decisions_agree"]


def _reason(entry: dict):
    """Why a result holds no measurement: its error, or why it was not measured."""
    return entry.get("error") or entry.get("not_measured")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# GPU check: {env['gpu']}, S={env['size']}",
        "",
        f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), numpy {env['numpy']}, Python {env['python']}, "
        f"{env['cpu_cores']} CPU cores. One forward pass at S={env['size']}: {env['study_tflop']} TFLOP. "
        f"Command: `{results['command']}`; {results['seconds']:.0f} s.",
        "",
    ]
    if results.get("targets"):
        lines += ["## Targets", ""]
        lines += _table(
            ["target", "measured", "met"],
            [[k, v["value"], {True: "met", False: "NOT met", None: "not measured"}[v["met"]]] for k, v in results["targets"].items()],
        )
        lines.append("")
    classifier = results.get("classifier")
    if classifier and "rows" in classifier:
        lines += ["## Classifier (classifier.TorchClassifier, the torch-gpu target's engine)", ""]
        rows = [
            [
                r["precision"],
                r["layout"],
                r["batch"],
                r.get("studies_per_s", r.get("error")),
                r.get("latency_ms", ""),
                r.get("tflop_per_s", ""),
            ]
            + ([r.get("peak_allocated_mib", "")] if env["device"] == "cuda" else [])
            for r in classifier["rows"]
        ]
        header = ["precision", "layout", "batch", "studies/s", "latency per batch (ms)", "TFLOP/s"]
        lines += _table(header + (["peak allocated (MiB)"] if env["device"] == "cuda" else []), rows)
        speedup = classifier["channels_last_speedup"]
        lines += ["", f"Channels-last vs contiguous at the best batch: {f'{speedup}x' if speedup else 'not measured (its row)'}.", ""]
    memory = results.get("memory")
    if memory and "precisions" in memory:
        lines += [
            "## Memory under an 8 GB cap",
            "",
            f"Allocator capped at {memory['cap_mib']} MiB = the {memory['card_gib'] * 1024:.0f} MiB an 8 GB card gives CUDA "
            f"(serve.sizing.CARD_BYTES) minus the {memory['context_mib']} MiB CUDA context of this process.",
            "",
        ]
        rows = []
        for precision, entry in memory["precisions"].items():
            if "error" in entry:
                rows.append([precision, "", entry["error"], "", ""])
            for row in entry.get("rows", []):
                rows.append(
                    [
                        precision,
                        row["batch"],
                        "yes" if row["fits"] else f"no ({row['error']})" if "error" in row else "no",
                        row.get("peak_allocated_mib", ""),
                        row.get("peak_reserved_mib", ""),
                    ]
                )
        lines += _table(["precision", "batch", "fits", "peak allocated (MiB)", "peak reserved (MiB)"], rows)
        largest = ", ".join(
            f"{p} {e['largest_batch']}{'' if e['complete'] else ' or more (the search stopped for time)'}"
            for p, e in memory["precisions"].items()
            if "largest_batch" in e
        )
        lines += ["", f"Largest batch that fits: {largest}.", ""]
    elif memory:
        lines += ["## Memory under an 8 GB cap", "", f"Not measured: {_reason(memory)}.", ""]
    parity = results.get("parity", {})
    if parity and _reason(parity) is None:  # a section not run or failed says so at the end
        lines += ["## Parity (probabilities; decisions at 0.5)", ""]
        rows = []
        for check, report in parity.items():
            for name, comparison in report.get("comparisons", {}).items():
                rows.append([check, name, f"{comparison['max_abs_diff']:.2e}", comparison["decisions_agree"], _passed(comparison)])
            if "decisions_differ_on" in report:
                rows.append(
                    [check, "fp16 vs fp32 on the GPU", f"{report['max_abs_diff']:.2e}", not report["decisions_differ_on"], report["passed"]]
                )
            if "error" in report or "not_measured" in report:
                rows.append([check, _reason(report), "", "", ""])
        lines += [*_table(["check", "comparison", "max abs diff", "decisions agree", "passed"], rows), ""]
    preprocessing = results.get("preprocessing", {})
    if "device_ms" in preprocessing:
        shape = " x ".join(map(str, preprocessing["shape"]))
        lines += [f"## Preprocessing a {shape} study to {preprocessing['size']}^3 ({preprocessing['device_name']})", ""]
        lines += [
            *_table(
                ["upload ms (median / min)", "on the device ms (median / min)", "CPU fast path s (median)", "max abs diff vs CPU"],
                [
                    [
                        f"{preprocessing['upload_ms']['median']} / {preprocessing['upload_ms']['min']}",
                        f"{preprocessing['device_ms']['median']} / {preprocessing['device_ms']['min']}",
                        preprocessing["fast_s"]["median"],
                        f"{preprocessing['max_abs_diff_vs_fast']:.1e}",
                    ]
                ],
            ),
            "",
        ]
    explanation = results.get("explain", {})
    if explanation.get("rows"):
        from benchmarks.explain import table

        lines += [f"## Explanation (explain.Explainer, Grad-CAM, FP32, S={env['size']}, beside one inference)", ""]
        lines += [*table(explanation), ""]
        if env["device"] == "cuda":
            caps = ", ".join(f"{row['method']} {row['cap_mib']} MiB" for row in explanation["rows"] if "cap_mib" in row)
            lines += [
                "Peak memory of one call (counters reset before it); fits 8 GB: the call ran again with the caching allocator "
                f"capped at the card's memory minus this process's CUDA context ({caps}).",
                "",
            ]
    served = results.get("served", {})
    if "study" in served:
        study = served["study"]
        pool = served["cuda_memory_pool_bytes"]
        lines += [
            f"## Served ensemble (ct_triage, bundled tritonserver, {study['slices']} x {study['rows']} x {study['columns']} study, "
            f"{study['megabytes']} MB, {served['preprocess_instances']} ct_preprocess instances, {served['transport']}"
            + (f", CUDA pool {pool / 2**20:.0f} MiB)" if pool else ")"),
            "",
        ]
        warm = served["warm_up"]
        if "slowest_s" in warm:
            lines += [f"Untimed first: one study from each of {warm['concurrency']} clients at once (slowest {warm['slowest_s']} s).", ""]
        else:
            lines += [f"Warm-up round: {_reason(warm)}", ""]
        rows = [
            [lv["concurrency"], lv["requests"], lv["failures"], lv["studies_per_s"], lv["p50_s"], lv["p95_s"]] for lv in served["levels"]
        ]
        rows += [[level, "", "", NO_TIME, "", ""] for level in served["levels_skipped_for_time"]]
        lines += [*_table(["concurrency", "requests", "failures", "studies/s", "p50 s", "p95 s"], rows), ""]
        explained = served.get("explained", {})
        if "seconds" in explained:
            box = explained["localization"] or "none (nothing attributed)"
            lines += [
                f"The same study through ct_triage_explain (Grad-CAM on the served device), one at a time: {explained['seconds']} s "
                f"({explained['seconds_first']} s the first time); localization {box}.",
                "",
            ]
        elif explained:
            lines += [f"ct_triage_explain: {_reason(explained)}", ""]
        waits = served.get("batching_wait", {})
        if "summary" in waits:
            measured = "; ".join(
                f"{row['wait_us'] / 1000:g} ms: {row['studies_per_s']} studies/s, p50 {row['p50_s']} s, p95 {row['p95_s']} s"
                + (f", {row['failures']} failed" if row["failures"] else "")
                for row in waits["summary"]
            )
            lines += [
                f"The classifier's batching wait at concurrency {waits['concurrency']} (ct_classifier reloaded to each wait, "
                f"medians of {waits['rounds']} round(s), the order reversed every other round): {measured}.",
                "",
            ]
        elif waits:
            lines += [f"Batching wait: {_reason(waits)}", ""]
        memory = served.get("gpu_memory", {})
        if "server_peak_mib" in memory:
            processes = ", ".join(f"{name} {mib}" for name, mib in sorted(memory["per_process_mib"].items())) or "none listed by the driver"
            lines += [
                f"GPU memory the server held at the peak of the load (nvidia-smi: CUDA contexts, allocator caches and the "
                f"CUDA pool, an upper bound of its need): {memory['server_peak_mib']} MiB above the "
                f"{memory['card_before_server_mib']} MiB in use before it started ({'within' if memory['server_within_card'] else 'above'} "
                f"the {CARD_BYTES / 2**20:.0f} MiB of an 8 GB card); per process (MiB): {processes}.",
                "",
            ]
        elif memory:
            lines += [f"Served GPU memory: {_reason(memory)}.", ""]
    for name in ("classifier", "memory", "parity", "preprocessing", "explain", "served"):
        entry = results.get(name, {})
        reason = _reason(entry)
        if isinstance(reason, str):  # explain's not_measured is its list of (method, S) left out, shown in its table
            lines += [f"{name}: {reason}", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in results.get("classifier", {}).get("rows", []) if r.get("layout") == "channels_last" and "studies_per_s" in r]
    for precision in sorted({r["precision"] for r in rows}):
        mine = [r for r in rows if r["precision"] == precision]
        speed.plot([r["batch"] for r in mine], [r["studies_per_s"] for r in mine], marker="o", label=precision)
    speed.set(title="Classifier throughput", xlabel="batch size", ylabel="studies per second", xscale="log", xticks=[])
    for precision, entry in results.get("memory", {}).get("precisions", {}).items():
        fitting = [r for r in entry.get("rows", []) if r["fits"]]
        memory.plot([r["batch"] for r in fitting], [r["peak_allocated_mib"] / 1024 for r in fitting], marker="o", label=precision)
    if results.get("memory", {}).get("cap_mib"):
        memory.axhline(results["memory"]["cap_mib"] / 1024, color="crimson", linestyle="--", label="8 GB card (allocator cap)")
    memory.set(title="Peak GPU memory", xlabel="batch size", ylabel="GiB")
    for axis in (speed, memory):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # the memory panel is empty without CUDA
            axis.legend(fontsize=8)
    figure.suptitle(f"{results['environment']['gpu']}, S={results['environment']['size']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def reserved_after(section: str) -> float:
    """The reserves of the sections after `section`: the time it must leave them."""
    return sum(SECTION_RESERVE_S.get(later, 0.0) for later in SECTIONS[SECTIONS.index(section) + 1 :])


def not_started(section: str, spent: float, budget_s: float) -> str | None:
    """Why `section` does not start with `spent` seconds of the run's budget gone; None: it starts. One
    that cannot stop midway needs its reserve and those of the sections after it; a looping one starts
    while the budget lasts, its share cut to what the sections after it leave."""
    reserve = SECTION_RESERVE_S.get(section, 0.0)
    needs = reserve + reserved_after(section) if reserve else 0.0
    if spent <= budget_s - needs:
        return None
    return f"time budget of {budget_s:.0f} s: {spent:.0f} s spent" + (f", {section} needs about {needs:.0f} s" if needs else "")


def run_started() -> float:
    """When gpu_check.sh started, on time.monotonic(): from its GPU_CHECK_STARTED (epoch seconds), so
    that the install of the carried packages and the imports count against the budget; now when unset."""
    value = os.environ.get(STARTED_ENV)
    return time.monotonic() - (time.time() - float(value)) if value else time.monotonic()


def run(plan: Plan, out: Path, command: str, started: float | None = None) -> dict:
    """Every section in turn within the plan's budget from `started` (time.monotonic(); now when None),
    the results written after each section and each served step."""
    started = time.monotonic() if started is None else started
    deadline = started + plan.budget_s
    results: dict = {"command": command, "plan": asdict(plan), "seconds_before_run": round(time.monotonic() - started, 1)}
    results["environment"] = environment(plan)
    name = re.sub(r"[^a-z0-9]+", "-", results["environment"]["gpu"].split(" (")[0].lower()).strip("-")
    stem = f"gpu-{name}-s{plan.size}" if plan.device == "cuda" else f"smoke-cpu-s{plan.size}"
    classifier = build_classifier(demo_weights())
    tflop = results["environment"]["study_tflop"]

    def share(section: str, ends: float) -> float:
        return max(min(SECTION_LIMIT_S[section], ends - time.monotonic()), 0.0)

    def served_progress(partial: dict) -> None:
        results["served"] = partial
        _write(results, out, stem, started)

    measures = {
        "classifier": lambda ends: classifier_section(classifier, plan, tflop, limit_s=share("classifier", ends)),
        "memory": lambda ends: memory_section(classifier, plan, limit_s=share("memory", ends)),
        "parity": lambda ends: parity_section(classifier, plan),
        "preprocessing": lambda ends: preprocessing_section(plan),
        "served": lambda ends: served_section(plan, out / f"{stem}-tritonserver.log", ends, served_progress),
        "explain": lambda ends: explain_section(plan),
    }
    for section in SECTIONS:
        spent = time.monotonic() - started
        if reason := not_started(section, spent, plan.budget_s):
            results[section] = {"not_measured": f"{NO_TIME} ({reason})"}
            continue
        print(f"gpu_check: {section} ({spent:.0f} s so far)", file=sys.stderr, flush=True)
        section_started = time.monotonic()
        try:
            results[section] = measures[section](deadline - reserved_after(section))
        except Exception as error:  # one section's failure is a result too; the others still run
            results[section] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}
        results[section + "_seconds"] = round(time.monotonic() - section_started, 1)
        _write(results, out, stem, started)
    results["targets"] = targets(results, plan)
    _write(results, out, stem, started)
    plot(results, out / f"{stem}.png")
    return results


def _write(results: dict, out: Path, stem: str, started: float) -> None:
    results["seconds"] = round(time.monotonic() - started, 1)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for gpu-<card>-s<S>.json, .md and .png (smoke-cpu-s<S>.* with --smoke) and the server log",
    )
    parser.add_argument("--smoke", action="store_true", help="on the CPU at a tiny S: the same code, for tests")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --smoke")
    out = Path(args.out)
    try:  # not benchmarks.option_types.out_folder: it imports the client, which the GPU machine has only if carried
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {out}: {error.strerror or error}")
    plan = Plan.smoke() if args.smoke else Plan.gpu()
    results = run(plan, out, "bash benchmarks/gpu_check.sh" + (" --smoke" if args.smoke else ""), run_started())
    failed = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
    if "error" in results.get("served", {}).get("explained", {}):
        failed.append("served (ct_triage_explain)")
    print(json.dumps({"out": str(out), "targets": results["targets"], "failed_sections": failed, "seconds": results["seconds"]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
