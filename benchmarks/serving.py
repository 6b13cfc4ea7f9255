"""Serving benchmarks on one machine, in one run: the Triton ensemble against the obvious baseline.

    python -m benchmarks.serving --size 64 --out benchmarks/results [--levels 1 2 4] [--requests 8]
                                 [--slices 120 --matrix 256] [--s256 | --no-s256]

1. Renders the repository at S (demo weights, CPU target) and starts the bundled tritonserver.
2. perf_analyzer (Triton's load generator) sweeps the concurrency levels on ct_classifier with
   all-zero volumes (batch sizes per level from the server's statistics) and on ct_triage with a
   generated DICOM study: gRPC and HTTP, on the wire and through system shared memory. The server-side
   time per composing model (queue, compute) comes from Triton's statistics around each level.
3. The same closed client loop (benchmarks.load) sends the same study to the ensemble (project
   client, HTTP) and to the baseline (benchmarks.baseline: FastAPI, PyTorch FP32 eager, reference
   preprocessing, one study at a time), level by level, interleaved, and in-process (fast
   preprocessing + OpenVINO on the same served IR) for the server's own overhead.
4. A bounded locust run (benchmarks/locustfile.py, HTTP and gRPC users) against the server.
5. Memory: resident memory of the server and of each Python-backend stub at idle and its peak under
   load; /dev/shm before, at its peak, and after the server stopped; the peak memory of a client
   process sending a 300-slice study.
6. With --s256: one study through the ensemble at the trained S=256.

Writes to --out: <name>.md (machine, versions, tables, targets met or not), perf_analyzer's CSV per
sweep, the load and breakdown CSVs, a PNG plot and <name>.json (all of it); prints one JSON object
as its last line. <name> is cpu-s<S> (remote-s<S> with --url, which measures a running server
instead: perf_analyzer without shared memory, the client loop and locust only).
"""

from __future__ import annotations

import argparse
import csv
import json
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
from client import TriageClient
from preprocess import phantom
from serve import TritonServer, free_ports, process_tree, start_on_free_ports
from settings import NAMES

MODELS = (NAMES.preprocess, NAMES.classifier, NAMES.postprocess)
SHM = Path("/dev/shm")
TARGETS = {"throughput_ratio_c4": 1.5, "overhead_c1": 0.15}


# -- machine and memory ----------------------------------------------------------------------------
def machine(size: int) -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    memory_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    versions = {name: metadata.version(name) for name in ("nvidia-pytriton", "openvino", "torch", "numpy", "tritonclient", "locust")}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "available_cpus": preprocess.available_cpus(),
        "memory_gib": round(memory_kb / 1024**2, 1),
        "gpu": "none",
        "size": size,
        "triton": "2.51 (bundled in nvidia-pytriton 0.7.0)",
        "python": platform.python_version(),
        "versions": versions,
    }


def shm_used_mib() -> float:
    stats = os.statvfs(SHM)
    return round((stats.f_blocks - stats.f_bfree) * stats.f_frsize / 1024**2, 1)


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


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_by_process(server_pid: int) -> dict[str, float]:
    """Resident MiB of the server and of each stub, summed per name (a model's instances together)."""
    totals: dict[str, float] = {}
    for pid in process_tree(server_pid):
        name = _process_name(pid)
        try:
            if name:
                totals[name] = totals.get(name, 0.0) + _rss_mib(pid)
        except OSError:
            continue
    return {name: round(value, 1) for name, value in sorted(totals.items())}


