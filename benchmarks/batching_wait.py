"""The classifier's dynamic-batching wait (`max_queue_delay_microseconds`): what it buys or costs.

`python -m benchmarks.batching_wait [--target cpu] [--size 64] [--waits 20000 0] [--levels 1 4] [--rounds 4] [--out DIR]`

One bundled tritonserver on a rendered repository (demo weights). ct_triage is measured by the closed
client loop (benchmarks.load) with ct_classifier reloaded to each wait through Triton's model-control
API (its served config with only the wait changed; no reload to the wait it already serves), the
order of the waits reversed every other round so that every wait sees the same minutes of a shared
machine; medians over the rounds. What each target's config waits comes from this. Writes
batching-wait-<target>-s<S>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks import option_types
from benchmarks.load import add_arguments, closed_loop, reload_classifier, rendered_server, study_timeout, triton_sender, write_results
from benchmarks.serving import machine, versions_text
from preprocess import phantom
from settings import NAMES


def served_wait(url: str) -> int:
    """The batching wait ct_classifier serves now, in microseconds."""
    from tritonclient import http

    client = http.InferenceServerClient(url)
    try:
        return _wait_of(client.get_model_config(NAMES.classifier))
    finally:
        client.close()


def _wait_of(config: dict) -> int:
    return int(config["dynamic_batching"].get("max_queue_delay_microseconds", 0))


def set_wait(server, wait_us: int) -> None:
    """Reload ct_classifier with its served config but for the batching wait."""

    def wait(config: dict) -> None:
        config.setdefault("dynamic_batching", {})["max_queue_delay_microseconds"] = wait_us

    served = _wait_of(reload_classifier(server, wait))
    if served != wait_us:
        raise RuntimeError(f"{NAMES.classifier} serves a wait of {served} us, not {wait_us}")


def measure(
    server,
    payload: list[bytes],
    *,
    waits: list[int],
    levels: list[int],
    requests: int,
    rounds: int,
    shared_memory: bool = False,
    ends: float | None = None,
) -> dict:
    """The measurements on a started server (studies through system shared memory when `shared_memory`);
    its classifier is left at the last wait measured. ct_classifier is reloaded only when the next wait
    is not the one it serves (a reload starts a new stub: on a GPU, CUDA and cuDNN's autotuning again).
    With `ends` (time.monotonic), a round starts only while the time left holds the longest round so
    far, and each study times out so that its level ends by then."""
    measured, rounds_s = [], []
    current = served_wait(server.http_url)
    for number in range(rounds):
        if ends is not None and rounds_s and ends - time.monotonic() < max(rounds_s):
            break
        started = time.monotonic()
        for wait in waits if number % 2 == 0 else waits[::-1]:
            if wait != current:
                set_wait(server, wait)
                current = wait
            for level in levels:
                count = max(requests, 2 * level)
                timeout = {} if ends is None else {"timeout_s": study_timeout(ends, level, count)}
                sender = triton_sender(server.http_url, payload, shared_memory=shared_memory, **timeout)
                result = closed_loop(NAMES.triage, sender, level, count)
                measured.append({"round": number, "wait_us": wait, **result.to_dict()})
        rounds_s.append(time.monotonic() - started)
    summary = []
    for level in levels:
        for wait in waits:
            mine = [r for r in measured if r["concurrency"] == level and r["wait_us"] == wait]
            summary.append(
                {
                    "concurrency": level,
                    "wait_us": wait,
                    "studies_per_s": round(statistics.median(r["studies_per_s"] for r in mine), 3),
                    "p50_s": round(statistics.median(r["p50_s"] for r in mine), 4),
                    "p95_s": round(statistics.median(r["p95_s"] for r in mine), 4),
                    "failures": sum(r["failures"] for r in mine),
                }
            )
    return {"summary": summary, "rounds": measured}


def run(args: argparse.Namespace) -> dict:
    payload = phantom.study_files(
        "series", slices=args.slices, rows=args.matrix, columns=args.matrix, pixel_spacing=400.0 / args.matrix, slice_spacing=2.5
    )
    with rendered_server(args.target, args.size, models=[NAMES.triage]) as server:  # ct_triage is what it measures
        host = machine(args.size, server.http_url)
        results = measure(server, payload, waits=args.waits, levels=args.levels, requests=args.requests, rounds=args.rounds)
    study = {"slices": args.slices, "rows": args.matrix, "columns": args.matrix, "megabytes": round(sum(map(len, payload)) / 1e6, 1)}
    return {"command": args.command, "machine": host, "target": args.target, "requests": args.requests, "study": study, **results}


def markdown(results: dict) -> str:
    host, study = results["machine"], results["study"]
    rounds = 1 + max(r["round"] for r in results["rounds"])
    lines = [
        f"# The classifier's batching wait: {results['target']} target, S={host['size']}",
        "",
        f"`{results['command']}` on {host['date']}: {host['cpu']}, {host['available_cpus']} CPUs; {versions_text(host)}; "
        f"demo weights; a phantom study of {study['slices']} slices "
        f"of {study['rows']}x{study['columns']} ({study['megabytes']} MB), HTTP; the closed client loop of benchmarks.load, "
        f"{results['requests']} studies per run; ct_classifier reloaded to each wait, the waits' order reversed every other round; "
        f"medians over {rounds} rounds.",
        "",
        "| concurrency | wait (µs) | studies/s | p50 s | p95 s | failures |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['concurrency']} | {r['wait_us']} | {r['studies_per_s']} | {r['p50_s']} | {r['p95_s']} | {r['failures']} |"
        for r in results["summary"]
    ]
    return "\n".join(lines) + "\n"


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    import export

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batching_wait",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", default="cpu", choices=export.TARGETS, help="the export target whose classifier is measured")
    parser.add_argument(
        "--waits",
        type=option_types.WAIT_US,
        nargs="+",
        default=[20000, 0],
        metavar="US",
        help="the classifier's batching waits compared (max_queue_delay_microseconds), µs",
    )
    add_arguments(parser, levels=[1, 4], requests=16, rounds=4, compared="wait")
    args = parser.parse_args(argv)
    args.command = option_types.command_line(parser, argv)
    results = run(args)
    write_results(args.out, f"batching-wait-{args.target}-s{args.size}", results, markdown(results))
    print(json.dumps({"summary": results["summary"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
