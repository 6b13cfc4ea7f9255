"""Serving benchmarks on one machine, in one run: the Triton ensemble against the obvious baseline.

    python -m benchmarks.serving --size 64 --out benchmarks/results [--levels 1 2 4] [--requests 8]
                                 [--slices 120 --matrix 256] [--s256 | --no-s256]

1. Renders the repository at S (demo weights, CPU target) and starts the bundled tritonserver.
2. perf_analyzer (Triton's load generator) sweeps the concurrency levels on ct_classifier with
   all-zero volumes (batch sizes per level from the server's statistics) and on ct_triage with a
   generated DICOM study: gRPC and HTTP, on the wire and through system shared memory, the sweeps
   taking turns at each level, each measurement after a warm-up run; throughput over the elapsed
   time of its requests. The server-side time per composing model (queue, compute) comes from
   Triton's statistics around each level.
3. The same closed client loop (benchmarks.load) sends the same study to the ensemble (project
   client, HTTP) and to the baseline (benchmarks.baseline: FastAPI, PyTorch FP32 eager, reference
   preprocessing, one study at a time), level by level, interleaved; then one study at a time
   through the ensemble alternating with the same work in process (fast preprocessing + OpenVINO on
   the same served IR): the server's own overhead. Targets count only levels without failures.
4. A bounded locust run (benchmarks/locustfile.py, HTTP and gRPC users 2:1) against the server.
5. Memory: resident memory of the server and of each Python-backend stub at idle and its peak under
   load; the /dev/shm pages of the server's own regions idle, at their peak and after it stopped
   (another job's regions on the machine do not count); the peak memory of a client process sending
   a 300-slice study.
6. With --s256: one study through the ensemble at the trained S=256.

Writes to --out, once everything is measured: <name>.md (the command run, machine, versions, the
server's Triton version, tables, targets met or not), perf_analyzer's CSV per sweep, the load and
breakdown CSVs, a PNG plot and <name>.json (all of it); prints one JSON object as its last line.
<name> is cpu-s<S> (remote-s<S> with --url, which measures a running server instead, S read from its
config: perf_analyzer without shared memory, the client loop and locust only).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import export
import preprocess
from benchmarks import load, option_types
from benchmarks import perf_analyzer as pa
from benchmarks.process_memory import cpu_model, status_mib
from client import TriageClient
from preprocess import phantom
from serve import TritonServer, free_ports, process_tree, start_on_free_ports
from settings import NAMES, PREPROCESSING

MODELS = (NAMES.preprocess, NAMES.classifier, NAMES.postprocess)
TARGETS = {"throughput_ratio_c4": 1.5, "overhead_c1": 0.15}


# -- machine and memory ----------------------------------------------------------------------------
def machine(size: int, http_url: str) -> dict:
    """This machine, the versions of the packages measured, and the Triton version of the server at `http_url`."""
    memory_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    versions = {name: metadata.version(name) for name in ("nvidia-pytriton", "openvino", "torch", "numpy", "tritonclient", "locust")}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "available_cpus": preprocess.available_cpus(),
        "memory_gib": round(memory_kb / 1024**2, 1),
        "gpu": "none",
        "size": size,
        "triton": load.triton_version(http_url),
        "python": platform.python_version(),
        "versions": versions,
    }


def versions_text(machine: dict) -> str:
    """The versions a results file names: Python, the server's Triton, the packages measured."""
    return f"Python {machine['python']}; Triton {machine['triton']}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())


def shm_mib(server: TritonServer) -> float:
    """/dev/shm pages of this server's regions (its launcher's prefix), so that another job's regions
    on the machine neither fail the target nor hide a leak. The client loop and locust send on the
    wire; perf_analyzer's shared-memory sweeps make regions of their own, not counted."""
    return round(server.shm_bytes() / 1024**2, 1)


