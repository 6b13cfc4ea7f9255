"""The triage contract: what the trained model, its preprocessing, the served models and their
clients must agree on, as pure functions over `settings`.

- model input: the valid sizes S (`validate_size`), the HU window mapped to [-1, 1]
  (`hu_to_model_range`, `hu_window_affine`), and the check that a volume's values are in it
  (`check_model_range`);
- decision: the operating-point rule (`parse_threshold`, `decide`), P as shown beside its decision
  (`shown_probability`), and the response META the server adds to preprocess's metadata
  (`triage_meta`, `parse_provenance`; `parse_meta` reads it);
- labels: `settings.NAMES.labels`, in the classifier's output order.
- command lines: argparse types that check these bounds while the options are read
  (`contract.arguments`: `integer`, `number`, `port`, `model_size`, `threshold`).

It imports only `settings` and numpy, so the Python-backend models, export, preprocess, the
launcher and the clients can all import it without loading each other.
"""

from .decision import (
    Decision,
    DecisionError,
    MetaError,
    decide,
    parse_meta,
    parse_provenance,
    parse_threshold,
    shown_probability,
    triage_meta,
)
from .errors import ContractError, internal_error, metric_update
from .model_input import (
    MAX_SIZE,
    MIN_SIZE,
    SIZE_MULTIPLE,
    InvalidSizeError,
    OutOfRangeError,
    check_model_range,
    hu_to_model_range,
    hu_window_affine,
    validate_size,
)

__all__ = [
    "MAX_SIZE",
    "MIN_SIZE",
    "SIZE_MULTIPLE",
    "ContractError",
    "Decision",
    "DecisionError",
    "InvalidSizeError",
    "MetaError",
    "OutOfRangeError",
    "check_model_range",
    "decide",
    "hu_to_model_range",
    "hu_window_affine",
    "internal_error",
    "metric_update",
    "parse_meta",
    "parse_provenance",
    "parse_threshold",
    "shown_probability",
    "triage_meta",
    "validate_size",
]