class MemoryPeaks:
    """Samples the server's processes and /dev/shm every 0.25 s and keeps each one's peak."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.rss: dict[str, float] = {}
        self.shm_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for name, value in rss_by_process(self.server_pid).items():
                self.rss[name] = max(self.rss.get(name, 0.0), value)
            self.shm_mib = max(self.shm_mib, shm_used_mib())

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


def in_process_seconds(repository: Path, study: list[bytes], size: int, repeats: int = 5) -> dict:
    """Fast preprocessing + OpenVINO on the served IR, in this process: the work the ensemble does at
    concurrency 1 without the server around it (median of repeats)."""
    from classifier import OpenVINOClassifier

    engine = OpenVINOClassifier(repository / NAMES.classifier / "1" / "model.xml", size=size, threads=preprocess.available_cpus())
    preprocess_s, classifier_s = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        volume = preprocess.preprocess_study(study, size=size, mode="fast").volume
        middle = time.perf_counter()
        engine(volume)
        preprocess_s.append(middle - started)
        classifier_s.append(time.perf_counter() - middle)
    preprocess_s, classifier_s = preprocess_s[1:], classifier_s[1:]
    return {
        "preprocess_s": round(statistics.median(preprocess_s), 4),
        "classifier_s": round(statistics.median(classifier_s), 4),
        "total_s": round(statistics.median(p + c for p, c in zip(preprocess_s, classifier_s)), 4),
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
    """One study through the ensemble at the trained S=256: client round trip and time per model."""
    repository = work / "repository-256"
    export.write_repository(repository, target="cpu", size=256, demo_weights=True)
    with start_on_free_ports(repository, log_file=work / "tritonserver-256.log") as server:
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ct_triage_bench_"))
    remote = RemoteServer(args.url, args.grpc_url, args.metrics_url) if args.url else None
    size = served_size(args.url) if remote else args.size
    name = f"cpu-s{size}" if not remote else f"remote-s{size}"
    results: dict = {"machine": machine(size), "levels": args.levels, "requests_per_level": args.requests, "server": args.url or "bundled"}
    try:
        started = time.perf_counter()
        repository = work / "repository"
        if not remote:
            export.write_repository(repository, target="cpu", size=size, demo_weights=True)
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
            results["perf_analyzer"] = sweeps(remote, input_json, args, out, name)
            results["load"] = [
                load.closed_loop("triton", load.triton_sender(remote.http_url, [study]), level, args.requests).to_dict()
                for level in args.levels
            ]
            results["locust"] = locust_run(remote, max(args.levels), args.locust_seconds, work / "locust", study_path)
        else:
            measure_bundled(results, repository, study, study_path, input_json, work, args, out, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["targets"] = targets(results)
    write_results(results, out, name)
    return results


def measure_bundled(
    results: dict,
    repository: Path,
    study: bytes,
    study_path: Path,
    input_json: Path,
    work: Path,
    args: argparse.Namespace,
    out: Path,
    name: str,
) -> None:
    """Everything, on a bundled server this run starts and stops (so memory and /dev/shm are its own)."""
    shm_before = shm_used_mib()
    server = start_on_free_ports(repository, log_file=work / "tritonserver.log")
    try:
        time.sleep(2)  # let the stubs settle before the idle reading
        results["memory"] = {"idle_rss_mib": rss_by_process(server.pid), "shm_before_mib": shm_before, "shm_idle_mib": shm_used_mib()}
        with MemoryPeaks(server.pid) as peaks:
            results["perf_analyzer"] = sweeps(server, input_json, args, out, name)
            results["load"], results["in_process"] = compare(server, repository, study, args)
            results["locust"] = locust_run(server, max(args.levels), args.locust_seconds, work / "locust", study_path)
            results["memory"]["client_300_slices"] = client_300_slices(server, work, args.client_slices)
        results["memory"].update(peak_rss_mib=peaks.rss, shm_peak_mib=peaks.shm_mib)
    finally:
        server.stop()
    results["memory"]["shm_after_stop_mib"] = shm_used_mib()
    if args.s256:
        results["s256"] = single_study_s256(work, [study])


def sweeps(server: TritonServer, input_json: Path, args: argparse.Namespace, out: Path, name: str) -> dict:
    """perf_analyzer on ct_classifier (all-zero volumes) and on ct_triage (the study), per level."""
    plan = [("classifier-grpc", NAMES.classifier, "grpc", False, args.levels)]
    plan += [(f"triage-{protocol}", NAMES.triage, protocol, False, args.levels) for protocol in ("grpc", "http")]
    if not args.url:  # system shared memory needs the server's own host
        ends = sorted({args.levels[0], args.levels[-1]})
        plan += [(f"triage-{protocol}-shm", NAMES.triage, protocol, True, ends) for protocol in ("grpc", "http")]
    found = {}
    for sweep, model, protocol, shared, levels in plan:
        rows = []
        for level in levels:
            before = statistics_of(server.http_url)
            level_csv = out / f".{name}-{sweep}-c{level}.csv"
            row = pa.run(
                model,
                server.grpc_url if protocol == "grpc" else server.http_url,
                protocol,
                level,
                level_csv,
                input_json=None if model == NAMES.classifier else input_json,
                shared_memory=shared,
                metrics_url=server.metrics_url,
                requests=args.pa_requests,
            )
            level_csv.unlink()
            level_csv.with_suffix(".log").unlink()
            rows.append({**row, "breakdown": breakdown(before, statistics_of(server.http_url))})
        with open(out / f"{name}-pa-{sweep}.csv", "w", newline="") as stream:  # perf_analyzer's own columns
            writer = csv.DictWriter(stream, fieldnames=[key for key in rows[0] if key != "breakdown"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        found[sweep] = rows
    return found


def compare(server: TritonServer, repository: Path, study: bytes, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The same client loop against the ensemble and the baseline, level by level, interleaved."""
    weights = repository.with_name(repository.name + ".artifacts") / "weights.pt"
    rows = []
    with baseline_service(weights, args.size) as baseline_url:
        for level in args.levels:
            rows.append(load.closed_loop("triton", load.triton_sender(server.http_url, [study]), level, args.requests).to_dict())
            rows.append(load.closed_loop("baseline", load.baseline_sender(baseline_url, study), level, args.requests).to_dict())
    return rows, in_process_seconds(repository, [study], args.size)


