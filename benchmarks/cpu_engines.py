"""The CPU classifier engines side by side: which one the `cpu` target serves, and why.

    .venv/bin/python -m benchmarks.cpu_engines [--size 256] [--repeat 2] [--threads N] [--no-compile] [--no-served] [--out DIR]

Every engine runs the same exported network (demo weights, or --checkpoint) on the same chest-like
volume at S, one study per call, with the same number of threads; the engines take turns in each
round, so that all of them see the same minutes of a machine whose speed drifts. Engines:
- onnxruntime: the ONNX graph on ONNX Runtime's CPU provider, all graph optimisations, intra-op
  threads = N (the baseline the speed targets compare with);
- openvino: classifier.OpenVINOClassifier on the IR, what the cpu target serves (FP32, the default);
- openvino-bf16: the same at precision "bf16", what the cpu target serves when exported with
  `--precision bf16` (on a CPU without BF16 instructions OpenVINO computes in FP32: the table says
  which precision each OpenVINO engine used);
- pytorch / pytorch-channels-last: classifier.TorchClassifier at FP32 on the CPU, contiguous and
  channels-last-3d;
- pytorch-compile: torch.compile (inductor) of the channels-last model; its compile time is reported
  (it is paid at every server start);
- openvino-int8: what INT8 would give, which no target offers: the ONNX graph quantized by ONNX
  Runtime's static quantization (QDQ; weights int8 per channel, activations uint8 per tensor, MinMax
  ranges from 8 chest phantoms at --parity-size, none of them in the parity set), run by OpenVINO
  (int8 convolutions where the CPU has them, FP32 elsewhere).
Parity: each engine on export's parity set (7 volumes at --parity-size) against torch FP32: max |dP|
(and |dP| per volume) and whether every decision at the operating point agrees; an FP32 engine
passes at <= 1e-4, the BF16 and INT8 engines at export's half-precision bound (1e-2) with every
decision agreeing.
Rate: the arithmetic rate each engine reaches (the network's FLOPs at S over its time) against a
float32 matrix product's on the same machine, the best of 3 float32 4096x4096 products (numpy's
BLAS, its default threads) before and after the rounds: a reference, not a bound (a convolution
engine with better blocking reaches more than 100% of it), so an FP32 engine near it has little
FP32 speed left to find.
Served (unless --no-served): a repository rendered for the cpu target at S, the bundled tritonserver,
and one volume sent to ct_classifier, its round trip timed in every round after the engines', at
FP32 and with ct_classifier reloaded as `--precision bf16` renders it (unless --no-bf16), the two
precisions' order swapped every round (one reload per round, a warm-up call after each), so that
their ratios to ONNX Runtime compare the same rounds.
Writes cpu-engines.json and cpu-engines.md into --out, and prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime import quantization

from benchmarks import option_types
from benchmarks.gpu_check import study_tflop
from benchmarks.load import reload_classifier, rendered_server, write_results
from benchmarks.process_memory import cpu_model, cpuinfo_field
from classifier import OpenVINOClassifier, TorchClassifier, convert_to_openvino
from classifier.openvino_engine import openvino_version
from contract.arguments import integer
from export import build_classifier, demo_weights, load_checkpoint, onnx_graph
from export.parity import FP16_BOUND, FP32_BOUND, compare, parity_inputs, reference_probabilities
from export.volumes import chest
from preprocess.workers import available_cpus
from settings import NAMES, OPERATING_POINT, PREPROCESSING

Engine = Callable[[np.ndarray], np.ndarray]  # [B, 1, S, S, S] float32 -> probabilities [B, 2]
BASELINE = "onnxruntime"
SERVED_ENGINE = "openvino"
BF16_ENGINE = "openvino-bf16"  # the cpu target with --precision bf16
INT8_ENGINE = "openvino-int8"  # measured only: no target serves it
BOUNDS = {BF16_ENGINE: FP16_BOUND, INT8_ENGINE: FP16_BOUND}  # the engines held to a lower-precision bound; the others to FP32_BOUND
CALIBRATION_SEEDS = range(100, 108)  # INT8's calibration volumes: chest phantoms, half with a lesion, apart from the parity set's


def onnxruntime_engine(graph: Path, threads: int) -> Engine:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return lambda volumes: session.run([NAMES.probabilities], {NAMES.volume: volumes})[0]


def torch_engine(network, *, channels_last: bool) -> Engine:
    engine = TorchClassifier(copy.deepcopy(network), device="cpu", precision="fp32", channels_last=channels_last)
    return lambda volumes: engine(torch.from_numpy(volumes)).numpy()


def compiled_engine(network) -> Engine:
    """torch.compile (inductor) of the channels-last engine, for one static shape."""
    engine = TorchClassifier(copy.deepcopy(network), device="cpu", precision="fp32", channels_last=True)
    engine.model = torch.compile(engine.model, dynamic=False)
    return lambda volumes: engine(torch.from_numpy(volumes)).numpy()


class _CalibrationVolumes(quantization.CalibrationDataReader):
    """The calibration volumes, one [1, 1, S, S, S] input at a time, as ONNX Runtime's calibrator reads them."""

    def __init__(self, size: int):
        self.volumes = ({NAMES.volume: chest(size, seed, lesion=seed % 2 == 1).numpy()} for seed in CALIBRATION_SEEDS)

    def get_next(self) -> dict | None:
        return next(self.volumes, None)


