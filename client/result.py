"""What one classified study looks like to a client: one row of the triage report."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy and explain.geometry only at run time where an explanation is parsed
    import numpy as np

    from explain import Box, OriginalBox

SUCCESS = "Success"
FAILURE = "Failure"


@dataclass(frozen=True)
class TriageResult:
    """The server's answer for one study, or why there is none.

    A failed study is still a result (processing_status Failure, error set) because the report
    must hold exactly one row per study; only programming errors raise.
    """

    study_uid: str | None
    series_uid: str | None
    probability_of_pathology: float | None
    pathology: int | None
    processing_status: str
    error: str | None
    time_of_processing: float  # client wall time in seconds: reading, sending, retries, answer
    meta: dict[str, Any] = field(default_factory=dict)
    model: str = ""  # provenance of the model that answered (or the model name on failure)
    # Only from a client built with explain=True (ct_triage_explain), and only on Success.
    explanation: Explanation | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.processing_status == SUCCESS

    @property
    def threshold(self) -> float | None:
        """The operating point the decision was taken at (META's `threshold`): the server's can change
        between two studies (set-threshold). None without an answer."""
        value = self.meta.get("threshold")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def pathology_localization(self) -> str | None:
        """ "x_min,x_max,y_min,y_max,z_min,z_max" in the chosen series' voxels; None when nothing is
        attributed, the study failed, or it was not explained."""
        box = self.explanation.localization if self.explanation is not None else None
        return box.as_text() if box is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, the one `classify` prints (the explanation's arrays are not in it)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "explanation"}


@dataclass(frozen=True, eq=False)
class Explanation:
    """What ct_triage_explain adds to the triage answer, checked against META's size S.

    `attribution` float16 [S, S, S] and `volume` float32 [S, S, S] (the model input that was
    explained, HU clipped to the training window and mapped to [-1, 1]) are on the model's grid:
    axes D (slices, feet->head), H (anterior->posterior), W (patient right->left).
    `localization` is the most attributed region in the chosen series' original voxels (x = column,
    y = row, z = slice as sorted feet->head), None when nothing is attributed; `box` is the same
    region on the S^3 grid (D, H, W), for drawing.
    """

    attribution: np.ndarray
    volume: np.ndarray
    localization: OriginalBox | None
    box: Box | None

    @property
    def size(self) -> int:
        return int(self.attribution.shape[0])


def failure(error: str, *, seconds: float, model: str) -> TriageResult:
    """A Failure result carrying a user-facing reason."""
    return TriageResult(
        study_uid=None,
        series_uid=None,
        probability_of_pathology=None,
        pathology=None,
        processing_status=FAILURE,
        error=error,
        time_of_processing=seconds,
        meta={},
        model=model,
    )
