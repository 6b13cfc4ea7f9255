"""The contract's one error base, and how a served model reports a failure of its own."""

import traceback
from collections.abc import Callable


class ContractError(ValueError):
    """A size, operating point or classifier output that the contract does not allow."""


def internal_error(model: str, error: BaseException, *, with_message: bool = False) -> tuple[str, str]:
    """What a served model logs and what it answers for an exception that is its own bug: the log line
    names the type and the last source lines (and, `with_message`, the message's first line: only for
    models whose inputs are tensors, never DICOM values), the caller gets the type only, never a
    traceback or a message that could quote what was sent."""
    kind = type(error).__name__
    where = "; ".join(f"{frame.filename}:{frame.lineno}" for frame in traceback.extract_tb(error.__traceback__)[-3:])
    logged = f"{model} internal error {kind} at {where}"
    if with_message:
        logged = f"{logged}: {error}".splitlines()[0]
    return logged, f"{model}: internal error ({kind})"


def metric_update(model: str, update: Callable[[], object]) -> str | None:
    """Run `update`, a change to one of the service's Prometheus metrics; None when done, else the line
    to log. A metric that cannot be updated costs its sample, never the study's answer."""
    try:
        update()
    except Exception as error:
        return f"{model}: metrics not updated ({type(error).__name__})"
    return None