def client_300_slices(server: TritonServer, work: Path, slices: int) -> dict:
    folder = phantom.write_study(work / "study-300", "series", slices=slices, rows=512, columns=512, pixel_spacing=0.7, slice_spacing=1.0)
    peak, status = client_peak_mib(server.http_url, folder)
    dicom_mib = sum(path.stat().st_size for path in folder.iterdir()) / 1024**2
    shutil.rmtree(folder)
    return {"slices": slices, "dicom_mib": round(dicom_mib, 1), "client_peak_rss_mib": peak, "status": status}


def targets(results: dict) -> dict:
    """The issue's targets, met or not, with the numbers they compare ("not measured" against a
    server this run did not start: no baseline, no in-process reference, no /dev/shm of its own)."""
    missing = {"value": "not measured (--url)", "met": None}
    by = {(row["target"], row["concurrency"]): row for row in results["load"]}
    top = max(results["levels"]) if 4 not in results["levels"] else 4
    first = min(results["levels"])
    found = {}
    if ("baseline", top) in by:
        triton, baseline = by[("triton", top)], by[("baseline", top)]
        ratio = triton["studies_per_s"] / baseline["studies_per_s"] if baseline["studies_per_s"] else float("inf")
        found[f"throughput at concurrency {top} >= 1.5x baseline"] = {
            "value": round(ratio, 2),
            "met": ratio >= TARGETS["throughput_ratio_c4"],
        }
        found[f"p95 at concurrency {first} no worse than baseline"] = {
            "value": f"{by[('triton', first)]['p95_s']} s vs {by[('baseline', first)]['p95_s']} s",
            "met": by[("triton", first)]["p95_s"] <= by[("baseline", first)]["p95_s"],
        }
    else:
        found[f"throughput at concurrency {top} >= 1.5x baseline"] = found[f"p95 at concurrency {first} no worse than baseline"] = missing
    if "in_process" in results:
        overhead = by[("triton", first)]["p50_s"] / results["in_process"]["total_s"] - 1
        found[f"ensemble p50 at concurrency {first} within 15% of in-process fast preprocessing + classifier"] = {
            "value": f"{overhead:+.1%}",
            "met": overhead <= TARGETS["overhead_c1"],
        }
    else:
        found[f"ensemble p50 at concurrency {first} within 15% of in-process fast preprocessing + classifier"] = missing
    found["zero failed requests in the locust run"] = {
        "value": results["locust"]["failures"],
        "met": results["locust"]["failures"] == 0 and results["locust"]["exit_code"] == 0,
    }
    if "memory" in results:
        memory = results["memory"]
        found["/dev/shm back to its start after the server stopped"] = {
            "value": f"{memory['shm_before_mib']} -> {memory['shm_after_stop_mib']} MiB",
            "met": memory["shm_after_stop_mib"] <= memory["shm_before_mib"],
        }
    else:
        found["/dev/shm back to its start after the server stopped"] = missing
    return found


# -- results ---------------------------------------------------------------------------------------
def write_results(results: dict, out: Path, name: str) -> None:
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
    (out / f"{name}.md").write_text(markdown(results, name))
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")  # everything, for later comparisons


