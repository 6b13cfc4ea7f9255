"""Fixtures of the server tests: one real Triton server per test worker, and private ones on demand.

`triton_repository` renders a copy of the model repository (demo weights, CPU target) at a small S
so the suite stays fast, once for all workers; `triton_server` runs the bundled tritonserver on it
on free ports for the whole session. Tests that kill or reconfigure a server use `private_server` instead, tests that
interrupt a client `module_server`, so no test depends on what another left on the shared one; those
two load ct_triage alone (TRIAGE_ONLY: no explanation models, which no such test asks for; a start
without them is 6 s instead of 9.5 here). If the shared server dies, the test during which it died
fails with its log, and every later test that needs it fails at once, without retries.
"""

from __future__ import annotations

import fcntl

import pytest
from helpers import TEST_SIZE, TRIAGE_ONLY, discard

from serve import start_on_free_ports


@pytest.fixture(scope="session")
def triton_repository(tmp_path_factory, worker_id):
    """Rendered once per run: pytest-xdist's workers share it (the first to take the lock renders it,
    a minute of both cores that the other worker would spend again); tests only read it."""
    import export

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out, rendered = shared / "exported" / "repository", shared / "exported" / "rendered"
    with open(shared / "exported.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not rendered.exists():
            export.write_repository(out, target="cpu", size=TEST_SIZE, demo_weights=True)
            rendered.touch()
    return out


@pytest.fixture(scope="session")
def shared_server(triton_repository, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    server = start_on_free_ports(triton_repository, log_file=log_file, exit_timeout_s=5)  # tests close their clients: no 30 s grace
    try:
        yield server
    finally:
        discard(server)


@pytest.fixture
def triton_server(shared_server):
    """The shared server, checked alive before and after the test (no request is spent on a dead one)."""
    if not shared_server.is_running():
        pytest.fail("the shared tritonserver died during an earlier test (see that test's failure)", pytrace=False)
    yield shared_server
    if not shared_server.is_running():
        pytest.fail(f"the shared tritonserver died during this test:\n{shared_server.log_tail()}", pytrace=False)


def _own_server(repository, tmp_path_factory, **options):
    log_file = tmp_path_factory.mktemp("private") / "tritonserver.log"
    server = start_on_free_ports(repository, log_file=log_file, exit_timeout_s=5, **options)
    try:
        yield server
    finally:
        discard(server)


@pytest.fixture
def private_server(triton_repository, tmp_path_factory):
    """A server of this test's own, for tests that kill or reconfigure it (ct_triage only)."""
    yield from _own_server(triton_repository, tmp_path_factory, models=TRIAGE_ONLY)


@pytest.fixture
def private_explaining_server(triton_repository, tmp_path_factory):
    """A server of this test's own with the explanation models too."""
    yield from _own_server(triton_repository, tmp_path_factory)


@pytest.fixture(scope="module")
def module_server(triton_repository, tmp_path_factory):
    """A server of one module's own, for tests that leave requests in flight (an interrupted client):
    those must not land on the shared server, but such tests can share one (ct_triage only)."""
    yield from _own_server(triton_repository, tmp_path_factory, models=TRIAGE_ONLY)