def _process_name(pid: int) -> str | None:
    """ "tritonserver", or "stub <model>" for a Python-backend stub (its model path is on its command line)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"triton_python_backend_stub" in words[0]:
        model = Path(words[1].decode(errors="replace")).parent.parent.name if len(words) > 1 else "?"
        return f"stub {model}"
    return "tritonserver" if words[0].endswith(b"tritonserver") else None


def rss_by_process(server_pid: int) -> dict[str, float]:
    """Resident MiB of the server and of each stub, summed per name (a model's instances together)."""
    totals: dict[str, float] = {}
    for pid in process_tree(server_pid):
        name = _process_name(pid)
        try:
            if name:
                rss = status_mib("VmRSS", pid)
                totals[name] = totals.get(name, 0.0) + (0.0 if math.isnan(rss) else rss)  # NaN: exited, not yet reaped
        except OSError:
            continue
    return {name: round(value, 1) for name, value in sorted(totals.items())}


class MemoryPeaks:
    """Samples the server's processes and its /dev/shm regions every 0.25 s and keeps each one's peak."""

    def __init__(self, server: TritonServer):
        self.server = server
        self.rss: dict[str, float] = {}
        self.shm_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for name, value in rss_by_process(self.server.pid).items():
                self.rss[name] = max(self.rss.get(name, 0.0), value)
            self.shm_mib = max(self.shm_mib, shm_mib(self.server))

    def __enter__(self) -> MemoryPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def client_peak_mib(url: str, study: Path) -> tuple[float, str]:
    """Peak resident memory of a `python -m client classify` process sending `study`, and its status.

    The peak is the process's own VmHWM, read as it exits (ru_maxrss would count the benchmark's own
    pages, which the child shares between fork and exec)."""
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1], file=sys.stderr))\n"
        f"sys.argv = ['client', 'classify', {str(study)!r}, '--url', {url!r}, '--protocol', 'http']\n"
        "runpy.run_module('client', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    status = json.loads(done.stdout)["processing_status"] if done.stdout.strip() else "no answer"
    return round(int(done.stderr.strip().splitlines()[-1]) / 1024, 1), status


# -- Triton's statistics ---------------------------------------------------------------------------
def statistics_of(http_url: str) -> dict:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=30) as response:
        return {entry["name"]: entry for entry in json.loads(response.read())["model_stats"]}


def breakdown(before: dict, after: dict) -> dict:
    """Per composing model between two snapshots: requests, mean queue and compute ms, and the
    classifier's executions per batch size."""
    result = {}
    for model in MODELS:
        old, new = before[model]["inference_stats"], after[model]["inference_stats"]
        count = int(new["success"]["count"]) - int(old["success"]["count"])
        ms = {
            key: (int(new[key]["ns"]) - int(old[key]["ns"])) / 1e6 / max(count, 1)
            for key in ("queue", "compute_input", "compute_infer", "compute_output")
        }
        result[model] = {"requests": count, **{f"{key}_ms": round(value, 2) for key, value in ms.items()}}
    batches = {}
    for entry in after[NAMES.classifier].get("batch_stats", []):
        size = int(entry["batch_size"])
        earlier = next((e for e in before[NAMES.classifier].get("batch_stats", []) if int(e["batch_size"]) == size), None)
        executions = int(entry["compute_infer"]["count"]) - (int(earlier["compute_infer"]["count"]) if earlier else 0)
        if executions:
            batches[size] = executions
    result[NAMES.classifier]["executions_per_batch_size"] = dict(sorted(batches.items()))
    return result


# -- the services ----------------------------------------------------------------------------------
@contextmanager
def baseline_service(weights: Path, size: int):
    """benchmarks.baseline in its own process (one uvicorn worker), ready when /health answers."""
    port = free_ports(1)[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.baseline", "--weights", str(weights), "--size", str(size), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the baseline service exited: {process.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the baseline service did not start in 120 s") from None
                time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def overhead_c1(server: TritonServer, repository: Path, study: list[bytes], size: int, rounds: int = 8) -> dict:
    """The server's own overhead: one study at a time through ct_triage (the project's client, HTTP,
    as the client loop sends it) and the same work in this process (fast preprocessing + OpenVINO on
    the served IR), alternating, which goes first swapping every round, after a warm-up of each;
    medians over the rounds, and the served studies that failed."""
    from classifier import OpenVINOClassifier

    engine = OpenVINOClassifier(repository / NAMES.classifier / "1" / "model.xml", size=size, threads=preprocess.available_cpus())
    send = load.triton_sender(server.http_url, study)()
    preprocess_s: list[float] = []
    classifier_s: list[float] = []
    served_s: list[float] = []
    failures = 0

    def in_process() -> None:
        started = time.perf_counter()
        volume = preprocess.preprocess_study(study, size=size, mode="fast").volume
        middle = time.perf_counter()
        engine(volume)
        preprocess_s.append(middle - started)
        classifier_s.append(time.perf_counter() - middle)

    def served() -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            send()
        except Exception:  # counted: no target rests on failed studies
            failures += 1
        else:
            served_s.append(time.perf_counter() - started)

    for k in range(rounds + 1):
        for arm in (served, in_process) if k % 2 == 0 else (in_process, served):
            arm()
        if k == 0:  # the warm-ups: not kept
            preprocess_s.clear()
            classifier_s.clear()
            served_s.clear()
            failures = 0
    return {
        "rounds": rounds,
        "preprocess_s": round(statistics.median(preprocess_s), 4),
        "classifier_s": round(statistics.median(classifier_s), 4),
        "total_s": round(statistics.median(p + c for p, c in zip(preprocess_s, classifier_s)), 4),
        "served_s": round(statistics.median(served_s), 4) if served_s else float("nan"),
        "served_failures": failures,
    }


