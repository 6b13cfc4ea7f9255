"""The operating-point rule and the response META, as pure functions.

ct_postprocess applies them; export and the operating-point client validate thresholds with the
same `parse_threshold`, so the rule exists once and is tested without a server.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import numpy as np

from settings import NAMES

from .errors import ContractError


class DecisionError(ContractError):
    """Classifier output or operating point that cannot give a trustworthy decision."""


class MetaError(ContractError):
    """A META that is not ct_preprocess's JSON object (a client calling a later model itself)."""


@dataclass(frozen=True)
class Decision:
    """P(pathology) and the 0/1 decision at the operating point that produced it."""

    probability: float
    pathology: int
    threshold: float


def parse_threshold(value: str | float) -> float:
    """Operating point from a config parameter; a bad value must stop the model from loading."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise DecisionError(f"threshold must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= threshold <= 1.0:  # NaN fails this too
        raise DecisionError(f"threshold must be a number in [0, 1], got {value!r}")
    return threshold


def decide(probabilities: np.ndarray, threshold: float) -> Decision:
    """Pathology when P(pathology) >= threshold; probabilities are the softmax over NAMES.labels."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if p.size != len(NAMES.labels):
        raise DecisionError(f"expected {len(NAMES.labels)} class probabilities, got {p.size}")
    # the sum's tolerance is for half-precision engines; one value above 1 by more than float32
    # rounding is no softmax output, and is never reported as a probability
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1 + 1e-6) or abs(p.sum() - 1.0) > 1e-3:
        raise DecisionError("classifier output is not a probability distribution")
    probability = min(float(p[NAMES.labels.index("pathology")]), 1.0)
    return Decision(probability=probability, pathology=int(probability >= threshold), threshold=threshold)


def shown_probability(probability: float, pathology: int, decimals: int = 3) -> str:
    """P for people, rounded towards its decision (down for normal, up for pathology): shown beside
    the decision it never contradicts it, whatever the threshold (0.4996 under threshold 0.5 is
    "0.499 normal", never "0.500 normal"). Reports keep the exact value."""
    if not math.isfinite(probability):  # never from decide(); a hand-edited report row
        return str(probability)
    rounding = ROUND_CEILING if pathology else ROUND_FLOOR
    # the classifier's P is float32: its shortest decimal (0.296, not 0.29600000381...) is the value
    return str(Decimal(str(np.float32(probability))).quantize(Decimal(1).scaleb(-decimals), rounding=rounding))


def parse_provenance(value: str) -> object:
    """Provenance is written by export as JSON; anything else is still reported, as text."""
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def triage_meta(preprocess_meta: bytes | str, decision: Decision, provenance: object) -> str:
    """The response META: preprocess metadata plus the operating point and the model provenance."""
    meta = parse_meta(preprocess_meta)
    meta["threshold"] = decision.threshold
    meta["provenance"] = provenance
    return json.dumps(meta)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def parse_meta(value: bytes | str) -> dict:
    """ct_preprocess's META as a dict, or MetaError: the models after it parse it the same way."""
    try:
        meta = json.loads(value, parse_constant=_not_json)  # NaN, Infinity: Python's, not JSON's, and passed on in the answer
    except (ValueError, RecursionError):  # RecursionError: arrays nested too deep
        raise MetaError("META is not valid JSON") from None
    if not isinstance(meta, dict):
        raise MetaError("META is not a JSON object")
    return meta
