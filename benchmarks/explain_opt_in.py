"""Explanations are opt-in: does serving them cost ct_triage anything while nobody asks for one?

`python -m benchmarks.explain_opt_in [--size 64] [--levels 1 2] [--requests 8] [--rounds 2] [--out DIR]`

One bundled tritonserver on a rendered repository (demo weights, CPU target). ct_triage is measured
by the closed client loop (benchmarks.load) with the explanation models (ct_explain, ct_localize,
ct_triage_explain) loaded and with them unloaded through Triton's model-control API, alternating in
each round (loaded, unloaded; then unloaded, loaded) so that both see the same minutes of the
machine. The ratio of the two throughputs is the target (1.0: unchanged). Beside it: the resident
memory the explanation models add, and one study through ct_triage_explain against ct_triage, the
price of asking for an explanation. Writes explain-opt-in-<device>-s<S>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks import option_types
from benchmarks.load import add_arguments, closed_loop, rendered_server, triton_sender, write_results
from benchmarks.serving import machine, rss_by_process, versions_text
from client import RetryPolicy, TriageClient
from preprocess import phantom
from settings import NAMES

EXPLANATION_MODELS = (NAMES.triage_explain, NAMES.explain, NAMES.localize)  # the ensemble first: it uses the others
TOLERANCE = 0.10  # a throughput ratio within 10% of 1 is "unchanged" on this shared machine


def set_explanations(server, loaded: bool) -> None:
    """Load or unload the explanation models; ct_triage's models stay as they are."""
    from tritonclient import http

    client = http.InferenceServerClient(server.http_url)
    try:
        for model in reversed(EXPLANATION_MODELS) if loaded else EXPLANATION_MODELS:
            (client.load_model if loaded else client.unload_model)(model)
        deadline = time.monotonic() + 120
        while any(client.is_model_ready(model) != loaded for model in EXPLANATION_MODELS):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the explanation models did not become {'ready' if loaded else 'unloaded'} in 120 s")
            time.sleep(0.2)
    finally:
        client.close()


def _after_stubs_exit(server_pid: int, timeout_s: float = 60) -> dict[str, float]:
    """Resident memory per process once the unloaded models' stub processes have exited."""
    stubs = {f"stub {model}" for model in EXPLANATION_MODELS}
    deadline = time.monotonic() + timeout_s
    while (memory := rss_by_process(server_pid)).keys() & stubs and time.monotonic() < deadline:
        time.sleep(0.5)
    return memory


def one_study_s(url: str, payload: list[bytes], explain: bool, repeats: int) -> float:
    """Median round trip of one study, after one warm-up, through ct_triage or ct_triage_explain."""
    client = TriageClient(url, "http", timeout_s=900, retry=RetryPolicy(attempts=1), explain=explain)
    times = []
    try:
        for _ in range(repeats + 1):
            result = client.classify(payload)
            if not result.ok:
                raise RuntimeError(result.error)
            times.append(result.time_of_processing)
    finally:
        client.close()
    return round(statistics.median(times[1:]), 3)


def run(args: argparse.Namespace) -> dict:
    payload = phantom.study_files("series", slices=args.slices, rows=args.matrix, columns=args.matrix, pixel_spacing=0.7, slice_spacing=1.0)
    with rendered_server("cpu", args.size) as server:
        host = machine(args.size, server.http_url)
        results = measure(server, payload, levels=args.levels, requests=args.requests, rounds=args.rounds, repeats=args.repeats)
    shape = {"slices": args.slices, "rows": args.matrix, "columns": args.matrix}
    return {"command": args.command, "machine": host, "study": {**shape, "megabytes": round(sum(map(len, payload)) / 1e6, 1)}, **results}