def locust_run(server: TritonServer, users: int, seconds: int, prefix: Path, study: Path) -> dict:
    """A bounded headless locust run (its CSV files at prefix); returns its totals and exit status.
    Studies in flight when the time is up are waited for (up to 60 s), not cut off uncounted."""
    summary = Path(f"{prefix}.json")
    command = [
        str(Path(sys.executable).with_name("locust")), "-f", str(Path(__file__).with_name("locustfile.py")), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "60", "--host", f"http://{server.http_url}",
        "--grpc-url", server.grpc_url, "--study", str(study), "--csv", str(prefix), "--summary-json", str(summary), "--only-summary",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 180)
    if not summary.is_file():
        raise RuntimeError(f"locust wrote no summary (exit {done.returncode}): {done.stderr[-2000:]}")
    return {"exit_code": done.returncode, "users": users, "seconds": seconds, **json.loads(summary.read_text())}


def single_study_s256(work: Path, study: list[bytes]) -> dict:
    """One study through the ensemble at the trained S (settings.PREPROCESSING.size, 256): client round trip and time per model."""
    repository = work / f"repository-{PREPROCESSING.size}"
    export.write_repository(repository, target="cpu", size=PREPROCESSING.size, demo_weights=True)
    with start_on_free_ports(repository, log_file=work / f"tritonserver-{PREPROCESSING.size}.log") as server:
        before = statistics_of(server.http_url)
        with TriageClient(server.http_url, "http", timeout_s=1800) as client:
            result = client.classify(study)
        after = statistics_of(server.http_url)
    return {"status": result.processing_status, "round_trip_s": round(result.time_of_processing, 2), "per_model": breakdown(before, after)}


# -- the run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteServer:
    """A server this benchmark did not start (--url): no export, no baseline, no process memory."""

    http_url: str
    grpc_url: str
    metrics_url: str | None


def served_size(http_url: str) -> int:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{NAMES.classifier}/config", timeout=30) as response:
        return int(json.loads(response.read())["input"][0]["dims"][-1])


def run(args: argparse.Namespace) -> dict:
    """Everything measured, then written to args.out (nothing is written before every part is in)."""
    remote = RemoteServer(args.url, args.grpc_url, args.metrics_url) if args.url else None
    name = f"cpu-s{args.size}" if not remote else f"remote-s{args.size}"
    results: dict = {
        "command": args.command,
        "levels": args.levels,
        "requests_per_level": args.requests,
        "perf_analyzer_requests": args.pa_requests,
        "server": args.url or "bundled",
    }
    with tempfile.TemporaryDirectory(prefix="ct_triage_bench_", ignore_cleanup_errors=True) as scratch:
        work = Path(scratch)
        started = time.perf_counter()
        repository = work / "repository"
        if not remote:
            export.write_repository(repository, target="cpu", size=args.size, demo_weights=True)
        study_options = dict(
            slices=args.slices, rows=args.matrix, columns=args.matrix, pixel_spacing=400.0 / args.matrix, slice_spacing=2.5
        )
        study_path = phantom.write_study(work / "study.zip", "zip", **study_options)
        study = study_path.read_bytes()
        input_json = work / "input.json"
        input_json.write_text(json.dumps(pa.input_data([study])))
        results["study"] = {**study_options, "dicom_mib": round(len(study) / 1024**2, 1)}
        results["setup_s"] = round(time.perf_counter() - started, 1)
        if remote:
            results["machine"] = machine(args.size, remote.http_url)
            results["perf_analyzer"] = sweeps(remote, input_json, args, work)
            results["load"] = [
                load.closed_loop("triton", load.triton_sender(remote.http_url, [study]), level, args.requests).to_dict()
                for level in args.levels
            ]
            results["locust"] = locust_run(remote, max(args.levels), args.locust_seconds, work / "locust", study_path)
        else:
            measure_bundled(results, repository, study, study_path, input_json, work, args)
    results["targets"] = targets(results)
    load.write_results(args.out, name, results, markdown(results, name))
    write_tables(results, args.out, name)
    return results


