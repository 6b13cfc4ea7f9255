"""Fixtures of the library tests (no server)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_weights():
    """export.demo_weights(), one copy shared by the library tests."""
    import export

    return export.demo_weights()