def measure(server, payload: list[bytes], *, levels: list[int], requests: int, rounds: int, repeats: int) -> dict:
    """The measurements on a started server whose repository has the explanation models; it is left
    with them unloaded."""
    load_before = os.getloadavg()
    memory_loaded = rss_by_process(server.pid)
    single = {
        NAMES.triage: one_study_s(server.http_url, payload, explain=False, repeats=repeats),
        NAMES.triage_explain: one_study_s(server.http_url, payload, explain=True, repeats=repeats),
    }
    measured = []
    for number in range(rounds):
        for loaded in (True, False) if number % 2 == 0 else (False, True):
            set_explanations(server, loaded)
            if not loaded:  # an unloaded model's process exits after it reports unloaded: not during the measurement
                _after_stubs_exit(server.pid)
            for level in levels:
                result = closed_loop(NAMES.triage, triton_sender(server.http_url, payload), level, max(requests, 2 * level))
                measured.append({"round": number, "explanations_loaded": loaded, **result.to_dict()})
    set_explanations(server, False)
    memory_unloaded = _after_stubs_exit(server.pid)
    by_level = []
    for level in levels:
        rates = {
            loaded: [r["studies_per_s"] for r in measured if r["concurrency"] == level and r["explanations_loaded"] == loaded]
            for loaded in (True, False)
        }
        loaded_rate, unloaded_rate = round(statistics.median(rates[True]), 3), round(statistics.median(rates[False]), 3)
        by_level.append(
            {
                "concurrency": level,
                "studies_per_s_loaded": loaded_rate,
                "studies_per_s_unloaded": unloaded_rate,
                "ratio": round(loaded_rate / unloaded_rate, 3),
                "failures": sum(r["failures"] for r in measured if r["concurrency"] == level),
            }
        )
    unchanged = all(abs(level["ratio"] - 1) <= TOLERANCE and level["failures"] == 0 for level in by_level)
    return {
        "levels": by_level,
        "rounds": measured,
        "one_study_s": single,
        "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "memory_mib": {"explanations_loaded": memory_loaded, "explanations_unloaded": memory_unloaded},
        "target": {f"ct_triage throughput unchanged (ratio within 1 +/- {TOLERANCE:g})": {"tolerance": TOLERANCE, "met": unchanged}},
    }


def markdown(results: dict) -> str:
    host, study = results["machine"], results["study"]
    memory = results["memory_mib"]
    added = {name: value for name, value in memory["explanations_loaded"].items() if name not in memory["explanations_unloaded"]}
    lines = [
        f"# Explanations opt-in: ct_triage with and without the explanation models (S={host['size']})",
        "",
        f"`{results['command']}` on {host['date']}: {host['cpu']}, {host['available_cpus']} CPUs; {versions_text(host)}; "
        "demo weights, target cpu; "
        f"a phantom study of {study['slices']} slices of {study['rows']}x{study['columns']} ({study['megabytes']} MB), HTTP; "
        "the closed client loop of benchmarks.load; loaded and unloaded alternate within each round (medians over rounds). "
        f"Load average (1, 5, 15 min) {results['load_average']['before']} before, {results['load_average']['after']} after.",
        "",
        "| concurrency | studies/s, explanation models loaded | studies/s, unloaded | ratio | failures |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {lv['concurrency']} | {lv['studies_per_s_loaded']} | {lv['studies_per_s_unloaded']} | {lv['ratio']} | {lv['failures']} |"
        for lv in results["levels"]
    ]
    ((name, target),) = results["target"].items()
    single = results["one_study_s"]
    lines += [
        "",
        f"Target: {name}: **{'met' if target['met'] else 'not met'}**.",
        "",
        f"One study, median round trip: {NAMES.triage} {single[NAMES.triage]} s, {NAMES.triage_explain} {single[NAMES.triage_explain]} s "
        f"({single[NAMES.triage_explain] / single[NAMES.triage]:.2f}x: the price of asking for an explanation).",
        "",
        "Resident memory the loaded explanation models hold (MiB): "
        + ", ".join(f"{name} {value}" for name, value in added.items())
        + f"; tritonserver {memory['explanations_loaded'].get('tritonserver')} loaded, "
        + f"{memory['explanations_unloaded'].get('tritonserver')} unloaded.",
        "",
    ]
    return "\n".join(lines)


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.explain_opt_in",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser, levels=[1, 2], requests=24, rounds=4, compared="state")
    parser.add_argument(
        "--repeats", type=option_types.COUNT, default=3, metavar="N", help="studies timed one at a time per model, after one warm-up"
    )
    args = parser.parse_args(argv)
    args.command = option_types.command_line(parser, argv)
    results = run(args)
    write_results(args.out, f"explain-opt-in-cpu-s{args.size}", results, markdown(results))
    print(json.dumps({"levels": results["levels"], "one_study_s": results["one_study_s"], "target": results["target"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