def measure_bundled(
    results: dict,
    repository: Path,
    study: bytes,
    study_path: Path,
    input_json: Path,
    work: Path,
    args: argparse.Namespace,
) -> None:
    """Everything, on a bundled server this run starts and stops (so memory and /dev/shm are its own)."""
    server = start_on_free_ports(repository, log_file=work / "tritonserver.log")
    try:
        results["machine"] = machine(args.size, server.http_url)
        time.sleep(2)  # let the stubs settle before the idle reading
        results["memory"] = {"idle_rss_mib": rss_by_process(server.pid), "shm_idle_mib": shm_mib(server)}
        with MemoryPeaks(server) as peaks:
            results["perf_analyzer"] = sweeps(server, input_json, args, work)
            results["load"], results["in_process"] = compare(server, repository, study, args)
            results["locust"] = locust_run(server, max(args.levels), args.locust_seconds, work / "locust", study_path)
            results["memory"]["client_300_slices"] = client_300_slices(server, work, args.client_slices)
        results["memory"].update(peak_rss_mib=peaks.rss, shm_peak_mib=peaks.shm_mib)
    finally:
        server.stop()
    results["memory"]["shm_after_stop_mib"] = shm_mib(server)
    if args.s256:
        results["s256"] = single_study_s256(work, [study])


def sweeps(server: TritonServer, input_json: Path, args: argparse.Namespace, work: Path) -> dict:
    """perf_analyzer on ct_classifier (all-zero volumes) and on ct_triage (the study), level by
    level, every sweep at a level before any at the next, in an order reversed from level to level,
    so that the sweeps compared (gRPC and HTTP, wire and shared memory) share the same minutes. Each
    measurement follows a warm-up run of `level` requests at its level (perf_analyzer 2.51 has no
    warm-up of its own)."""
    plan = [("classifier-grpc", NAMES.classifier, "grpc", False, args.levels)]
    plan += [(f"triage-{protocol}", NAMES.triage, protocol, False, args.levels) for protocol in ("grpc", "http")]
    if not args.url:  # system shared memory needs the server's own host
        ends = sorted({args.levels[0], args.levels[-1]})
        plan += [(f"triage-{protocol}-shm", NAMES.triage, protocol, True, ends) for protocol in ("grpc", "http")]

    def measure(sweep: str, model: str, protocol: str, shared: bool, level: int, requests: int) -> dict:
        return pa.run(
            model,
            server.grpc_url if protocol == "grpc" else server.http_url,
            protocol,
            level,
            work / f"{sweep}-c{level}.csv",  # with its .log: perf_analyzer's own output, gone with the scratch folder
            input_json=None if model == NAMES.classifier else input_json,
            shared_memory=shared,
            metrics_url=server.metrics_url,
            requests=requests,
        )

    found: dict[str, list[dict]] = {sweep: [] for sweep, *_ in plan}
    for k, level in enumerate(args.levels):
        for sweep, model, protocol, shared, levels in plan if k % 2 == 0 else plan[::-1]:
            if level in levels:
                measure(sweep, model, protocol, shared, level, level)  # the warm-up (batch shapes, buffers): not kept
                before = statistics_of(server.http_url)
                row = measure(sweep, model, protocol, shared, level, args.pa_requests)
                found[sweep].append({**row, "breakdown": breakdown(before, statistics_of(server.http_url))})
    return found