def plot(results: dict, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for sweep, rows in results["perf_analyzer"].items():
        levels = [row["Concurrency"] for row in rows]
        throughput.plot(levels, [row["Inferences/Second"] for row in rows], marker="o", label=f"perf_analyzer {sweep}")
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
        f"`python -m benchmarks.serving --size {m['size']} --levels {' '.join(map(str, results['levels']))} "
        f"--requests {results['requests_per_level']}` on {m['date']}, against {where}. Client machine: {m['cpu']}, {m['cores']} cores "
        f"({m['available_cpus']} available), {m['memory_gib']} GiB, no GPU; Python {m['python']}; Triton {m['triton']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ". Demo weights (untrained): the numbers are about speed only.",
        f"Study: a generated chest phantom, {study['slices']} slices of {study['rows']}x{study['columns']}, "
        f"one ZIP of {study['dicom_mib']} MiB.",
        "## Targets",
        _table(
            ["target", "measured", "met"],
            [[k, v["value"], {True: "yes", False: "**no**", None: "-"}[v["met"]]] for k, v in results["targets"].items()],
        ),
        "## The ensemble against the baseline (same client loop, same study, interleaved)",
        "Triton: `ct_triage` through the project's client over HTTP. Baseline: FastAPI + uvicorn, PyTorch FP32 eager, "
        "reference preprocessing, one study at a time (`benchmarks/baseline.py`).",
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
            f"In-process (fast preprocessing + OpenVINO on the served IR, no server): preprocessing "
            f"{results['in_process']['preprocess_s']} s + classifier {results['in_process']['classifier_s']} s "
            f"= {results['in_process']['total_s']} s."
            if "in_process" in results
            else "No baseline and no in-process reference: the server is not this run's."
        ),
        "## perf_analyzer",
        _table(
            ["sweep", "concurrency", "inferences/s", "p50 ms", "p95 ms", "server queue ms", "server compute ms"],
            [
                [
                    sweep,
                    r["Concurrency"],
                    r["Inferences/Second"],
                    round(r["p50 latency"] / 1000),
                    round(r["p95 latency"] / 1000),
                    round(r["Server Queue"] / 1000),
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
        f"`locust -f benchmarks/locustfile.py --headless -u {results['locust']['users']} -t {results['locust']['seconds']}s` "
        f"(HTTP and gRPC users, 2:1): {results['locust']['requests']} studies {results['locust']['requests_per_type']}, "
        f"{results['locust']['failures']} failures, {results['locust']['studies_per_s']} studies/s, p50 {results['locust']['p50_ms']} ms, "
        f"p95 {results['locust']['p95_ms']} ms; exit code {results['locust']['exit_code']}.",
    ]
    if "memory" in results:
        parts += memory_section(results["memory"])
    if "s256" in results:
        s = results["s256"]
        parts += [
            "## One study at S=256",
            f"{s['status']}: client round trip {s['round_trip_s']} s; "
            + "; ".join(f"{model} queue / compute {_split(entry)} ms" for model, entry in s["per_model"].items())
            + ".",
        ]
    parts.append(f"![throughput and latency]({name}.png)")
    return "\n\n".join(parts) + "\n"


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
        f"/dev/shm in use: {memory['shm_before_mib']} MiB before the server, {memory['shm_idle_mib']} MiB idle, "
        f"{memory['shm_peak_mib']} MiB at its peak, {memory['shm_after_stop_mib']} MiB after it stopped. "
        f"A client process sending a {client['slices']}-slice 512x512 study ({client['dicom_mib']} MiB of DICOM, "
        f"`python -m client classify`, HTTP): peak RSS {client['client_peak_rss_mib']} MiB ({client['status']}).",
    ]


def _split(entry: dict) -> str:
    compute = entry["compute_input_ms"] + entry["compute_infer_ms"] + entry["compute_output_ms"]
    return f"{entry['queue_ms']:.0f} / {compute:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=option_types.SIZE, default=64, help="model input S of the repository this run renders and serves")
    parser.add_argument("--url", help="HOST:PORT (HTTP) of a running server to measure instead (no export, baseline or memory)")
    parser.add_argument("--grpc-url", help="with --url: HOST:PORT of its gRPC endpoint")
    parser.add_argument("--metrics-url", help="with --url: its metrics endpoint, http://HOST:8002/metrics")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown, CSV and PNG results")
    parser.add_argument("--levels", type=option_types.CONCURRENCY, nargs="+", default=[1, 2, 4], help="concurrency levels")
    parser.add_argument("--requests", type=option_types.COUNT, default=8, help="studies per level in the client loop")
    parser.add_argument("--pa-requests", type=option_types.COUNT, default=16, help="perf_analyzer requests per level")
    parser.add_argument("--slices", type=option_types.SLICES, default=120, help="phantom study: slices")
    parser.add_argument("--matrix", type=option_types.MATRIX, default=256, help="phantom study: rows and columns")
    parser.add_argument("--locust-seconds", type=option_types.COUNT, default=20)
    parser.add_argument(
        "--client-slices", type=option_types.SLICES, default=300, help="slices of the 512x512 study the client's memory is measured with"
    )
    parser.add_argument("--s256", action=argparse.BooleanOptionalAction, default=True, help="also one study at S=256")
    args = parser.parse_args(argv)
    if args.url and not args.grpc_url:
        parser.error("--url needs --grpc-url")
    args.levels = sorted(set(args.levels))
    results = run(args)
    for target, verdict in results["targets"].items():
        print(f"{ {True: 'met', False: 'NOT MET', None: 'not measured'}[verdict['met']] }: {target}: {verdict['value']}", file=sys.stderr)
    print(json.dumps({key: value for key, value in results.items() if key != "perf_analyzer"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
