"""Starting and stopping the bundled server: `python -m serve` under SIGINT/SIGTERM, and failed starts.

These run their own servers (besides the session one) because what they check is what a stop
leaves behind: no tritonserver, no backend stub, no shared-memory region, the ports free again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
from helpers import TRIAGE_ONLY

import preprocess
from preprocess import phantom
from serve import (
    ServerError,
    TritonServer,
    find_installation,
    free_ports,
    installation_at,
    port_in_use,
    prepare_backend_directory,
    process_tree,
)
from serve.__main__ import COMMITTED_REPOSITORY
from settings import NAMES

SHM = Path("/dev/shm")


def children(pid: int) -> set[int]:
    return process_tree(pid) - {pid}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "the server exited"
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError("server not ready in time")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_then_stops_cleanly_on_signal(triton_repository, tmp_path, stop_signal):
    http_port, grpc_port, metrics_port = free_ports(3)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve",
            "--repository",
            str(triton_repository),
            f"--load-model={NAMES.triage}",  # and its steps; not the explanation models
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,  # any folder: the CLI is installed
    )
    try:
        url = f"localhost:{http_port}"
        wait_ready(url, process)
        # One real request, so every stub has worked and holds its shared memory.
        payload = preprocess.read_study(phantom.write_study(tmp_path / "study.zip", form="zip"))
        client = triton_http.InferenceServerClient(url)
        tensor = triton_http.InferInput(NAMES.dicom, [len(payload)], "BYTES")
        tensor.set_data_from_numpy(np.array(payload, dtype=np.object_))
        meta = json.loads(client.infer(NAMES.triage, [tensor]).as_numpy(NAMES.meta)[0])
        assert meta["provenance"]
        loaded = {model["name"] for model in client.get_model_repository_index() if model.get("state") == "READY"}
        assert loaded == {NAMES.triage, NAMES.preprocess, NAMES.classifier, NAMES.postprocess}  # --load-model: no explanation models
        client.close()
        server_processes = children(process.pid)
        stubs = [p for p in server_processes if "triton_python_backend_stub" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        assert len(stubs) >= 4, "expected one stub per Python-model instance"
        # The launcher names this server's regions after the serving process (other servers may run).
        prefix = f"ct_triage_{process.pid}_"
        assert list(SHM.glob(prefix + "*")), "the Python backend should hold shared-memory regions while serving"

        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopping tritonserver" in output
    assert [p for p in server_processes if alive(p)] == []
    assert list(SHM.glob(prefix + "*")) == []
    assert not any(port_in_use(p) for p in (http_port, grpc_port, metrics_port))


def test_cli_gives_up_at_its_startup_timeout_and_leaves_nothing(triton_repository, tmp_path):
    """A site whose models load slowly (TensorRT engines, a cold disk) sets the wait; past it the
    command says so in its error and exits 2 with nothing left running. The hang timeout is checked
    like it (the watchdog's restart itself: tests/server/test_faults.py)."""
    ports = free_ports(3)
    options = [f"--{kind}-port={port}" for kind, port in zip(("http", "grpc", "metrics"), ports)]
    serve = [sys.executable, "-m", "serve", "--repository", str(triton_repository), *options]
    done = subprocess.run([*serve, "--startup-timeout", "0.5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: tritonserver not ready after 0.5 s:"), done.stderr
    assert not any(port_in_use(port) for port in ports)
    assert re.search(r"^log: .+/tritonserver.log$", done.stderr, re.MULTILINE), done.stderr  # kept, for the operator
    for bad in ("0", "nan", "-5"):
        refused = subprocess.run([*serve, "--hang-timeout", bad], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and f"argument --hang-timeout: must be a finite number above 0, got {bad}" in refused.stderr


def test_failed_start_reports_the_reason_and_leaves_nothing(triton_repository, tmp_path):
    """A repository whose operating point is not a probability must not load, and must say why."""
    broken = tmp_path / "repository"
    shutil.copytree(triton_repository / NAMES.postprocess, broken / NAMES.postprocess)
    config = broken / NAMES.postprocess / "config.pbtxt"
    config.write_text(re.sub(r'string_value: "[^"]*"', 'string_value: "high"', config.read_text()))  # its one parameter
    http_port, grpc_port, metrics_port = free_ports(3)
    server = TritonServer(broken, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    with pytest.raises(ServerError, match="threshold must be a number"):
        server.start()
    assert not server.is_running()
    assert server.orphans() == [] and server.leaked_shm() == []


def test_a_config_triton_cannot_parse_is_named_at_the_top_of_the_error(triton_repository, tmp_path):
    """Triton's error line comes first: after it, the unload sequence filled the 40-line tail and hid it; the first
    line names the cause, as it names a model that failed to load."""
    broken = tmp_path / "repository"
    shutil.copytree(triton_repository, broken)  # every other model loads, then unloads: a long log
    with open(broken / NAMES.postprocess / "config.pbtxt", "a") as config:
        config.write("this is { not pbtxt\n")
    http_port, grpc_port, metrics_port = free_ports(3)
    with pytest.raises(ServerError) as failed:
        TritonServer(broken, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, models=TRIAGE_ONLY).start()
    head = "\n".join(str(failed.value).splitlines()[:6])
    assert f"failed to read text proto from {broken / NAMES.postprocess / 'config.pbtxt'}" in head, head
    first = str(failed.value).splitlines()[0]  # and the cause in the first line (Triton: "Poll failed for model directory")
    cause = (
        f"cannot read the model folder {NAMES.postprocess}: failed to read text proto from {broken / NAMES.postprocess / 'config.pbtxt'}"
    )
    assert first == f"tritonserver exited with code 1 during start-up ({cause}):", first


def test_a_repository_that_was_never_exported_says_so(triton_repository, tmp_path):
    """Without the provenance export writes, ct_postprocess refuses to load: no answer without its model's name."""
    broken = tmp_path / "repository"
    shutil.copytree(triton_repository / NAMES.postprocess, broken / NAMES.postprocess)
    (broken / NAMES.postprocess / "1" / "provenance.json").unlink()
    http_port, grpc_port, metrics_port = free_ports(3)
    with pytest.raises(ServerError, match=r"no 1/provenance.json: run `python -m export`"):
        TritonServer(broken, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port).start()


def test_models_of_different_exports_are_refused_before_triton_starts(triton_repository, tmp_path):
    """ct_postprocess names the model in every answer from its provenance.json: a copy from another
    export (a partial rsync, one folder rolled back) would name a model that did not compute it."""
    mixed = tmp_path / "repository"
    for model in (NAMES.classifier, NAMES.postprocess):
        (mixed / model / "1").mkdir(parents=True)
        shutil.copy(triton_repository / model / "config.pbtxt", mixed / model)
        shutil.copy(triton_repository / model / "1" / "provenance.json", mixed / model / "1")
    provenance = mixed / NAMES.postprocess / "1" / "provenance.json"
    provenance.write_text(provenance.read_text().replace("demo", "another checkpoint", 1))
    with pytest.raises(ServerError, match=f"the provenance.json of {NAMES.classifier}, {NAMES.postprocess} differ"):
        TritonServer(mixed).start()


IN_PLACE_TORCH = f"{NAMES.classifier} was exported for the torch-gpu target, whose config is configs/torch-gpu.pbtxt"
IN_PLACE_CPU = f"{NAMES.classifier} was exported for the cpu target, whose config is config.pbtxt"


@pytest.mark.parametrize(
    "target, rendered, name, refused",
    [
        ("torch-gpu", False, None, f"REPOSITORY: {IN_PLACE_TORCH}: serve it with --model-config-name torch-gpu"),
        ("torch-gpu", False, "torch-gpu", None),
        ("cpu", False, None, None),
        ("cpu", False, "cpu", None),
        ("cpu", False, "torch-gpu", f"REPOSITORY: {IN_PLACE_CPU}: serve it without --model-config-name"),
        (
            "cpu",
            False,
            "nosuch",
            f"--model-config-name nosuch: no model of REPOSITORY has configs/nosuch.pbtxt; {IN_PLACE_CPU}: serve it without",
        ),
        ("torch-gpu", True, None, None),
        ("torch-gpu", True, "torch-gpu", None),  # a rendered copy's config.pbtxt is the target's: the deployments pass it
        ("torch-gpu", True, "onnx-gpu", "--model-config-name onnx-gpu: no model of REPOSITORY has configs/onnx-gpu.pbtxt; "),
    ],
)
def test_a_config_name_that_does_not_serve_the_export_is_refused_before_triton_starts(tmp_path, target, rendered, name, refused):
    """An in-place torch-gpu export served without --model-config-name failed in Triton (FileNotFoundError: model.xml),
    and a name no model has a config for was passed over (config.pbtxt served)."""
    repository = tmp_path / "repository"
    classifier = repository / NAMES.classifier
    shutil.copytree(
        COMMITTED_REPOSITORY / NAMES.classifier, classifier, ignore=shutil.ignore_patterns("1", *(["configs"] if rendered else []))
    )
    (classifier / "1").mkdir()
    (classifier / "1" / "provenance.json").write_text(json.dumps({"target": target}))
    http_port, metrics_port = free_ports(2)
    server = TritonServer(repository, model_config_name=name, http_port=http_port, grpc_port=http_port, metrics_port=metrics_port)
    expected = (
        refused.replace("REPOSITORY", str(repository)) if refused else "the HTTP, gRPC and metrics ports must differ"
    )  # accepted: the next check
    with pytest.raises(ServerError, match=f"^{re.escape(expected)}"):
        server.start()


def test_one_port_for_two_endpoints_is_refused_before_triton_starts(triton_repository):
    http_port, metrics_port = free_ports(2)
    with pytest.raises(ServerError, match=f"ports must differ, not {http_port}, {http_port}, {metrics_port}"):
        TritonServer(triton_repository, http_port=http_port, grpc_port=http_port, metrics_port=metrics_port).start()


def test_a_model_to_load_that_the_repository_lacks_is_named_before_triton_starts(triton_repository):
    with pytest.raises(ServerError, match=f"{re.escape(str(triton_repository))} holds no model ct_triage_v2 to load"):
        TritonServer(triton_repository, models=[NAMES.triage, "ct_triage_v2"]).start()
    # a path out of the repository: Triton tried it, and failed only once every other model loaded
    path = f"../{triton_repository.name}/{NAMES.triage}"
    with pytest.raises(ServerError, match=f"^model name '{re.escape(path)}' to load is not a folder name: name a model folder of"):
        TritonServer(triton_repository, models=[path]).start()


def test_start_refuses_a_folder_without_models(tmp_path):
    with pytest.raises(ServerError, match="no model"):
        TritonServer(tmp_path).start()


def test_the_committed_configs_before_export_are_one_line_without_starting_triton(tmp_path):
    """`python -m serve` on the repository as cloned: refused up front, not after every other model loaded."""
    repository = tmp_path / "repository"
    shutil.copytree(COMMITTED_REPOSITORY, repository)
    (repository / NAMES.classifier / "1" / "provenance.json").unlink(missing_ok=True)  # a workspace may have exported in place
    done = subprocess.run([sys.executable, "-m", "serve", "--repository", str(repository)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"error: {repository}: {NAMES.classifier} was never exported (no 1/provenance.json); "
        "run `python -m export --checkpoint CKPT` (or --demo-weights) on it first\n"
    )


def test_a_killed_launcher_takes_its_server_along(triton_repository, tmp_path):
    """SIGKILL of the launching process (a CI timeout) must not leave a server or stub running."""
    repository = tmp_path / "repository"
    shutil.copytree(triton_repository / NAMES.postprocess, repository / NAMES.postprocess)
    launcher = (
        "import sys, time\n"
        "from serve import TritonServer, free_ports\n"
        "h, g, m = free_ports(3)\n"
        f"server = TritonServer({str(repository)!r}, http_port=h, grpc_port=g, metrics_port=m).start()\n"
        "print(server.pid, server.shm_prefix, flush=True)\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", launcher], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        pid, prefix = process.stdout.readline().split()
        server_processes = {int(pid)} | children(int(pid))
        assert len(server_processes) >= 2 and list(SHM.glob(prefix + "*"))
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 60
    while any(alive(p) for p in server_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in server_processes if alive(p)] == []
    assert list(SHM.glob(prefix + "*")) == []


MODEL_CONFIG = """
name: "NAME"
backend: "python"
max_batch_size: 0
input [{ name: "X", data_type: TYPE_FP32, dims: [1] }]
output [{ name: "Y", data_type: TYPE_FP32, dims: [1] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
"""


def test_a_launcher_killed_while_models_load_leaves_nothing(tmp_path):
    """SIGKILL of the launcher while a model loads: the parent-death signal ends tritonserver only, and
    a stub still in its model's initialize outlived it for good, holding its region (serve/reaper.py).
    Meanwhile Triton's metrics port is still closed (it opens once every model is loaded), which is why
    deploy/prometheus-rules.yml's CtTriageDown gives a new target its start-up allowance."""
    repository = tmp_path / "repository"
    for model, work in (("quick", "0"), ("slow", "sum(range(10**12))")):
        (repository / model / "1").mkdir(parents=True)
        (repository / model / "config.pbtxt").write_text(MODEL_CONFIG.replace("NAME", model))
        (repository / model / "1" / "model.py").write_text(f"class TritonPythonModel:\n    def initialize(self, args):\n        {work}\n")
    launcher = (
        "from serve import TritonServer, free_ports\n"
        "h, g, m = free_ports(3)\n"
        f"server = TritonServer({str(repository)!r}, http_port=h, grpc_port=g, metrics_port=m, startup_timeout_s=600)\n"
        "print(server.shm_prefix, m, flush=True)\n"
        "server.start()\n"
    )
    scratch = tmp_path / "scratch"  # the launcher's work folder (TMPDIR) goes here
    scratch.mkdir()
    environment = {**os.environ, "TMPDIR": str(scratch)}
    process = subprocess.Popen([sys.executable, "-c", launcher], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=environment)
    try:
        prefix, metrics_port = process.stdout.readline().split()
        deadline = time.monotonic() + 120
        while len(stub_pids(prefix)) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "the stubs never started"
            time.sleep(0.2)
        time.sleep(2)  # quick has loaded (its stub waits for requests), slow is still loading
        assert list(SHM.glob(prefix + "*"))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("localhost", int(metrics_port)), timeout=5).close()
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 90
    while (stub_pids(prefix) or list(SHM.glob(prefix + "*"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = stub_pids(prefix)
    for pid in left:  # a failing run must not leave a stub spinning on a core
        os.kill(pid, signal.SIGKILL)
    assert left == []
    assert list(SHM.glob(prefix + "*")) == []
    assert [path.name for path in scratch.glob("ct_triage_triton_*/backends")] == []


def stub_pids(prefix: str) -> list[int]:
    """Live processes whose command line names the regions of the server with this prefix (its stubs)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if prefix in cmdline.read_text(errors="replace") and alive(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_a_triton_installation_root_serves_with_its_log_on_stdout(triton_repository, tmp_path):
    """As the project's image runs it: NGC's /opt/tritonserver (bin/, backends/ used as they are, lib/),
    Triton's log on the container's stdout. The root here is laid out from the wheel's pieces, and given as a
    relative path (the server runs in a work folder of its own). Stdout is a file (`> serve.log`, systemd's
    StandardOutput=file:): Triton writes through the launcher's own descriptor, so neither overwrites the other."""
    wheel = find_installation()
    root = tmp_path / "tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").symlink_to(wheel.binary)
    (root / "lib").symlink_to(wheel.libs)
    prepare_backend_directory(root / "backends", wheel)
    scratch = tmp_path / "scratch"  # the launcher's work folder (TMPDIR)
    scratch.mkdir()
    http_port, grpc_port, metrics_port = free_ports(3)
    command = [sys.executable, "-m", "serve", "--repository", str(triton_repository), "--tritonserver", root.name]
    command += ["--log-file", "/dev/stdout", f"--load-model={NAMES.triage}", f"--http-port={http_port}", f"--grpc-port={grpc_port}"]
    command += [f"--metrics-port={metrics_port}"]
    environment = {**os.environ, "TMPDIR": str(scratch)}
    log = tmp_path / "serve.log"
    with open(log, "wb") as stdout:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=stdout, stderr=subprocess.STDOUT, env=environment)
    try:
        wait_ready(f"localhost:{http_port}", process)
        assert [path.name for path in scratch.glob("ct_triage_triton_*/*")] == []  # no backend directory assembled
        payload = preprocess.read_study(phantom.write_study(tmp_path / "study.zip", form="zip"))
        client = triton_http.InferenceServerClient(f"localhost:{http_port}")
        tensor = triton_http.InferInput(NAMES.dicom, [len(payload)], "BYTES")
        tensor.set_data_from_numpy(np.array(payload, dtype=np.object_))
        assert json.loads(client.infer(NAMES.triage, [tensor]).as_numpy(NAMES.meta)[0])["provenance"]
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert process.returncode == 0, output
    lines = output.splitlines()
    assert re.match(r"[IWE]\d{4} ", lines[0]), lines[0]  # Triton's first line, whole
    assert f"successfully loaded '{NAMES.triage}'" in output  # Triton's own lines, on stdout
    assert "log: /dev/stdout" in lines and "SIGTERM: stopping tritonserver" in lines
    assert any(line.startswith(f"tritonserver ready: http localhost:{http_port}") for line in lines), output


def test_a_folder_that_is_no_triton_installation_is_one_line(triton_repository, tmp_path):
    serve = [sys.executable, "-m", "serve", "--repository", str(triton_repository), "--tritonserver"]
    result = subprocess.run([*serve, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(f"error: --tritonserver: {tmp_path} is not a Triton installation")
    assert len(result.stderr.splitlines()) == 1
    binary = installation_root(tmp_path / "root", binary=b"")
    binary.chmod(0o644)
    result = subprocess.run([*serve, "root"], cwd=tmp_path, capture_output=True, text=True, timeout=60)  # relative too
    assert (result.returncode, result.stderr) == (2, f"error: --tritonserver: {binary} is not executable\n")


def installation_root(root: Path, binary: bytes) -> Path:
    """A Triton installation root whose bin/tritonserver holds `binary` (executable) and whose stub is a stand-in."""
    for folder in ("bin", "backends/python", "lib"):
        (root / folder).mkdir(parents=True)
    (root / "backends" / "python" / "triton_python_backend_stub").write_bytes(b"")
    (root / "bin" / "tritonserver").write_bytes(binary)
    (root / "bin" / "tritonserver").chmod(0o755)
    return root / "bin" / "tritonserver"


def test_a_binary_the_system_cannot_run_is_one_line_and_leaves_nothing(tmp_path):
    """A Popen that fails (here no executable format; a mount without exec) was a traceback."""
    repository = tmp_path / "repository"
    (repository / "quick" / "1").mkdir(parents=True)
    (repository / "quick" / "config.pbtxt").write_text(MODEL_CONFIG.replace("NAME", "quick"))
    binary = installation_root(tmp_path / "root", binary=b"\x00not a program")
    http_port, grpc_port, metrics_port = free_ports(3)
    installation = installation_at(binary.parents[1])
    ports = dict(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    server = TritonServer(repository, **ports, log_file=tmp_path / "tritonserver.log", installation=installation)
    with pytest.raises(ServerError, match=f"^cannot run {re.escape(str(binary))}: Exec format error$"):
        server.start()
    assert not server.is_running() and server.orphans() == [] and server.leaked_shm() == []
