"""Soak: valid and invalid studies at concurrency 4 against the supervised CPU server, memory sampled.

    python -m benchmarks.soak --minutes 10 --out benchmarks/results [--size 16] [--concurrency 4]

Renders the repository at a small S (demo weights, CPU target) and starts the bundled tritonserver under
the launcher's watchdog, as `python -m serve` runs it. Each client thread sends the cases in turn
(phantom studies as a folder, a ZIP and a multi-frame file; and studies that must be refused: nothing
sent, an empty file, not DICOM, a damaged ZIP, a truncated slice, too few slices, MR instead of CT,
slices over the size limit, more files than a study may have), switching between gRPC and HTTP, on the
wire and through system shared memory, with no retries. Every answer is checked: a valid study gets
the probability it got the first time, an invalid one the refusal preprocess gives offline (or the
served bound for the file count). Resident memory of tritonserver and of each stub and this server's
/dev/shm pages are sampled every few seconds. Warm-up: every case in every mode once, then --warm-up-s
of the same load (the server's threads and buffers for concurrent requests); start = idle after it,
end = idle after the last answer.

Pass: studies sent for the whole --minutes, no unexpected answer, no watchdog action, every process's
resident memory at the end within 10% of its start, /dev/shm pages back to their start and no client
region left. Writes soak-cpu.md, .json and .png to --out; prints one JSON summary line; exits 1 if it
did not pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pydicom.data

import export
import preprocess
from benchmarks import option_types
from benchmarks.load import percentile, triton_version, write_results
from benchmarks.process_memory import cpu_model
from client import RetryPolicy, TriageClient
from preprocess import phantom
from serve import start_on_free_ports
from settings import INPUT_LIMITS, NAMES, OPERATING_POINT

RSS_TOLERANCE = 0.10
SAMPLE_EVERY_S = 5.0
MODES = [(protocol, shm) for protocol in ("grpc", "http") for shm in (False, True)]
MIB = 1024**2


@dataclass(frozen=True)
class Case:
    name: str
    payload: list[bytes]
    refusal: str | None  # None: a valid study


def cases(size: int) -> list[Case]:
    """Valid phantoms and one study per kind of refusal; each refusal's text comes from preprocess offline."""
    series = phantom.study_files(form="series")
    truncated = list(series)
    truncated[len(series) // 2] = truncated[len(series) // 2][:2000]
    invalid = {
        "nothing sent": [],
        "empty file": [b""],
        "not DICOM": [b"this is a report, not an image\n" * 64],
        "damaged ZIP": [b"PK\x03\x04" + bytes(range(256)) * 8],
        "truncated slice": truncated,
        "too few slices": series[:4],
        "MR, not CT": [(Path(pydicom.data.__file__).parent / "test_files" / "MR_small.dcm").read_bytes()],
        "slices over the size limit": phantom.study_files(form="series", slices=16, rows=INPUT_LIMITS.max_rows + 1, columns=8),
    }
    found = [
        Case("phantom, folder", series, None),
        Case("phantom, ZIP", phantom.study_files(form="zip", seed=1), None),
        Case("phantom, multi-frame", phantom.study_files(form="multiframe", seed=2), None),
    ]
    for name, payload in invalid.items():
        try:
            preprocess.preprocess_study(payload, size=size, mode="fast")
        except preprocess.StudyError as error:
            found.append(Case(name, payload, str(error)))
        else:
            raise AssertionError(f"{name}: preprocess accepted it")
    too_many = INPUT_LIMITS.max_folder_files + 1
    limit = INPUT_LIMITS.max_folder_files
    found.append(
        Case(
            "more files than a study may have",
            [b"DICM"] * too_many,
            f"the request holds {too_many} files, more than the limit of {limit} per study",
        )
    )
    return found


class Tally:
    """Answers per case and mode, unexpected ones kept (the first 20 in full)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.expected_probability: dict[str, float] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.seconds: dict[str, list[float]] = {}
        self.unexpected: list[dict] = []
        self.unexpected_count = 0

    def check(self, case: Case, mode: tuple[str, bool], result) -> None:
        label = f"{mode[0]}{' + shm' if mode[1] else ''}"
        if case.refusal is None:
            ok = result.processing_status == "Success" and 0.0 <= result.probability_of_pathology <= 1.0
            ok = ok and result.pathology == int(result.probability_of_pathology >= OPERATING_POINT.threshold)
            with self.lock:
                first = self.expected_probability.setdefault(case.name, result.probability_of_pathology) if ok else None
            ok = ok and abs(result.probability_of_pathology - first) <= 1e-6
        else:
            ok = result.processing_status == "Failure" and result.error == f"in ensemble '{NAMES.triage}', {case.refusal}"
        with self.lock:
            counts = self.counts.setdefault(case.name, {"sent": 0, "as expected": 0})
            counts["sent"] += 1
            counts["as expected"] += ok
            self.seconds.setdefault(case.name, []).append(result.time_of_processing)
            if not ok:
                self.unexpected_count += 1
                if len(self.unexpected) < 20:
                    self.unexpected.append({"case": case.name, "mode": label, "status": result.processing_status, "error": result.error})


class Sampler:
    """Resident memory per process and this server's /dev/shm pages, every SAMPLE_EVERY_S."""

    def __init__(self, server, started: float):
        self.server, self.started = server, started
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, phase: str) -> dict:
        rss = {name: round(value / MIB, 1) for name, value in sorted(self.server.resident_bytes().items())}
        entry = {"t_s": round(time.monotonic() - self.started, 1), "phase": phase, "rss_mib": rss, "shm_mib": self.server.shm_bytes() / MIB}
        self.samples.append(entry)
        return entry

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.sample("load")

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def send_all(server, studies: list[Case], tally: Tally, deadline: float, offset: int, stop: threading.Event) -> None:
    """One client thread: the cases in turn, each time in the next mode, until the deadline or `stop`."""
    clients = {
        mode: TriageClient(
            server.grpc_url if mode[0] == "grpc" else server.http_url, mode[0], retry=RetryPolicy(attempts=1), shared_memory=mode[1]
        )
        for mode in MODES
    }
    try:
        for k in itertools.count(offset):
            if stop.is_set() or time.monotonic() >= deadline:
                return
            case, mode = studies[k % len(studies)], MODES[(k // len(studies) + k) % len(MODES)]
            tally.check(case, mode, clients[mode].classify(case.payload))
    finally:
        for client in clients.values():
            client.close()


def load(server, studies: list[Case], tally: Tally, concurrency: int, deadline: float) -> None:
    """`concurrency` client threads until the deadline; an interrupt (Ctrl-C) stops them after the
    studies in flight."""
    stop = threading.Event()
    threads = [threading.Thread(target=send_all, args=(server, studies, tally, deadline, 5 * n, stop)) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def connect(server, mode: tuple[str, bool]) -> TriageClient:
    """No retries: every error counts."""
    protocol, shared_memory = mode
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return TriageClient(url, protocol, retry=RetryPolicy(attempts=1), shared_memory=shared_memory)


def client_regions() -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"ct_triage_client_{os.getpid()}_*"))


def run(args: argparse.Namespace) -> dict:
    studies = cases(args.size)
    with tempfile.TemporaryDirectory(prefix="ct_triage_soak_") as work:
        repository = Path(work) / "repository"
        export.write_repository(repository, target="cpu", size=args.size, demo_weights=True)
        server = start_on_free_ports(repository, log_file=Path(work) / "tritonserver.log", supervise=True)
        try:
            tally = Tally()
            for case in studies:  # warm-up: every case in every mode once; sets the expected probabilities
                for mode in MODES:
                    with connect(server, mode) as client:
                        tally.check(case, mode, client.classify(case.payload))
            triton = triton_version(server.http_url)  # the version the results name
            load(server, studies, tally, args.concurrency, time.monotonic() + args.warm_up_s)  # the working set of concurrency
            warm_up = {"sent": sum(c["sent"] for c in tally.counts.values()), "unexpected": list(tally.unexpected)}
            expected, tally = tally.expected_probability, Tally()
            tally.expected_probability = dict(expected)  # later answers must repeat the warm-up's
            started = time.monotonic()
            with Sampler(server, started) as sampler:
                start = sampler.sample("start")
                load(server, studies, tally, args.concurrency, started + args.minutes * 60)
                elapsed = time.monotonic() - started
            end = sampler.sample("end")
            recoveries = [vars(r) for r in server.recoveries]
            leftover_client_regions = [p.name for p in client_regions()]
            log_tail = server.log_tail(10)
        finally:
            server.stop()
    summary = summarise(args, studies, tally, warm_up, sampler.samples, start, end, elapsed, recoveries, leftover_client_regions, log_tail)
    return {"machine": machine(args.size, triton), **summary}


def summarise(args, studies, tally, warm_up, samples, start, end, elapsed, recoveries, leftover, log_tail) -> dict:
    processes = sorted(set(start["rss_mib"]) | set(end["rss_mib"]))
    memory = {
        name: {
            "start_mib": start["rss_mib"].get(name),
            "end_mib": end["rss_mib"].get(name),
            "max_mib": max(s["rss_mib"].get(name, 0.0) for s in samples),
        }
        for name in processes
    }
    for entry in memory.values():
        s, e = entry["start_mib"], entry["end_mib"]
        entry["change"] = round(e / s - 1, 4) if s and e else None
    sent = sum(c["sent"] for c in tally.counts.values())
    valid = sum(c["sent"] for name, c in tally.counts.items() if any(s.name == name and s.refusal is None for s in studies))
    checks = {
        "no unexpected answer": tally.unexpected_count == 0 and not warm_up["unexpected"],
        "no watchdog action": not recoveries,
        "resident memory flat within 10%": all(e["change"] is not None and abs(e["change"]) <= RSS_TOLERANCE for e in memory.values()),
        "/dev/shm back to its start": end["shm_mib"] == start["shm_mib"] and not leftover,
        "ran its length with studies sent": sent > 0 and elapsed >= args.minutes * 60,
    }
    return {
        "command": args.command,
        "size": args.size,
        "concurrency": args.concurrency,
        "modes": [f"{p}{' + shm' if s else ''}" for p, s in MODES],
        "minutes": args.minutes,
        "elapsed_s": round(elapsed, 1),
        "warm_up_sent": warm_up["sent"],
        "warm_up_s": args.warm_up_s,
        "sent": sent,
        "valid_sent": valid,
        "invalid_sent": sent - valid,
        "studies_per_s": round(sent / elapsed, 2) if elapsed else 0.0,
        "unexpected": tally.unexpected_count,
        "unexpected_examples": warm_up["unexpected"] + tally.unexpected,
        "cases": {
            name: {
                **counts,
                "expects": next(s.refusal or "a probability" for s in studies if s.name == name),
                "p50_s": round(statistics.median(tally.seconds[name]), 3),
                "p95_s": round(percentile(tally.seconds[name], 95), 3),
            }
            for name, counts in tally.counts.items()
        },
        "memory": memory,
        "shm_mib": {"start": start["shm_mib"], "end": end["shm_mib"], "max": max(s["shm_mib"] for s in samples)},
        "client_regions_left": leftover,
        "recoveries": recoveries,
        "checks": checks,
        "passed": all(checks.values()),
        "samples": samples,
        "server_log_tail": log_tail,
    }


def machine(size: int, triton: str) -> dict:
    """This machine, the versions of the packages measured, and `triton`, the version the server reported."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "size": size,
        "triton": triton,
        "python": platform.python_version(),
        "versions": {name: metadata.version(name) for name in ("nvidia-pytriton", "onnxruntime", "numpy", "tritonclient")},
    }


def markdown(results: dict) -> str:
    lines = [
        "# Soak: valid and invalid studies against the supervised CPU server",
        "",
        f"`{results['command']}` on {results['machine']['cpu']} ({results['machine']['cores']} cores, shared with other work; "
        f"load average at the end {results['machine']['load_average_at_end']}), {results['machine']['date']}, "
        f"Triton {results['machine']['triton']}, demo weights, S={results['size']}.",
        "",
        f"**{'PASSED' if results['passed'] else 'FAILED'}**: "
        + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in results["checks"].items())
        + ".",
        "",
        f"{results['sent']} studies in {results['elapsed_s']} s ({results['studies_per_s']} studies/s) from {results['concurrency']} "
        f"client threads, {results['valid_sent']} valid and {results['invalid_sent']} invalid, each case in turn over "
        f"{', '.join(results['modes'])}, no retries, after a warm-up of {results['warm_up_sent']} (every case in every mode once, "
        f"then {results['warm_up_s']:g} s of the same load). "
        f"Unexpected answers: {results['unexpected']}. Watchdog actions: {len(results['recoveries'])}.",
        "",
        "p50 and p95: over the studies sent of each case, interpolated between the closest of them.",
        "",
        "| case | expected answer | sent | as expected | p50 s | p95 s |",
        "|---|---|---|---|---|---|",
    ]
    for name, case in results["cases"].items():
        lines.append(f"| {name} | {case['expects']} | {case['sent']} | {case['as expected']} | {case['p50_s']} | {case['p95_s']} |")
    lines += ["", "| process | RSS start MiB | RSS end MiB | RSS max MiB | end vs start |", "|---|---|---|---|---|"]
    for name, entry in results["memory"].items():
        change = f"{entry['change'] * 100:+.1f}%" if entry["change"] is not None else "-"
        lines.append(f"| {name} | {entry['start_mib']} | {entry['end_mib']} | {entry['max_mib']} | {change} |")
    shm = results["shm_mib"]
    lines += [
        "",
        f"/dev/shm pages of this server's regions: {shm['start']:.0f} MiB at the start, {shm['max']:.0f} MiB at most, "
        f"{shm['end']:.0f} MiB at the end; client regions left: {len(results['client_regions_left'])}. "
        f"Resident memory of a stub includes the pages of its region it has touched.",
        "",
        "![resident memory and /dev/shm over the soak](soak-cpu.png)",
    ]
    if results["unexpected_examples"]:
        lines += ["", "Unexpected answers (first ones):", ""]
        lines += [f"- {e['case']} over {e['mode']}: {e['status']}: {e['error']}" for e in results["unexpected_examples"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    figure, (rss, shm) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name in results["memory"]:
        rss.plot([s["t_s"] for s in samples], [s["rss_mib"].get(name) for s in samples], label=name)
    rss.set_ylabel("resident MiB")
    rss.legend(fontsize=8)
    rss.set_title(
        f"soak, S={results['size']}, concurrency {results['concurrency']}: {results['sent']} studies, {results['unexpected']} unexpected"
    )
    shm.plot([s["t_s"] for s in samples], [s["shm_mib"] for s in samples], color="black")
    shm.set_ylabel("/dev/shm MiB")
    shm.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__, formatter_class=option_types.HelpFormatter)
    parser.add_argument("--minutes", type=option_types.MINUTES, default=10.0, metavar="MINUTES", help="how long studies are sent, min")
    parser.add_argument(
        "--size",
        type=option_types.SIZE,
        default=16,
        metavar="S",
        help="S of the rendered repository, voxels per side (small: the serving path is what is soaked)",
    )
    parser.add_argument("--concurrency", type=option_types.CONCURRENCY, default=4, metavar="N", help="client threads, studies in flight")
    parser.add_argument(
        "--warm-up-s",
        type=option_types.SECONDS,
        default=60.0,
        metavar="SECONDS",
        help="load at the same concurrency before the start sample, s",
    )
    parser.add_argument(
        "--out", type=option_types.out_folder, default="benchmarks/results", metavar="DIR", help="folder for soak-cpu.md, .json and .png"
    )
    args = parser.parse_args(argv)
    args.command = option_types.command_line(parser, argv)
    results = run(args)
    write_results(args.out, "soak-cpu", results, markdown(results))
    plot(results, args.out / "soak-cpu.png")
    summary = {k: results[k] for k in ("passed", "sent", "unexpected", "elapsed_s", "memory", "shm_mib", "checks")}
    print(json.dumps(summary))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
