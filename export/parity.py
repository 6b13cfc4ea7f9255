"""Proof that what a target serves computes what the checkpoint computes.

The reference is torch FP32 on the CPU. The cpu and openvino targets: OpenVINO FP32 on the IR vs
the reference; the cpu target at BF16 (an explicit opt-in) also OpenVINO BF16 vs OpenVINO FP32,
held to the half-precision bound. ONNX targets: ONNX Runtime FP32 vs the reference, FP16 vs FP32. The torch-gpu
target: the served engine at FP32 on its device vs the reference, at its
precision (FP16) vs FP32. On random and chest-like volumes: max abs difference of the
probabilities, agreement of the decision at the operating point, and batch > 1 giving the same
per-item result as batch 1.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from classifier import ResNet34Classifier, TorchClassifier
from preprocess.workers import available_cpus
from settings import NAMES

from . import volumes

# The bounds: the FP32 graph must be the checkpoint; FP16 may drift a little, never flip a decision.
FP32_BOUND = 1e-4
FP16_BOUND = 1e-2
BATCH_BOUND = 1e-5
PARITY_SEED = 1234
MAX_PARITY_SIZE = 64  # a 256^3 forward pass is ~4.5 TFLOP (about a minute here); parity runs smaller


@dataclass
class Comparison:
    """One engine against a reference on the same inputs."""

    max_abs_diff: float
    decisions_agree: bool
    disagreeing_inputs: list[str]
    bound: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.bound and self.decisions_agree


@dataclass
class ParityReport:
    """Kept as parity.json beside the artifacts and printed by the CLI.

    `comparisons` names each check "<engine>_vs_<reference>"; `not_checked` says which checks could
    not run where export ran, and why (the FP16 PyTorch engine needs a GPU)."""

    size: int
    threshold: float
    inputs: list[str]
    probability_of_pathology: dict[str, list[float]]  # engine -> one value per input
    comparisons: dict[str, Comparison]
    batch_size: int
    batch_vs_single_max_abs_diff: float
    device: str = "cpu"
    not_checked: list[str] = field(default_factory=list)
    precision_in_use: dict[str, str] = field(default_factory=dict)  # engine -> what it computed in, where the engine says
    notes: list[str] = field(default_factory=list)  # what a reader must know that is not a failure
    graphs: list[dict] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        found = [
            f"{name}: max abs diff {comparison.max_abs_diff:.2e} (bound {comparison.bound:.0e}), "
            f"decision differs on {comparison.disagreeing_inputs or 'none'}"
            for name, comparison in self.comparisons.items()
            if not comparison.passed
        ]
        if self.batch_vs_single_max_abs_diff > BATCH_BOUND:
            found.append(f"batch {self.batch_size} vs batch 1: max abs diff {self.batch_vs_single_max_abs_diff:.2e}")
        return found

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "failures": self.failures}

    def summary(self) -> str:
        checks = ", ".join(f"{name} {comparison.max_abs_diff:.1e}" for name, comparison in self.comparisons.items())
        agree = all(comparison.decisions_agree for comparison in self.comparisons.values())
        skipped = f"; not checked: {'; '.join(self.not_checked)}" if self.not_checked else ""
        skipped += f"; note: {'; '.join(self.notes)}" if self.notes else ""
        return (
            f"parity at {self.size}^3 on {len(self.inputs)} inputs ({self.device}): {checks}, "
            f"decisions at {self.threshold:g} agree: {agree}, "
            f"batch {self.batch_size} vs 1: {self.batch_vs_single_max_abs_diff:.1e}{skipped} -> " + ("PASSED" if self.passed else "FAILED")
        )


def parity_inputs(size: int, seed: int = PARITY_SEED) -> tuple[list[str], np.ndarray]:
    """Named [N, 1, S, S, S] float32 inputs: random, smooth, chest-like and empty (air) volumes."""
    generator = torch.Generator().manual_seed(seed)
    named = [
        ("uniform-0", volumes.uniform(size, generator)),
        ("uniform-1", volumes.uniform(size, generator)),
        ("smooth-0", volumes.smooth(1, size, generator)),
        ("smooth-1", volumes.smooth(1, size, generator)),
        ("chest", volumes.chest(size, seed, lesion=False)),
        ("chest-lesion", volumes.chest(size, seed + 1, lesion=True)),
        ("air", torch.full((1, 1, size, size, size), -1.0)),
    ]
    return [name for name, _ in named], torch.cat([volume for _, volume in named]).numpy()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def compare(names: list[str], probabilities: np.ndarray, reference: np.ndarray, threshold: float, bound: float) -> Comparison:
    disagree = [
        name
        for name, value, expected in zip(names, probabilities[:, 1], reference[:, 1])
        if (value >= threshold) != (expected >= threshold)
    ]
    return Comparison(float(np.abs(probabilities - reference).max()), not disagree, disagree, bound)


def check_parity(classifier: ResNet34Classifier, fp32_path: Path, fp16_path: Path, *, size: int, threshold: float) -> ParityReport:
    """Run every engine on the same inputs and compare; the caller decides what a failure means."""
    names, inputs = parity_inputs(size)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    reference = reference_probabilities(classifier, inputs)
    timings["torch_fp32"] = time.perf_counter() - started

    started = time.perf_counter()
    fp32 = _session(fp32_path)
    batched = fp32.run([NAMES.probabilities], {NAMES.volume: inputs})[0]
    timings["onnx_fp32"] = time.perf_counter() - started

    started = time.perf_counter()
    single = np.concatenate([fp32.run([NAMES.probabilities], {NAMES.volume: inputs[i : i + 1]})[0] for i in range(len(names))])
    timings["onnx_fp32_batch1"] = time.perf_counter() - started
    del fp32

    started = time.perf_counter()
    half = _session(fp16_path).run([NAMES.probabilities], {NAMES.volume: inputs})[0]
    timings["onnx_fp16"] = time.perf_counter() - started

    return ParityReport(
        size=size,
        threshold=threshold,
        inputs=names,
        probability_of_pathology={
            "torch_fp32": reference[:, 1].tolist(),
            "onnx_fp32": batched[:, 1].tolist(),
            "onnx_fp16": half[:, 1].tolist(),
        },
        comparisons={
            "onnx_fp32_vs_torch": compare(names, batched, reference, threshold, FP32_BOUND),
            "onnx_fp16_vs_onnx_fp32": compare(names, half, batched, threshold, FP16_BOUND),
        },
        batch_size=len(names),
        batch_vs_single_max_abs_diff=float(np.abs(batched - single).max()),
        timings_s={stage: round(seconds, 3) for stage, seconds in timings.items()},
    )


def check_openvino_parity(
    classifier: ResNet34Classifier, ir_path: Path, *, size: int, threshold: float, precision: str = "fp32"
) -> ParityReport:
    """The cpu and openvino targets' IR, run by OpenVINO at FP32 as the served model runs it (shape
    fixed at `size`, batch 1 and a batch of every input) against torch FP32. At precision "bf16" (the
    cpu target's opt-in) also OpenVINO BF16 against OpenVINO FP32, within FP16_BOUND and with the same
    decisions; the report records the precision OpenVINO used, and says so where this CPU has no BF16
    and OpenVINO computed in FP32 instead (not a failure: that is what such a CPU serves)."""
    from classifier import OpenVINOClassifier  # GPU servers need no OpenVINO

    names, inputs = parity_inputs(size)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    reference = reference_probabilities(classifier, inputs)
    timings["torch_fp32"] = time.perf_counter() - started
    engine = OpenVINOClassifier(ir_path, size=size, threads=available_cpus())
    started = time.perf_counter()
    batched = engine(inputs)
    timings["openvino_fp32"] = time.perf_counter() - started
    started = time.perf_counter()
    single = np.concatenate([engine(inputs[i : i + 1]) for i in range(len(names))])
    timings["openvino_fp32_batch1"] = time.perf_counter() - started
    probabilities = {"torch_fp32": reference[:, 1].tolist(), "openvino_fp32": batched[:, 1].tolist()}
    comparisons = {"openvino_fp32_vs_torch": compare(names, batched, reference, threshold, FP32_BOUND)}
    in_use = {"openvino_fp32": engine.precision_in_use}
    notes = []
    if precision != "fp32":
        del engine
        lower = OpenVINOClassifier(ir_path, size=size, threads=available_cpus(), precision=precision)
        started = time.perf_counter()
        lowered = lower(inputs)
        timings[f"openvino_{precision}"] = time.perf_counter() - started
        probabilities[f"openvino_{precision}"] = lowered[:, 1].tolist()
        comparisons[f"openvino_{precision}_vs_openvino_fp32"] = compare(names, lowered, batched, threshold, FP16_BOUND)
        in_use[f"openvino_{precision}"] = lower.precision_in_use
        if lower.precision_in_use != precision:
            notes.append(
                f"OpenVINO computed in {lower.precision_in_use}, not {precision}, on this CPU (no {precision} instructions): "
                f"a CPU that has them serves {precision}, one that has not serves {lower.precision_in_use}"
            )
    return ParityReport(
        size=size,
        threshold=threshold,
        inputs=names,
        probability_of_pathology=probabilities,
        comparisons=comparisons,
        batch_size=len(names),
        batch_vs_single_max_abs_diff=float(np.abs(batched - single).max()),
        precision_in_use=in_use,
        notes=notes,
        timings_s={stage: round(seconds, 3) for stage, seconds in timings.items()},
    )


def reference_probabilities(classifier: ResNet34Classifier, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(classifier.eval()(torch.from_numpy(inputs)), dim=1).numpy()


def check_torch_parity(classifier: ResNet34Classifier, *, device: str, precision: str, size: int, threshold: float) -> ParityReport:
    """The torch-gpu target's engine on `device`. Half precision needs a GPU (on a CPU it has no
    fast kernels: minutes per volume), so on a CPU only FP32 is checked and the report says so."""
    names, inputs = parity_inputs(size)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    reference = reference_probabilities(classifier, inputs)
    timings["torch_fp32"] = time.perf_counter() - started
    volumes = torch.from_numpy(inputs)

    def run(engine_precision: str) -> tuple[np.ndarray, np.ndarray | None]:
        engine = TorchClassifier(copy.deepcopy(classifier), device=device, precision=engine_precision)
        started = time.perf_counter()
        batched = engine(volumes).cpu().numpy()
        timings[f"served_{engine_precision}"] = time.perf_counter() - started
        if engine_precision != "fp32":
            return batched, None
        started = time.perf_counter()
        single = np.concatenate([engine(volumes[i : i + 1]).cpu().numpy() for i in range(len(names))])
        timings["served_fp32_batch1"] = time.perf_counter() - started
        return batched, single

    fp32, single = run("fp32")
    probabilities = {"torch_fp32": reference[:, 1].tolist(), "served_fp32": fp32[:, 1].tolist()}
    comparisons = {"served_fp32_vs_torch": compare(names, fp32, reference, threshold, FP32_BOUND)}
    not_checked = []
    if precision != "fp32" and torch.device(device).type == "cuda":
        half, _ = run(precision)
        probabilities[f"served_{precision}"] = half[:, 1].tolist()
        comparisons[f"served_{precision}_vs_served_fp32"] = compare(names, half, fp32, threshold, FP16_BOUND)
    elif precision != "fp32":
        not_checked.append(f"served {precision} vs fp32: needs a CUDA device (benchmarks/gpu_check.sh checks it on the GPU)")
    return ParityReport(
        size=size,
        threshold=threshold,
        inputs=names,
        probability_of_pathology=probabilities,
        comparisons=comparisons,
        batch_size=len(names),
        batch_vs_single_max_abs_diff=float(np.abs(fp32 - single).max()),
        device=str(device),
        not_checked=not_checked,
        timings_s={stage: round(seconds, 3) for stage, seconds in timings.items()},
    )
