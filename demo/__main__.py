"""`python -m demo`: the whole serving path on this machine, from nothing to a decision.

Renders a copy of the model repository with the classifier exported from demo weights (untrained:
the probability means nothing) at S=256 as trained, starts the bundled tritonserver on free ports,
sends a generated chest phantom study through ct_triage with the project's client, prints what a
site would look at (probability, decision, chosen series, timings per stage, model provenance) and
stops the server. The committed model_repository/ is left as it is. Ctrl-C or SIGTERM stops it
cleanly (the server and its stubs stopped, an unfinished export removed): one line, exit 130 or 143.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import client
import export
from client.triage import MAX_TIMEOUT_S
from contract import shown_probability
from contract.arguments import integer, model_size, number
from preprocess import phantom
from serve import start_on_free_ports
from settings import INPUT_LIMITS, NAMES, PREPROCESSING

DEMO_DIR = Path(__file__).resolve().parent.parent / "out" / "demo"  # git-ignored


class _Stop(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM so export, the client and the server unwind to their
    clean-up (as in `python -m serve`); a BaseException, which their `except Exception` lets by."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, _frame):
    # A second signal must not cut short the clean-up this one starts (the server's stop() is bounded in time).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop(signum)


def model_compute_seconds(triton, models) -> dict[str, dict[str, float]]:
    """Cumulative server-side time per model (queue + compute), from Triton's statistics extension."""
    stats = {}
    for model in models:
        entry = triton.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
        stats[model] = {key: int(entry[key]["ns"]) / 1e9 for key in ("queue", "compute_input", "compute_infer", "compute_output")}
    return stats


def run(out_dir: Path, size: int, protocol: str, timeout_s: float, phantom_options: dict) -> int:
    timings: dict[str, float] = {}

    started = time.perf_counter()
    repository = out_dir / "repository"
    export.write_repository(repository, target="cpu", size=size, demo_weights=True)
    timings["export (demo weights, ONNX, OpenVINO IR, parity, repository)"] = time.perf_counter() - started

    started = time.perf_counter()
    study = phantom.write_study(out_dir / "phantom_study.zip", form="zip", **phantom_options)
    timings["generate phantom study"] = time.perf_counter() - started

    started = time.perf_counter()
    with start_on_free_ports(repository, log_file=out_dir / "tritonserver.log") as server:
        timings["server start (models loaded)"] = time.perf_counter() - started
        url = server.grpc_url if protocol == "grpc" else server.http_url
        models = (NAMES.preprocess, NAMES.classifier, NAMES.postprocess)
        with client.TriageClient(url, protocol=protocol, timeout_s=timeout_s) as triage:
            triage.check_ready()
            result = triage.classify(study)
            per_model = model_compute_seconds(triage.triton, models) if result.ok else {}
        started = time.perf_counter()
    timings["server stop"] = time.perf_counter() - started

    print(report(result, study, size, timings, per_model, server))
    return 0 if result.ok else 1


def report(result, study: Path, size: int, timings: dict, per_model: dict, server) -> str:
    lines = [f"\nStudy {study.name} through {NAMES.triage} (S={size})"]
    if not result.ok:
        lines.append(f"  FAILED: {result.error}")
        lines.append(f"  server log: {server.log_file}")
        return "\n".join(lines)
    meta = result.meta
    threshold = meta.get("threshold")
    decision = NAMES.labels[result.pathology]
    lines += [
        f"  probability of pathology : {shown_probability(result.probability_of_pathology, result.pathology, decimals=6)}",
        f"  decision                 : {result.pathology} ({decision}) at threshold {threshold}",
        f"  study / series           : {result.study_uid} / {result.series_uid}",
    ]
    selection = meta.get("series_selection", {})
    lines.append(f"  chosen series            : {selection.get('chosen')} ({selection.get('reason')})")
    for skipped in selection.get("skipped", []):
        lines.append(f"    skipped {skipped.get('series_uid')}: {skipped.get('reason')}")
    lines.append(
        f"  geometry                 : shape {meta.get('original_shape')}, spacing {meta.get('original_spacing_mm')} mm,"
        f" crop box {meta.get('crop_box')}"
    )
    for warning in meta.get("warnings", []):
        lines.append(f"  warning                  : {warning}")
    lines.append("  preprocessing (in ct_preprocess), seconds:")
    for stage, seconds in meta.get("timings_s", {}).items():
        lines.append(f"    {stage:<28} {seconds:8.3f}")
    lines.append("  server time per model (queue / compute), seconds:")
    for model, stats in per_model.items():
        compute = stats["compute_input"] + stats["compute_infer"] + stats["compute_output"]
        lines.append(f"    {model:<28} {stats['queue']:8.3f} / {compute:8.3f}")
    lines.append(f"  client round trip        : {result.time_of_processing:.3f} s")
    lines.append("  around the request, seconds:")
    for step, seconds in timings.items():
        lines.append(f"    {step:<40} {seconds:8.3f}")
    lines.append(f"  model provenance         : {json.dumps(meta.get('provenance'), sort_keys=True)}")
    lines.append("  (demo weights are untrained: this probability says nothing about the phantom)")
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, each option's default after its help."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR, metavar="DIR", help="work folder (repository, study, log)")
    parser.add_argument(
        "--size", type=model_size, default=PREPROCESSING.size, metavar="S", help="model input S, voxels per side (trained at 256)"
    )
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="how the client talks to Triton")
    parser.add_argument(
        "--timeout",
        type=number(0, MAX_TIMEOUT_S, above_low=True),
        default=900.0,
        metavar="SECONDS",
        help="client deadline, s (a wide margin: the S=256 classifier alone takes about 20 s on 2 cores, "
        "benchmarks/results/cpu-engines.md, and longer on a slower or shared CPU)",
    )
    parser.add_argument(
        "--slices",
        type=integer(INPUT_LIMITS.min_slices, INPUT_LIMITS.max_slices),
        default=160,
        metavar="N",
        help="phantom slices",
    )
    parser.add_argument(
        "--matrix",
        type=integer(32, min(INPUT_LIMITS.max_rows, INPUT_LIMITS.max_columns)),
        default=256,
        metavar="N",
        help="phantom rows and columns, pixels",
    )
    args = parser.parse_args(argv)
    too_large = phantom.voxels_problem(args.slices, args.matrix, args.matrix)
    if too_large:
        parser.error(f"--slices, --matrix: {too_large}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "not a folder" if isinstance(error, FileExistsError) else error.strerror
        print(f"python -m demo: error: --out {args.out}: {reason}", file=sys.stderr)
        return 2
    phantom_options = {"slices": args.slices, "rows": args.matrix, "columns": args.matrix}
    previous = {signum: signal.signal(signum, _raise_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run(args.out, args.size, args.protocol, args.timeout, phantom_options)
    except _Stop as stop:
        print(f"python -m demo: stopped by {stop}; nothing is left running", file=sys.stderr)
        return 128 + stop.signum
    except export.ExportError as error:  # such as a --out/repository holding files export did not write
        print(f"python -m demo: error: {error}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
