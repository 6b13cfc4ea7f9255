"""Fixtures of the library tests (no server)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_weights():
    """export.demo_weights(), computed once: its BatchNorm calibration is a few seconds of CPU."""
    import export

    return export.demo_weights()