def quantize_int8(graph: Path, ir: Path, size: int) -> None:
    """The FP32 graph with int8 QDQ pairs (ranges calibrated at S=`size`) as OpenVINO IR at `ir`.

    The spatial axes stay dynamic, so ranges calibrated at the parity size serve at any S."""
    quantized = graph.with_name("model-int8.onnx")
    logging.disable(logging.WARNING)  # ONNX Runtime's advice, on the root logger, to pre-process the graph: OpenVINO fuses it
    try:
        quantization.quantize_static(
            graph,
            quantized,
            _CalibrationVolumes(size),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
    finally:
        logging.disable(logging.NOTSET)
    convert_to_openvino(quantized, ir)


def build_engines(
    network, graph: Path, ir: Path, size: int, threads: int, compile_: bool, bf16: bool = True, int8_ir: Path | None = None
) -> tuple[dict[str, Engine], dict[str, float]]:
    """name -> engine at this S; and the seconds each took to build (compile included; INT8's
    quantization is not: it is done once, before)."""
    engines: dict[str, Engine] = {}
    build_s: dict[str, float] = {}
    builders = {
        BASELINE: lambda: onnxruntime_engine(graph, threads),
        SERVED_ENGINE: lambda: OpenVINOClassifier(ir, size=size, threads=threads),
        **({BF16_ENGINE: lambda: OpenVINOClassifier(ir, size=size, threads=threads, precision="bf16")} if bf16 else {}),
        **({INT8_ENGINE: lambda: OpenVINOClassifier(int8_ir, size=size, threads=threads)} if int8_ir else {}),
        "pytorch": lambda: torch_engine(network, channels_last=False),
        "pytorch-channels-last": lambda: torch_engine(network, channels_last=True),
    }
    for name, build in builders.items():
        started = time.perf_counter()
        engines[name] = build()
        build_s[name] = time.perf_counter() - started
    if compile_:
        started = time.perf_counter()
        engine = compiled_engine(network)
        engine(np.zeros((1, 1, size, size, size), np.float32))  # compiles on the first call
        engines["pytorch-compile"] = engine
        build_s["pytorch-compile"] = time.perf_counter() - started
    return engines, build_s


def parity_of(
    network, graph: Path, ir: Path, size: int, threads: int, compile_: bool, bf16: bool = True, int8_ir: Path | None = None
) -> dict[str, dict]:
    names, inputs = parity_inputs(size)
    reference = reference_probabilities(network, inputs)
    engines, _ = build_engines(network, graph, ir, size, threads, compile_, bf16, int8_ir)
    result = {}
    for name, engine in engines.items():
        probabilities = np.concatenate([engine(inputs[i : i + 1]) for i in range(len(names))])
        comparison = compare(names, probabilities, reference, OPERATING_POINT.threshold, BOUNDS.get(name, FP32_BOUND))
        result[name] = {
            "max_abs_dp": comparison.max_abs_diff,
            "abs_dp": dict(zip(names, np.abs(probabilities[:, 1] - reference[:, 1]).round(6).tolist())),
            "bound": comparison.bound,
            "decisions_agree": comparison.decisions_agree,
            "passed": comparison.passed,
        }
    torch._dynamo.reset()  # the timed build compiles afresh at S
    return result


def int8_in_use(engine: OpenVINOClassifier) -> str:
    """How many of the compiled model's convolutions run on int8 inputs: the CPU plugin falls back
    to FP32 kernels, in silence, where it has no int8 ones."""
    convolutions = [
        op for op in engine.compiled.get_runtime_model().get_ops() if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    ]
    int8 = [op for op in convolutions if op.get_rt_info()["runtimePrecision"].astype(str) in ("i8", "u8")]
    return f"int8 in {len(int8)} of {len(convolutions)} convolutions"


@contextmanager
def served_engine(server) -> Iterator[Engine]:
    """ct_classifier on a started server as one more engine: a volume's round trip over HTTP."""
    from tritonclient import http

    triton = http.InferenceServerClient(server.http_url, network_timeout=1800, connection_timeout=1800)

    def infer(volume: np.ndarray) -> np.ndarray:
        tensor = http.InferInput(NAMES.volume, list(volume.shape), "FP32")
        tensor.set_data_from_numpy(volume, binary_data=True)
        answer = triton.infer(NAMES.classifier, [tensor], outputs=[http.InferRequestedOutput(NAMES.probabilities, binary_data=True)])
        return answer.as_numpy(NAMES.probabilities)

    try:
        yield infer
    finally:
        triton.close()


def serve_at(server, precision: str) -> None:
    """ct_classifier reloaded as `export --precision <precision>` renders it: the same IR, that precision."""

    def edit(config: dict) -> None:
        config.setdefault("parameters", {})["precision"] = {"string_value": precision}

    served = reload_classifier(server, edit)["parameters"]["precision"]["string_value"]
    if served != precision:
        raise RuntimeError(f"{NAMES.classifier} serves precision {served} after its reload at {precision}")


def matmul_gflops(n: int = 4096, runs: int = 3) -> float:
    """The best float32 matrix-product rate of `runs` (2 n^3 FLOP each): the engines' rates are compared with it."""
    a, b = np.random.default_rng(0).random((2, n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def cpu_family() -> str | None:
    """x86 family/model/vendor as /proc/cpuinfo gives them (e.g. AMD family 25 = Zen 3/Zen 4)."""
    vendor, family, model = (cpuinfo_field(name) for name in ("vendor_id", "cpu family", "model"))
    return f"{vendor} family {family} model {model}" if family else None


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")


def cpu_flags() -> dict[str, bool]:
    """Which of the vector instruction sets that decide FP32/BF16 speed this CPU has."""
    flags = set((cpuinfo_field("flags") or "").split())
    return {flag: flag in flags for flag in VECTOR_FLAGS}


def markdown(result: dict) -> str:
    flags = result.get("cpu_flags") or {}
    lines = [
        f"# CPU classifier engines at S={result['size']} ({result['threads']} threads, {result['cpu']})",
        "",
        f"`{result['command']}` on {result['date']}.",
        "",
        f"CPU: {result['cpu']}, {result.get('cpu_family') or 'family unknown'}; "
        + (", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in flags.items()) or "flags unknown")
        + ".",
        "",
        f"One study per call, median of {result['repeat']} interleaved rounds after a warm-up; parity on export's "
        f"{result['parity_inputs']} volumes at {result['parity_size']}^3 against PyTorch FP32 "
        f"(bound {FP32_BOUND:g}; {FP16_BOUND:g} for {BF16_ENGINE} and {INT8_ENGINE}, "
        f"decisions at {OPERATING_POINT.threshold:g}).",
        "",
        f"Load average {result['load_before']} before, {result['load_after']} after (a shared machine). The network: "
        f"{result['study_gflop']:.0f} GFLOP per study at S={result['size']}. A float32 matrix product (numpy's BLAS): "
        f"{result['matmul_gflops'][0]:.1f} GFLOP/s before the rounds, {result['matmul_gflops'][1]:.1f} after.",
        "",
        "| engine | s / study | vs onnxruntime | GFLOP/s | vs float32 matmul | build s | parity max abs dP | bound | decisions agree"
        " | passes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, row in result["engines"].items():
        parity = result["parity"].get(name, {})
        label = name + (" (served)" if name == SERVED_ENGINE else "")
        if name in result.get("precision_in_use", {}):
            label += f" [{result['precision_in_use'][name]} in use]"
        if name == BF16_ENGINE:
            label += " (served with --precision bf16; FP16 bound)"
        if name == INT8_ENGINE:
            label += " (not offered; FP16 bound)"
        lines.append(
            f"| {label} | {row['median_s']:.2f} | {row['speedup_vs_onnxruntime']:.2f}x | "
            f"{row['gflops']:.1f} | {row['gflops'] / max(result['matmul_gflops']):.0%} | {row['build_s']:.1f} | "
            f"{parity.get('max_abs_dp', float('nan')):.1e} | {parity.get('bound', FP32_BOUND):g} | "
            f"{parity.get('decisions_agree', '-')} | {parity.get('passed', '-')} |"
        )
    if INT8_ENGINE in result["parity"]:
        int8 = result["parity"][INT8_ENGINE]
        lines += [
            "",
            f"INT8: ONNX Runtime's static quantization (QDQ, MinMax ranges from {len(CALIBRATION_SEEDS)} chest phantoms at "
            f"{result['parity_size']}^3, {result['int8_quantize_s']:.0f} s), run by OpenVINO. |dP| per parity volume: "
            + ", ".join(f"{name} {dp:.1e}" for name, dp in int8["abs_dp"].items())
            + ".",
        ]
    for key, precision in (("served", "fp32"), ("served_bf16", "bf16")):
        if result.get(key):
            served = result[key]
            lines += [
                "",
                f"Served at {precision}: ct_classifier on the bundled tritonserver (cpu target, OpenVINO"
                f"{', --precision bf16' if precision == 'bf16' else ''}), one [1, 1, {result['size']}^3] volume per "
                f"request over HTTP: median round trip {served['median_s']:.2f} s "
                f"(runs {', '.join(f'{s:.2f}' for s in served['runs_s'])}); "
                f"{served['speedup_vs_onnxruntime']:.2f}x ONNX Runtime's in-process time over the same rounds.",
            ]
    lines += ["", f"Fastest engine that passes parity in this run: **{result['fastest_passing']}**; the cpu target serves "
              f"**{SERVED_ENGINE}** (FP32; {BF16_ENGINE} when exported with --precision bf16). OpenVINO {result['versions']['openvino']}, "
              f"ONNX Runtime {result['versions']['onnxruntime']}, PyTorch {result['versions']['torch']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    weights = load_checkpoint(args.checkpoint) if args.checkpoint else demo_weights()
    network = build_classifier(weights)
    with tempfile.TemporaryDirectory(prefix="ct_triage_cpu_engines_") as scratch:  # 0.5 GB of graphs
        graph, ir = Path(scratch) / "model.onnx", Path(scratch) / "model.xml"
        onnx_graph.export_fp32(network, graph)
        convert_to_openvino(graph, ir)
        int8_ir = Path(scratch) / "model-int8.xml" if args.int8 else None
        if int8_ir:
            started = time.perf_counter()
            quantize_int8(graph, int8_ir, args.parity_size)
            quantize_s = time.perf_counter() - started
        parity = parity_of(network, graph, ir, args.parity_size, threads, args.compile, args.bf16, int8_ir)
        engines, build_s = build_engines(network, graph, ir, args.size, threads, args.compile, args.bf16, int8_ir)
    precision_in_use = {name: engine.precision_in_use for name, engine in engines.items() if isinstance(engine, OpenVINOClassifier)}
    if INT8_ENGINE in engines:
        precision_in_use[INT8_ENGINE] = int8_in_use(engines[INT8_ENGINE])
    volume = chest(args.size, 7, lesion=True).numpy()
    load_before = [round(load, 2) for load in os.getloadavg()]
    matmul = [matmul_gflops(args.matmul_n)]
    times: dict[str, list[float]] = {name: [] for name in engines}
    served_precisions = (["fp32", "bf16"] if args.bf16 else ["fp32"]) if args.served else []
    served_times: dict[str, list[float]] = {precision: [] for precision in served_precisions}
    with ExitStack() as stack:
        if args.served:  # ct_classifier alone is measured; it takes its turn in every round
            server = stack.enter_context(rendered_server("cpu", args.size, args.checkpoint, models=[NAMES.classifier]))
            served = stack.enter_context(served_engine(server))
            serving = "fp32"
            served(volume)  # warm-up
        for engine in engines.values():
            engine(volume)  # warm-up
        for k in range(args.repeat):
            for name, engine in engines.items():
                started = time.perf_counter()
                engine(volume)
                times[name].append(time.perf_counter() - started)
            for precision in served_precisions if k % 2 == 0 else served_precisions[::-1]:  # one reload per round
                if precision != serving:
                    serve_at(server, precision)
                    serving = precision
                    served(volume)  # warm-up after the reload
                started = time.perf_counter()
                served(volume)
                served_times[precision].append(time.perf_counter() - started)
    del engines
    matmul.append(matmul_gflops(args.matmul_n))
    gflop = study_tflop(args.size) * 1e3
    baseline = statistics.median(times[BASELINE])
    rows = {
        name: {
            "median_s": statistics.median(runs),
            "runs_s": [round(s, 3) for s in runs],
            "build_s": round(build_s[name], 2),
            "speedup_vs_onnxruntime": baseline / statistics.median(runs),
            "gflops": gflop / statistics.median(runs),
        }
        for name, runs in times.items()
    }
    passing = [name for name in rows if parity[name]["passed"]]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_family": cpu_family(),
        "cpu_flags": cpu_flags(),
        "load_before": load_before,
        "load_after": [round(load, 2) for load in os.getloadavg()],
        "study_gflop": gflop,
        "matmul_gflops": [round(rate, 1) for rate in matmul],
        "size": args.size,
        "threads": threads,
        "repeat": args.repeat,
        "parity_size": args.parity_size,
        "parity_inputs": len(parity_inputs(8)[0]),
        "weights": weights.source,
        "engines": rows,
        "parity": parity,
        "precision_in_use": precision_in_use,
        "fastest_passing": min(passing, key=lambda name: rows[name]["median_s"]) if passing else None,
        **({"int8_quantize_s": round(quantize_s, 1)} if int8_ir else {}),
        "versions": {"openvino": openvino_version(), "onnxruntime": ort.__version__, "torch": torch.__version__},
    }
    for precision, runs in served_times.items():
        result["served" if precision == "fp32" else "served_bf16"] = served_row(runs, baseline)
    return result


def served_row(runs: list[float], baseline: float) -> dict:
    median = statistics.median(runs)
    return {"median_s": median, "runs_s": [round(s, 3) for s in runs], "speedup_vs_onnxruntime": baseline / median}


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_engines",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--size",
        type=option_types.SIZE,
        default=PREPROCESSING.size,
        metavar="S",
        help="model input S every engine runs at, voxels per side",
    )
    parser.add_argument("--repeat", type=option_types.COUNT, default=2, metavar="N", help="timed rounds after the warm-up")
    parser.add_argument(
        "--threads", type=option_types.THREADS, default=0, metavar="N", help="threads per engine; 0: every CPU this process may use"
    )
    parser.add_argument(
        "--parity-size",
        type=option_types.SIZE,
        default=64,
        metavar="S",
        help="S of export's parity set and of the INT8 calibration volumes",
    )
    parser.add_argument(
        "--matmul-n",
        type=integer(16, 16384),
        default=4096,
        metavar="N",
        help="rows and columns of the float32 matrix product the engines' rates are compared with (4096: 137 GFLOP)",
    )
    parser.add_argument("--checkpoint", metavar="PATH", help="a checkpoint instead of the seeded demo weights; omitted: demo weights")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile's engine (minutes of compiling)"
    )
    parser.add_argument("--served", action=argparse.BooleanOptionalAction, default=True, help="the served measurement")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="OpenVINO at BF16 (engine and served)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="OpenVINO on the INT8-quantized graph")
    parser.add_argument(
        "--out", type=option_types.out_folder, default="benchmarks/results", metavar="DIR", help="folder for cpu-engines.json and .md"
    )
    args = parser.parse_args(argv)
    result = {"command": option_types.command_line(parser, argv), **run(args)}
    text = markdown(result)
    write_results(args.out, "cpu-engines", result, text)
    print(text)
    measured = {**result["engines"], **{key: result[key] for key in ("served", "served_bf16") if key in result}}
    summary = {name: {key: row[key] for key in ("median_s", "speedup_vs_onnxruntime")} for name, row in measured.items()}
    print(json.dumps({"fastest_passing": result["fastest_passing"], "engines": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
