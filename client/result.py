"""What one classified study looks like to a client: one row of the triage report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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

    @property
    def ok(self) -> bool:
        return self.processing_status == SUCCESS

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, the one `classify` prints."""
        return asdict(self)


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
