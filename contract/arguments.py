"""argparse types for the project's command lines.

A number is checked against its bounds while the command line is read, so a value the command
cannot use is a one-line usage error (status 2) that names the option, never a traceback, a wait or
an allocation later on.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from .decision import DecisionError, parse_threshold
from .model_input import InvalidSizeError, validate_size


def integer(low: int, high: int) -> Callable[[str], int]:
    """An int from low to high, both included."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


# 1-65535: Triton takes port 0 and serves on no known port, so a launcher would wait for nothing
port = integer(1, 65535)


def number(low: float, high: float = math.inf, *, above_low: bool = False) -> Callable[[str], float]:
    """A finite float from low (excluded with above_low) to high; nan and inf are refused."""
    if math.isinf(high):
        bounds = f"a finite number {'above' if above_low else 'from'} {low:.15g}"
    else:
        bounds = f"a number above {low:.15g} and at most {high:.15g}" if above_low else f"a number from {low:.15g} to {high:.15g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        in_range = (low < value if above_low else low <= value) and value <= high  # nan fails both
        if not in_range or math.isinf(value):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def model_size(text: str) -> int:
    """S of the model input, by the contract's one rule (validate_size)."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    try:
        return validate_size(size)
    except InvalidSizeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def threshold(text: str) -> float:
    """An operating point: P(pathology) at or above it is a pathology."""
    try:
        return parse_threshold(text)
    except DecisionError:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}") from None
