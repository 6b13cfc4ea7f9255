"""Proof that the exported graphs compute what the checkpoint computes.

torch FP32 (the reference) vs ONNX Runtime FP32 vs ONNX Runtime FP16 on random and chest-like
volumes: max abs difference of the probabilities, agreement of the decision at the operating
point, and batch > 1 giving the same per-item result as batch 1.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from settings import NAMES

from . import volumes
from .network import ResNet34Classifier

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
    """Kept as parity.json beside the artifacts and printed by the CLI."""

    size: int
    threshold: float
    inputs: list[str]
    probability_of_pathology: dict[str, list[float]]  # engine -> one value per input
    onnx_fp32_vs_torch: Comparison
    onnx_fp16_vs_onnx_fp32: Comparison
    onnx_fp16_vs_torch: Comparison
    batch_size: int
    batch_vs_single_max_abs_diff: float
    graphs: list[dict] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        found = []
        for name in ("onnx_fp32_vs_torch", "onnx_fp16_vs_onnx_fp32"):
            comparison: Comparison = getattr(self, name)
            if not comparison.passed:
                found.append(
                    f"{name}: max abs diff {comparison.max_abs_diff:.2e} (bound {comparison.bound:.0e}), "
                    f"decision differs on {comparison.disagreeing_inputs or 'none'}"
                )
        if self.batch_vs_single_max_abs_diff > BATCH_BOUND:
            found.append(f"batch {self.batch_size} vs batch 1: max abs diff {self.batch_vs_single_max_abs_diff:.2e}")
        return found

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "failures": self.failures}

    def summary(self) -> str:
        return (
            f"parity at {self.size}^3 on {len(self.inputs)} inputs: "
            f"ONNX FP32 vs torch {self.onnx_fp32_vs_torch.max_abs_diff:.1e}, "
            f"FP16 vs FP32 {self.onnx_fp16_vs_onnx_fp32.max_abs_diff:.1e}, "
            f"decisions at {self.threshold:g} agree: "
            f"{self.onnx_fp32_vs_torch.decisions_agree and self.onnx_fp16_vs_onnx_fp32.decisions_agree}, "
            f"batch {self.batch_size} vs 1: {self.batch_vs_single_max_abs_diff:.1e} -> " + ("PASSED" if self.passed else "FAILED")
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


def _compare(names: list[str], probabilities: np.ndarray, reference: np.ndarray, threshold: float, bound: float) -> Comparison:
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
    with torch.no_grad():
        reference = torch.softmax(classifier.eval()(torch.from_numpy(inputs)), dim=1).numpy()
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
        onnx_fp32_vs_torch=_compare(names, batched, reference, threshold, FP32_BOUND),
        onnx_fp16_vs_onnx_fp32=_compare(names, half, batched, threshold, FP16_BOUND),
        onnx_fp16_vs_torch=_compare(names, half, reference, threshold, FP16_BOUND),
        batch_size=len(names),
        batch_vs_single_max_abs_diff=float(np.abs(batched - single).max()),
        timings_s={stage: round(seconds, 3) for stage, seconds in timings.items()},
    )
