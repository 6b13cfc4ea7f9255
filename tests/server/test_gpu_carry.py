"""benchmarks/gpu_carry.sh: the trimmed server it carries to the GPU machine runs the ensemble.

There (Python 3.12, no network) the tritonserver of the nvidia-pytriton wheel comes as a trimmed tree
on PYTHONPATH, and the stubs get numpy<2 through CT_TRIAGE_STUB_PYTHONPATH. Here the same tree, with
this machine's stub added, serves the test repository, found by serve.find_installation through
PYTHONPATH as there, and answers the project's client over gRPC and HTTP. The downloads and the
archives (`gpu_carry.sh` without arguments) need PyPI and minutes of xz: they are not run here.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from serve import find_installation
from serve.launcher import STUB_PYTHONPATH, TritonServer, prepare_stub_python

SCRIPT = ROOT / "benchmarks" / "gpu_carry.sh"
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
GPU_PYTHON = "3.12"  # the lent GPU machine's

# In a fresh interpreter whose PYTHONPATH starts with the trimmed tree: where the server comes from,
# then the ensemble on both protocols through the project's client.
SERVE_FROM_TREE = """
import os
import sys
from pathlib import Path

import client
from preprocess import phantom
from serve import find_installation, start_on_free_ports

repository, tree, scratch = map(Path, sys.argv[1:])
print("pid", os.getpid())
installation = find_installation()
assert installation.binary.is_relative_to(tree) and installation.stub.is_relative_to(tree), installation
study = phantom.write_study(scratch / "study.zip", form="zip", seed=0)
with start_on_free_ports(repository, exit_timeout_s=5, models=["ct_triage"]) as server:  # no explanation models: no torch stubs
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with client.TriageClient(url, protocol) as triage:
            triage.check_ready()
            result = triage.classify(study)
        assert result.ok, (protocol, result.error, server.log_tail())
        print(protocol, result.pathology, result.probability_of_pathology)
"""

# Imported first by every interpreter whose sys.path holds its folder: records that path, so the test
# sees that the stubs, and only they, got CT_TRIAGE_STUB_PYTHONPATH in front of their imports.
SITECUSTOMIZE = """
import os
import sys

with open(os.path.join(os.path.dirname(__file__), "seen", str(os.getpid())), "w") as record:
    record.write("\\n".join(sys.path))
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpu_carry") / "server"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CARRY_STUBS=f"{THIS_PYTHON} {GPU_PYTHON}")
    done = subprocess.run(["bash", str(SCRIPT), "--server-only", str(folder)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return folder


def test_tree_holds_the_server_the_stubs_and_the_libraries_they_load(tree):
    wheel = find_installation()  # the venv's nvidia-pytriton, which the tree is cut from
    server = tree / "pytriton" / "tritonserver"
    assert (tree / "pytriton" / "__init__.py").read_text() == ""
    assert sorted(p.name for p in server.iterdir()) == ["backends", "bin", "python_backend_stubs"]  # no caches
    assert sorted(p.name for p in (server / "python_backend_stubs").iterdir()) == sorted({THIS_PYTHON, GPU_PYTHON})
    assert sorted(p.name for p in (server / "backends" / "python").iterdir()) == ["libtriton_python.so", "triton_python_backend_utils.py"]
    assert (server / "bin" / "tritonserver").read_bytes() == wheel.binary.read_bytes()  # the wheel's files, unchanged
    assert os.access(server / "python_backend_stubs" / GPU_PYTHON / "triton_python_backend_stub", os.X_OK)

    # Every library the server, the backend and the stubs load is there; only the 3.13 stub's libpython is left.
    kept = {p.name for p in (tree / "nvidia_pytriton.libs").iterdir()}
    left = {p.name for p in wheel.libs.iterdir()} - kept
    assert {"libtritonserver", "libcudart", "libarchive", "libcurl", "libicudata", "libdcgm"} <= {n.split("-")[0] for n in kept}
    assert all(name.startswith("libpython3-") for name in left), left
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}  # the tree's RPATH alone
    stub = server / "python_backend_stubs" / GPU_PYTHON / "triton_python_backend_stub"
    for elf in (server / "bin" / "tritonserver", server / "backends" / "python" / "libtriton_python.so", stub):
        resolved = subprocess.run(["ldd", str(elf)], env=env, capture_output=True, text=True, check=True).stdout
        for line in resolved.splitlines():
            name, _, where = line.strip().partition(" => ")
            if name in kept:
                assert Path(where.split(" (")[0]).resolve().is_relative_to(tree.resolve()), line
            else:
                assert "not found" not in where or name == f"libpython{GPU_PYTHON}.so.1.0", line  # the machine's Python has it


def test_trimmed_tree_serves_the_ensemble_and_only_the_stubs_get_the_stub_path(tree, triton_repository, tmp_path):
    stub_path = tmp_path / "stub-site"
    (stub_path / "seen").mkdir(parents=True)
    (stub_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p))
    env[STUB_PYTHONPATH] = str(stub_path)
    done = subprocess.run(
        [sys.executable, "-c", SERVE_FROM_TREE, str(triton_repository), str(tree), str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(maxsplit=1) for line in done.stdout.splitlines())
    assert list(lines) == ["pid", "grpc", "http"], done.stdout

    # Each stub (one per Python model) had the stub path, then PYTHONPATH, before this venv's site-packages
    # (so numpy<2 there wins); the launching process had it nowhere.
    seen = {int(p.name): p.read_text().splitlines() for p in (stub_path / "seen").iterdir()}
    assert len(seen) >= 3, seen  # ct_preprocess, ct_classifier, ct_postprocess
    assert int(lines["pid"]) not in seen
    for paths in seen.values():
        assert paths.index(str(stub_path)) < paths.index(str(tree)) < paths.index(site.getsitepackages()[0]), paths


def test_stub_python_puts_the_stub_path_first_for_an_isolated_interpreter(monkeypatch, tmp_path):
    """The stubs' embedded Python starts isolated (PYTHONPATH ignored) and finds its prefix through PATH:
    `python3 -I` from the environment the launcher writes sees what the stubs see."""
    for folder in ("main", "first"):
        (tmp_path / folder).mkdir()  # site.py keeps only folders that exist
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "main"))
    bin_dir = prepare_stub_python(tmp_path / "stub-python", [str(tmp_path / "first")])
    done = subprocess.run(
        [str(bin_dir / "python3"), "-I", "-c", "import json, sys, serve; print(json.dumps(sys.path))"],
        capture_output=True,
        text=True,
        check=True,
    )
    paths = json.loads(done.stdout)
    venv_site = site.getsitepackages()[0]
    assert paths.index(str(tmp_path / "first")) < paths.index(str(tmp_path / "main")) < paths.index(venv_site)  # serve: installed

    monkeypatch.delenv(STUB_PYTHONPATH, raising=False)
    assert TritonServer(tmp_path).environment()["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")  # unset: as before


def test_install_without_the_archives_fails_and_prints_no_exports(tmp_path):
    """On the GPU machine its output is eval'd: a failed install must print nothing to run, and say why."""
    env = dict(os.environ, GPU_CARRY_DIR=str(tmp_path / "nothing"))
    done = subprocess.run(["bash", str(SCRIPT), "--install", str(tmp_path / "dest")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "server.tar.xz is missing" in done.stderr