def compare(server: TritonServer, repository: Path, study: bytes, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The same client loop against the ensemble and the baseline, level by level, which goes first
    swapping from level to level; then the server's overhead at concurrency 1 (overhead_c1)."""
    weights = repository.with_name(repository.name + ".artifacts") / "weights.pt"
    rows = []
    with baseline_service(weights, args.size) as baseline_url:
        arms = [("triton", load.triton_sender(server.http_url, [study])), ("baseline", load.baseline_sender(baseline_url, study))]
        for k, level in enumerate(args.levels):
            for target, sender in arms if k % 2 == 0 else arms[::-1]:
                rows.append(load.closed_loop(target, sender, level, args.requests).to_dict())
    return rows, overhead_c1(server, repository, [study], args.size)


def client_300_slices(server: TritonServer, work: Path, slices: int) -> dict:
    folder = phantom.write_study(work / "study-300", "series", slices=slices, rows=512, columns=512, pixel_spacing=0.7, slice_spacing=1.0)
    peak, status = client_peak_mib(server.http_url, folder)
    dicom_mib = sum(path.stat().st_size for path in folder.iterdir()) / 1024**2
    shutil.rmtree(folder)
    return {"slices": slices, "dicom_mib": round(dicom_mib, 1), "client_peak_rss_mib": peak, "status": status}


def targets(results: dict) -> dict:
    """The issue's targets, met or not, with the numbers they compare ("not measured" against a
    server this run did not start: no baseline, no in-process reference, no /dev/shm it can see). A
    target compared over studies that failed is not met; a ratio to a baseline that answered none is
    not measured."""
    missing = {"value": "not measured (--url)", "met": None}
    by = {(row["target"], row["concurrency"]): row for row in results["load"]}
    top = max(results["levels"]) if 4 not in results["levels"] else 4
    first = min(results["levels"])
    throughput_target = f"throughput at concurrency {top} >= 1.5x baseline"
    p95_target = f"p95 at concurrency {first} no worse than baseline"
    overhead_target = "ensemble at concurrency 1 within 15% of in-process fast preprocessing + classifier (alternating, medians)"
    found = {}
    if ("baseline", top) in by:
        triton, baseline = by[("triton", top)], by[("baseline", top)]
        failed = _failed(triton, baseline)
        if baseline["failures"] == baseline["requests"]:
            found[throughput_target] = {"value": f"not measured: {failed}", "met": None}
        else:
            ratio = triton["studies_per_s"] / baseline["studies_per_s"]
            found[throughput_target] = {
                "value": f"{ratio:.2f} ({failed})" if failed else round(ratio, 2),
                "met": not failed and ratio >= TARGETS["throughput_ratio_c4"],
            }
        triton, baseline = by[("triton", first)], by[("baseline", first)]
        failed = _failed(triton, baseline)
        found[p95_target] = {
            "value": f"{triton['p95_s']} s vs {baseline['p95_s']} s" + (f" ({failed})" if failed else ""),
            "met": not failed and triton["p95_s"] <= baseline["p95_s"],
        }
    else:
        found[throughput_target] = found[p95_target] = missing
    if "in_process" in results:
        reference = results["in_process"]
        overhead = reference["served_s"] / reference["total_s"] - 1
        failures = reference["served_failures"]
        found[overhead_target] = {
            "value": f"{reference['served_s']} s vs {reference['total_s']} s: {overhead:+.1%}"
            + (f" ({failures} of {reference['rounds']} served studies failed)" if failures else ""),
            "met": not failures and overhead <= TARGETS["overhead_c1"],
        }
    else:
        found[overhead_target] = missing
    found["zero failed requests in the locust run"] = {
        "value": results["locust"]["failures"],
        "met": results["locust"]["failures"] == 0 and results["locust"]["exit_code"] == 0,
    }
    shm_target = "no /dev/shm region of the server's left after it stopped"
    if "memory" in results:
        memory = results["memory"]
        found[shm_target] = {
            "value": f"{memory['shm_idle_mib']} MiB idle, {memory['shm_peak_mib']} MiB at peak, {memory['shm_after_stop_mib']} MiB after",
            "met": memory["shm_after_stop_mib"] == 0,
        }
    else:
        found[shm_target] = {"value": "not measured (--url): the server's /dev/shm is on its own host", "met": None}
    return found


def _failed(*rows: dict) -> str:
    """What failed in the compared client-loop levels; empty when every study was answered."""
    return ", ".join(f"{row['target']}: {row['failures']} of {row['requests']} failed" for row in rows if row["failures"])


# -- results ---------------------------------------------------------------------------------------
def write_tables(results: dict, out: Path, name: str) -> None:
    """perf_analyzer's CSV per sweep, the load and breakdown CSVs and the plot; load.write_results writes the rest."""
    for sweep, rows in results["perf_analyzer"].items():
        with open(out / f"{name}-pa-{sweep}.csv", "w", newline="") as stream:  # perf_analyzer's columns and `throughput`
            writer = csv.DictWriter(stream, fieldnames=[key for key in rows[0] if key != "breakdown"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    with open(out / f"{name}-load.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(results["load"][0]))
        writer.writeheader()
        writer.writerows(results["load"])
    with open(out / f"{name}-breakdown.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            [
                "sweep",
                "concurrency",
                "model",
                "requests",
                "queue_ms",
                "compute_input_ms",
                "compute_infer_ms",
                "compute_output_ms",
                "executions_per_batch_size",
            ]
        )
        for sweep, rows in results["perf_analyzer"].items():
            for row in rows:
                for model, entry in row["breakdown"].items():
                    writer.writerow(
                        [
                            sweep,
                            row["Concurrency"],
                            model,
                            entry["requests"],
                            entry["queue_ms"],
                            entry["compute_input_ms"],
                            entry["compute_infer_ms"],
                            entry["compute_output_ms"],
                            json.dumps(entry.get("executions_per_batch_size", {})),
                        ]
                    )
    plot(results, out, name)


def plot(results: dict, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for sweep, rows in results["perf_analyzer"].items():
        levels = [row["Concurrency"] for row in rows]
        throughput.plot(levels, [row["throughput"] for row in rows], marker="o", label=f"perf_analyzer {sweep}")
        if sweep.startswith("triage") and not sweep.endswith("shm"):
            latency.plot(levels, [row["p50 latency"] / 1e6 for row in rows], marker="o", label=f"{sweep} p50")
            latency.plot(levels, [row["p95 latency"] / 1e6 for row in rows], marker="x", linestyle="--", label=f"{sweep} p95")
    for target, color in (("triton", "black"), ("baseline", "crimson")):
        rows = [row for row in results["load"] if row["target"] == target]
        levels = [row["concurrency"] for row in rows]
        style = {"color": color, "linewidth": 2.5}
        throughput.plot(levels, [row["studies_per_s"] for row in rows], marker="s", label=f"client loop: {target}", **style)
        latency.plot(levels, [row["p50_s"] for row in rows], marker="s", label=f"client loop {target} p50", **style)
        latency.plot(levels, [row["p95_s"] for row in rows], marker="^", linestyle=":", label=f"client loop {target} p95", **style)
    throughput.set(
        title=f"Throughput, S={results['machine']['size']} (CPU, {results['machine']['cores']} cores)",
        xlabel="concurrency (requests in flight)",
        ylabel="studies (or volumes) per second",
    )
    latency.set(title="Latency per study", xlabel="concurrency (requests in flight)", ylabel="seconds")
    for axis in (throughput, latency):
        axis.set_xticks(results["levels"])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=110)
    plt.close(figure)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict, name: str) -> str:
    m, study = results["machine"], results["study"]
    where = "the bundled tritonserver on this machine" if results["server"] == "bundled" else f"the server at {results['server']}"
    by_level = {(row["target"], row["concurrency"]): row for row in results["load"]}
    none = {"studies_per_s": "-", "p50_s": "-", "p95_s": "-", "failures": 0}
    parts = [
        f"# Serving benchmark: CPU, S={m['size']}",
        f"`{results['command']}` on {m['date']}, against {where}. Client machine: {m['cpu']}, {m['cores']} cores "
        f"({m['available_cpus']} available), {m['memory_gib']} GiB, no GPU; {versions_text(m)}. "
        "Demo weights (untrained): the numbers are about speed only.",
        f"Study: a generated chest phantom, {study['slices']} slices of {study['rows']}x{study['columns']}, "
        f"one ZIP of {study['dicom_mib']} MiB.",
        "## Targets",
        _table(
            ["target", "measured", "met"],
            [[k, v["value"], {True: "yes", False: "**no**", None: "-"}[v["met"]]] for k, v in results["targets"].items()],
        ),
        "## The ensemble against the baseline (same client loop, same study, interleaved)",
        "Triton: `ct_triage` through the project's client over HTTP. Baseline: FastAPI + uvicorn, PyTorch FP32 eager, "
        "reference preprocessing, one study at a time (`benchmarks/baseline.py`). Which of the two goes first swaps "
        f"from level to level. {results['requests_per_level']} studies per level and service: p50 and p95 are "
        "interpolated between the closest of those few samples.",
        _table(
            ["concurrency", "Triton studies/s", "baseline studies/s", "ratio", "Triton p50 / p95 s", "baseline p50 / p95 s", "failures"],
            [
                [
                    level,
                    t["studies_per_s"],
                    b["studies_per_s"],
                    round(t["studies_per_s"] / b["studies_per_s"], 2)
                    if isinstance(b["studies_per_s"], float) and b["studies_per_s"]
                    else "-",
                    f"{t['p50_s']} / {t['p95_s']}",
                    f"{b['p50_s']} / {b['p95_s']}",
                    t["failures"] + b["failures"],
                ]
                for level in results["levels"]
                for t, b in [(by_level[("triton", level)], by_level.get(("baseline", level), none))]
            ],
        ),
        (
            f"The server's overhead: one study at a time through `ct_triage`, alternating with the same work in process "
            f"(fast preprocessing + OpenVINO on the served IR, no server), {results['in_process']['rounds']} rounds, medians: "
            f"served {results['in_process']['served_s']} s ({results['in_process']['served_failures']} failed); in process "
            f"{results['in_process']['preprocess_s']} s preprocessing + {results['in_process']['classifier_s']} s classifier "
            f"= {results['in_process']['total_s']} s."
            if "in_process" in results
            else "No baseline and no in-process reference: the server is not this run's."
        ),
        "## perf_analyzer",
        f"{results['perf_analyzer_requests']} requests per level, each after a warm-up run at that level; the sweeps take turns at "
        "each level. "
        "Inferences/s: the requests over the seconds from the first send to the last answer (perf_analyzer's own "
        "Inferences/Second divides by whole seconds of its window); p50 and p95 of those few requests. The queue of the "
        "composing models is in the next table (an ensemble's own queue is always empty).",
        _table(
            ["sweep", "concurrency", "inferences/s", "p50 ms", "p95 ms", "server compute ms"],
            [
                [
                    sweep,
                    r["Concurrency"],
                    r["throughput"],
                    round(r["p50 latency"] / 1000),
                    round(r["p95 latency"] / 1000),
                    round((r["Server Compute Input"] + r["Server Compute Infer"] + r["Server Compute Output"]) / 1000),
                ]
                for sweep, rows in results["perf_analyzer"].items()
                for r in rows
            ],
        ),
        "Server-side time per composing model and the classifier's batch sizes (Triton's statistics around each level):",
        _table(
            [
                "sweep",
                "concurrency",
                "ct_preprocess queue / compute ms",
                "ct_classifier queue / compute ms",
                "ct_postprocess compute ms",
                "classifier executions per batch size",
            ],
            [
                [
                    sweep,
                    r["Concurrency"],
                    _split(r["breakdown"][NAMES.preprocess]),
                    _split(r["breakdown"][NAMES.classifier]),
                    _split(r["breakdown"][NAMES.postprocess]).split(" / ")[1],
                    r["breakdown"][NAMES.classifier]["executions_per_batch_size"],
                ]
                for sweep, rows in results["perf_analyzer"].items()
                for r in rows
            ],
        ),
        "## locust",
        locust_section(results["locust"]),
    ]
    if "memory" in results:
        parts += memory_section(results["memory"])
    if "s256" in results:
        s = results["s256"]
        parts += [
            f"## One study at S={PREPROCESSING.size}",
            f"{s['status']}: client round trip {s['round_trip_s']} s; "
            + "; ".join(f"{model} queue / compute {_split(entry)} ms" for model, entry in s["per_model"].items())
            + ".",
        ]
    parts.append(f"![throughput and latency]({name}.png)")
    return "\n\n".join(parts) + "\n"


def locust_section(locust: dict) -> str:
    """What the locust run sent (locust picks HTTP and gRPC users 2:1, so one user sends HTTP only);
    rate and percentiles of the studies answered with a result."""
    names = {"http": "HTTP", "grpc": "gRPC"}
    sent = ", ".join(f"{count} over {names.get(protocol, protocol)}" for protocol, count in locust["requests_per_type"].items())
    return (
        f"`locust -f benchmarks/locustfile.py --headless -u {locust['users']} -t {locust['seconds']}s`: {locust['requests']} studies "
        f"({sent or 'none sent'}), {locust['failures']} failed; {locust['succeeded']} answered with a result, "
        f"{locust['succeeded_per_s']} per second, p50 {locust['succeeded_p50_ms']} ms, p95 {locust['succeeded_p95_ms']} ms; "
        f"exit code {locust['exit_code']}."
    )


def memory_section(memory: dict) -> list[str]:
    client = memory["client_300_slices"]
    return [
        "## Memory",
        _table(
            ["process", "idle RSS MiB", "peak RSS MiB under load"],
            [
                [process, memory["idle_rss_mib"].get(process, "-"), memory["peak_rss_mib"].get(process, "-")]
                for process in sorted(set(memory["idle_rss_mib"]) | set(memory["peak_rss_mib"]))
            ],
        ),
        f"/dev/shm pages of the server's regions (other processes' not counted): {memory['shm_idle_mib']} MiB idle, "
        f"{memory['shm_peak_mib']} MiB at their peak, {memory['shm_after_stop_mib']} MiB after it stopped. "
        f"A client process sending a {client['slices']}-slice 512x512 study ({client['dicom_mib']} MiB of DICOM, "
        f"`python -m client classify`, HTTP): peak RSS {client['client_peak_rss_mib']} MiB ({client['status']}).",
    ]


def _split(entry: dict) -> str:
    compute = entry["compute_input_ms"] + entry["compute_infer_ms"] + entry["compute_output_ms"]
    return f"{entry['queue_ms']:.0f} / {compute:.0f}"


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--size",
        type=option_types.SIZE,
        default=64,
        metavar="S",
        help="model input S, voxels per side, of the repository this run renders and serves",
    )
    parser.add_argument(
        "--url",
        metavar="HOST:PORT",
        help="HTTP endpoint of a running server to measure instead (no export, baseline or memory); omitted: start one",
    )
    parser.add_argument("--grpc-url", metavar="HOST:PORT", help="with --url (which needs it): its gRPC endpoint")
    parser.add_argument(
        "--metrics-url",
        metavar="URL",
        help="with --url: its metrics endpoint, http://HOST:8002/metrics; omitted: perf_analyzer collects no server metrics",
    )
    parser.add_argument(
        "--out",
        type=option_types.out_folder,
        default="benchmarks/results",
        metavar="DIR",
        help="folder for the markdown, CSV and PNG results",
    )
    parser.add_argument(
        "--levels", type=option_types.CONCURRENCY, nargs="+", default=[1, 2, 4], metavar="N", help="concurrency levels, studies in flight"
    )
    parser.add_argument("--requests", type=option_types.COUNT, default=8, metavar="N", help="studies per level in the client loop")
    parser.add_argument("--pa-requests", type=option_types.COUNT, default=16, metavar="N", help="perf_analyzer requests per level")
    parser.add_argument("--slices", type=option_types.SLICES, default=120, metavar="N", help="phantom study: slices")
    parser.add_argument("--matrix", type=option_types.MATRIX, default=256, metavar="N", help="phantom study: rows and columns, pixels")
    parser.add_argument(
        "--locust-seconds",
        type=option_types.COUNT,
        default=20,
        metavar="SECONDS",
        help="length of the locust run, s (users: the largest level)",
    )
    parser.add_argument(
        "--client-slices",
        type=option_types.SLICES,
        default=300,
        metavar="N",
        help="slices of the 512x512 study the client's memory is measured with",
    )
    parser.add_argument(
        "--s256", action=argparse.BooleanOptionalAction, default=True, help=f"also one study at the trained S={PREPROCESSING.size}"
    )
    args = parser.parse_args(argv)
    if args.url and not args.grpc_url:
        parser.error("--url needs --grpc-url")
    if args.url:
        try:
            args.size = served_size(args.url)
        except OSError as error:  # refused, unknown host, timeout, an HTTP error status
            parser.error(f"--url {args.url}: no {NAMES.classifier} config from a Triton server there ({getattr(error, 'reason', error)})")
    args.levels = sorted(set(args.levels))
    args.command = option_types.command_line(parser, argv)
    results = run(args)
    for target, verdict in results["targets"].items():
        print(f"{ {True: 'met', False: 'NOT MET', None: 'not measured'}[verdict['met']] }: {target}: {verdict['value']}", file=sys.stderr)
    print(json.dumps({key: value for key, value in results.items() if key != "perf_analyzer"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
