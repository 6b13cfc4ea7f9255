"""Checks a running deployment end to end and prints a pass/fail summary (deploy/verify.sh runs it).

1. ready: the server and ct_triage answer ready over HTTP and gRPC, and the server metadata names Triton
   (a server still starting is waited for, a port that answers but not as Triton fails at once; when
   it fails, the other checks are SKIP: nothing there answers them);
2. studies: generated chest studies through ct_triage over HTTP and gRPC give a result with the
   model's provenance, the same probability on both protocols, and a file that is not DICOM gets a
   clear refusal (not an internal error);
3. parity: the parity set (export's 7 volumes) at the served S through ct_classifier, against the
   FP32 reference of the same export: ONNX Runtime on the FP32 graph (model.onnx in the repository,
   or in the artifacts: the graph the OpenVINO IR or a TensorRT plan was built from), else PyTorch FP32 on the exported
   weights; bounds of the export: <= 1e-4 for an FP32 target, <= 1e-2 for FP16, same decisions;
4. sweep: perf_analyzer on ct_triage at concurrency 1 and 2 (SKIP, and why, when perf_analyzer is
   not installed: it counts neither as passed nor as failed);
5. metrics: the metrics endpoint Prometheus scrapes serves Triton's counters and the service's own
   (settings.METRICS): the 4 answers and the refusal of check 2 counted (at least: other traffic
   adds its own), and the threshold gauge equal to the threshold ct_postprocess is configured with (an
   endpoint that serves no Prometheus text fails this check alone, in one line).
Every check reports in one line. Exit status 0 only if every check that ran passed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import urllib.request
from http.client import HTTPException
from pathlib import Path

import numpy as np

# Triton answers health and metadata in milliseconds: a request that gets nothing in this time meets a
# hung server or another service, which waiting longer does not change.
READY_TIMEOUT_S = 10
# A server still starting refuses connections or answers "not ready": retried for this long. A port
# that answers, but not as Triton (another service, Triton's metrics port), fails at once.
READY_WAIT_S = 60


class Skipped(Exception):
    """A check that cannot run here: printed as SKIP with why, counted neither as passed nor as failed."""


def _ready(http: str, grpc: str) -> str:
    from client import NotTritonError, ServerUnavailable, TriageClient

    for url, protocol in ((http, "http"), (grpc, "grpc")):
        deadline = time.monotonic() + READY_WAIT_S
        while True:
            tried = time.monotonic()
            try:
                with TriageClient(url, protocol, timeout_s=READY_TIMEOUT_S) as triage:
                    triage.check_ready()
                break
            except ServerUnavailable as error:
                if isinstance(error, NotTritonError):
                    raise AssertionError(f"{protocol} {url}: {error}") from None
                if time.monotonic() - tried >= READY_TIMEOUT_S:
                    raise AssertionError(f"{protocol} {url}: {error} ({READY_TIMEOUT_S} s)") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"{protocol} {url}: {error}") from None
                time.sleep(2)
    return "server and ct_triage ready over HTTP and gRPC"


def _not_ready() -> str:
    raise Skipped("not run: the server did not answer ready")


def _config(http: str, model: str) -> dict:
    """The config `model` is served with; AssertionError in one line when --http answers no JSON
    (another port: Triton's metrics port answers every path with its metrics)."""
    with urllib.request.urlopen(f"http://{http}/v2/models/{model}/config", timeout=30) as response:
        body = response.read()
    try:
        return json.loads(body)
    except ValueError:  # JSONDecodeError, or bytes that are no UTF-8
        raise AssertionError(f"{http} answered {model}'s config with {body[:60]!r}, not JSON: is it Triton's HTTP port?") from None


def _studies(http: str, grpc: str, work: Path) -> tuple[str, dict]:
    from client import TriageClient
    from preprocess import phantom

    provenance = {}
    for seed in (0, 1):
        study = phantom.write_study(work / f"study_{seed}.zip", form="zip", seed=seed)
        answers = {}
        for url, protocol in ((http, "http"), (grpc, "grpc")):
            with TriageClient(url, protocol) as triage:
                result = triage.classify(study)
            assert result.ok, f"{protocol}: study {seed} failed: {result.error}"
            answers[protocol] = result
        difference = abs(answers["http"].probability_of_pathology - answers["grpc"].probability_of_pathology)
        assert difference <= 1e-2, f"study {seed}: HTTP and gRPC answers differ by {difference:.1e}"
        provenance = answers["http"].meta.get("provenance", {})
        assert provenance.get("target"), "the answer's META carries no model provenance"
    broken = work / "not_dicom.zip"
    broken.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty ZIP: no DICOM in it
    with TriageClient(http, "http") as triage:
        refused = triage.classify(broken)
    assert not refused.ok and "internal" not in (refused.error or "").lower(), f"a study with no DICOM got: {refused.error}"
    return f"2 studies over HTTP and gRPC agree; an empty study is refused ({refused.error})", provenance


def _reference(repository: Path, artifacts: Path, volumes: np.ndarray) -> tuple[str, np.ndarray]:
    from settings import NAMES

    for graph in (repository / NAMES.classifier / "1" / "model.onnx", artifacts / "model.onnx"):
        if graph.is_file():
            import onnxruntime as ort

            session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
            return f"ONNX Runtime FP32 on {graph.name}", np.concatenate(
                [session.run([NAMES.probabilities], {NAMES.volume: volumes[i : i + 1]})[0] for i in range(len(volumes))]
            )
    import torch

    from classifier import ResNet34Classifier

    weights = artifacts / "weights.pt"
    if not weights.is_file():
        raise AssertionError(f"no FP32 reference: neither model.onnx nor {weights} found")
    model = ResNet34Classifier.from_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    with torch.inference_mode():
        return "PyTorch FP32 on weights.pt", torch.cat([torch.softmax(model(torch.from_numpy(v[None])), 1) for v in volumes]).numpy()


def _parity(http: str, repository: Path, artifacts: Path, provenance: dict, inputs: int) -> str:
    import tritonclient.http as triton_http

    from export.parity import FP16_BOUND, FP32_BOUND, compare, parity_inputs
    from settings import NAMES, OPERATING_POINT

    size = int(_config(http, NAMES.classifier)["input"][0]["dims"][-1])
    names, volumes = parity_inputs(size)
    names, volumes = names[:inputs], volumes[:inputs]
    client = triton_http.InferenceServerClient(http, network_timeout=600)
    served = []
    try:
        for volume in volumes:
            tensor = triton_http.InferInput(NAMES.volume, [1, *volume.shape], "FP32")
            tensor.set_data_from_numpy(volume[None])
            served.append(client.infer(NAMES.classifier, [tensor]).as_numpy(NAMES.probabilities)[0])
    finally:
        client.close()
    served = np.stack(served)
    source, reference = _reference(repository, artifacts, volumes)
    bound = FP32_BOUND if provenance.get("precision") == "fp32" else FP16_BOUND
    comparison = compare(names, served, reference, OPERATING_POINT.threshold, bound)
    summary = (
        f"served {provenance.get('target')} ({provenance.get('precision')}) vs {source} on {len(names)} volumes at {size}^3: "
        f"max |dP| {comparison.max_abs_diff:.1e} (bound {bound:.0e}), decisions differ on {comparison.disagreeing_inputs or 'none'}"
    )
    assert comparison.passed, summary
    return summary


def _sweep(grpc: str, work: Path) -> str:
    from benchmarks import perf_analyzer
    from preprocess import phantom
    from settings import NAMES

    if not perf_analyzer.installed():
        raise Skipped("perf_analyzer is not installed (python -m benchmarks.perf_analyzer install)")
    data = work / "study.json"
    data.write_text(json.dumps(perf_analyzer.input_data(phantom.study_files("zip", seed=2))))
    rows = [
        perf_analyzer.run(NAMES.triage, grpc, "grpc", level, work / f"sweep_c{level}.csv", input_json=data, requests=8) for level in (1, 2)
    ]
    return "; ".join(
        f"concurrency {row['Concurrency']}: {row['throughput']:.2f} studies/s, p95 {row['p95 latency'] / 1e6:.2f} s" for row in rows
    )


def _counted(samples: dict) -> dict[str, float]:
    """The service's answers and refusals in a scrape, summed over their labels."""
    from settings import METRICS

    return {name: sum(value for (sample, _), value in samples.items() if sample == name) for name in (METRICS.decisions, METRICS.refused)}


def _scrape(metrics: str) -> dict:
    """The samples at the metrics endpoint; AssertionError in one line when it serves none."""
    from serve.metrics import scrape

    try:
        return scrape(f"http://{metrics}/metrics", timeout_s=30)
    except HTTPException as error:  # an answer that is not HTTP (the gRPC port): its bytes say nothing readable
        raise AssertionError(f"{metrics} does not answer HTTP ({type(error).__name__}): is it Triton's metrics port?") from None
    except (OSError, ValueError) as error:  # unreachable, or a page that is not Prometheus text
        raise AssertionError(f"no metrics at {metrics} ({error}): is it Triton's metrics port?") from None


def _counts(metrics: str) -> dict[str, float]:
    """The service's counters at the metrics endpoint before the studies (empty when it cannot be read:
    the metrics check says why)."""
    try:
        return _counted(_scrape(metrics))
    except AssertionError:
        return {}


def _metrics(metrics: str, http: str, before: dict[str, float], answered: int, refused: int) -> str:
    """The endpoint serves Triton's counters and the service's, counted at least `answered` answers and
    `refused` refusals since `before` (the studies check sent them), and shows the threshold in force."""
    from contract import parse_threshold
    from settings import METRICS, NAMES

    samples = _scrape(metrics)
    names = {sample for sample, _ in samples}
    assert "nv_inference_request_success" in names, f"no Triton counters at {metrics}: is it Triton's metrics port?"
    expected = (METRICS.decisions, f"{METRICS.probability}_count", METRICS.threshold, METRICS.refused)
    missing = [name for name in expected if name not in names]
    assert not missing, f"the service's metrics are missing at {metrics}: {', '.join(missing)}"
    added = {name: value - before.get(name, value) for name, value in _counted(samples).items()}
    counted = f"{metrics} counted {added[METRICS.decisions]:g} answers and {added[METRICS.refused]:g} refusals"
    counted += f" of the {answered} and {refused} sent"
    assert added[METRICS.decisions] >= answered and added[METRICS.refused] >= refused, f"{counted}: is it the server --http reaches?"
    configured = parse_threshold(_config(http, NAMES.postprocess)["parameters"]["threshold"]["string_value"])
    in_force = samples[(METRICS.threshold, ())]
    assert math.isclose(in_force, configured, rel_tol=1e-9), f"{METRICS.threshold} is {in_force!r}, the served config says {configured!r}"
    return f"{counted}; threshold {in_force:g} as configured"


def check(results: list[tuple[str, str, str]], name: str, run) -> None:
    """Run one check, record (name, PASS|FAIL|SKIP, what it found, in one line) and print it: every
    check reports, one failure does not hide the others."""
    try:
        outcome, found = "PASS", run()
    except Skipped as reason:
        outcome, found = "SKIP", str(reason)
    except Exception as error:
        outcome, found = "FAIL", str(error) if isinstance(error, AssertionError) else f"{type(error).__name__}: {error}"
    results.append((name, outcome, " ".join(found.split())))  # a tool's multi-line output (perf_analyzer's) on one line
    print(f"{outcome}  {name}: {results[-1][2]}", flush=True)


def summary(results: list[tuple[str, str, str]]) -> str:
    ran = [(name, outcome) for name, outcome, _ in results if outcome != "SKIP"]
    failed = [name for name, outcome in ran if outcome == "FAIL"]
    skipped = [name for name, outcome, _ in results if outcome == "SKIP"]
    return (
        f"verify: {len(ran) - len(failed)}/{len(ran)} checks passed"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
        + (f"; SKIPPED: {', '.join(skipped)}" if skipped else "")
    )


def main(argv: list[str] | None = None) -> int:
    from settings import SERVING

    parser = argparse.ArgumentParser(
        prog="deploy/verify.sh",
        description=__doc__.splitlines()[0],
        epilog="Without --local, deploy/verify.sh runs this inside the compose file's `triton` container; "
        "with --local, here (deploy/verify.sh --local [OPTIONS]).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--http", default=f"localhost:{SERVING.http_port}", metavar="HOST:PORT", help="Triton's HTTP endpoint")
    parser.add_argument("--grpc", default=f"localhost:{SERVING.grpc_port}", metavar="HOST:PORT", help="Triton's gRPC endpoint")
    parser.add_argument("--metrics", default=f"localhost:{SERVING.metrics_port}", metavar="HOST:PORT", help="Triton's metrics endpoint")
    parser.add_argument(
        "--repository",
        default="/models/ct-triage",
        metavar="DIR",
        help="the served repository folder, for its FP32 graph (the default is its path in the triton container)",
    )
    parser.add_argument(
        "--artifacts",
        default="/models/ct-triage.artifacts",
        metavar="DIR",
        help="export's artifacts folder: weights, the graph a plan came from (the default is its path in the triton container)",
    )
    parser.add_argument(
        "--parity-inputs",
        type=int,
        choices=range(1, 8),
        default=7,
        metavar="1-7",
        help="how many of the parity set's 7 volumes to compare (its first ones)",
    )
    args = parser.parse_args(argv)
    results: list[tuple[str, str, str]] = []
    provenance: dict = {}
    with tempfile.TemporaryDirectory(prefix="ct-triage-verify-") as folder:
        work = Path(folder)

        def studies() -> str:
            nonlocal provenance
            found, provenance = _studies(args.http, args.grpc, work)
            return found

        check(results, "ready", lambda: _ready(args.http, args.grpc))
        ready = results[-1][1] == "PASS"
        counted_before = _counts(args.metrics) if ready else {}
        checks = {
            "studies": studies,
            "parity": lambda: _parity(args.http, Path(args.repository), Path(args.artifacts), provenance, args.parity_inputs),
            "sweep": lambda: _sweep(args.grpc, work),
            "metrics": lambda: _metrics(args.metrics, args.http, counted_before, answered=4, refused=1),
        }
        for name, run in checks.items():
            # each would wait out its own timeouts against a server that did not even answer ready
            check(results, name, run if ready else _not_ready)
    print(summary(results))
    failed = [name for name, outcome, _ in results if outcome == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
