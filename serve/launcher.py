"""Run the real `tritonserver` bundled in the nvidia-pytriton wheel, on any Linux machine.

The wheel ships the server binary, the Python backend and one backend stub per Python version,
but not laid out as a backend directory. We assemble one per server (Python backend + the stub
of the running interpreter), start the server with this virtual environment first on PATH (so each
stub's embedded Python uses its site-packages: numpy 1.26 and the installed project packages),
wait for readiness, and stop it so that no stub process and no shared-memory region outlives it.
Nothing here is needed by the model code: the same repository loads in the NGC `tritonserver` image.

`CT_TRIAGE_STUB_PYTHONPATH` (folders, `:`-separated), when set, goes first on the stubs' import path,
then this process's PYTHONPATH, then this environment's site-packages: numpy<2 for the stubs on a
machine whose own Python has numpy 2 (benchmarks/gpu_carry.sh), the launching process left as it is.
The stubs' embedded interpreter ignores PYTHONPATH (it starts isolated), so the server is then given a
virtual environment of its own whose `.pth` file lists those folders (`prepare_stub_python`).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

from settings import ADMIN, NAMES, SERVING

SHM_DIR = Path("/dev/shm")
STUB_PYTHONPATH = "CT_TRIAGE_STUB_PYTHONPATH"  # see the module docstring
STUB_BINARY = "triton_python_backend_stub"
NVIDIA_CONTROL_DEVICE = Path("/dev/nvidiactl")  # present where the NVIDIA driver (or a GPU container runtime) is
# A model's config parameter the watchdog changes to reload it: Triton skips a load whose config is unchanged.
RELOAD_PARAMETER = "reloaded_by_launcher"
WATCH_INTERVAL_S = 0.5
STUB_EXIT_GRACE_S = 1.0  # an unloaded instance removes its region just after its stub exits
LIVENESS_CHECKS = 4  # health checks in hang_timeout_s; all unanswered: the server is hung
WATCHDOG_JOIN_S = 2.0  # stop() waits this long for the watchdog to finish a step before it ends the server under it
MAX_FAILED_RESTARTS = 3  # restarts in a row that did not bring the server up: give up
LOG_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2}  # a --log-file given to Triton as the launcher's own descriptor

log = logging.getLogger("serve")


class ServerError(RuntimeError):
    """The server could not be started or did not stop cleanly; the message carries the log tail."""


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: the model instance it runs and its shared-memory region."""

    pid: int
    model: str
    instance: str  # Triton's instance name, e.g. ct_preprocess_0_1
    region: Path


@dataclass(frozen=True)
class Recovery:
    """What the watchdog saw and did (TritonServer.recoveries; the same line is in the server log)."""

    reason: str
    action: str  # "reload <model>" or "restart"
    ok: bool
    at: float  # epoch seconds, when the action ended
    seconds: float


@dataclass(frozen=True)
class Installation:
    """Where a Triton installation keeps its pieces: the nvidia-pytriton wheel's, from which a backend
    directory is assembled for this Python, or a Triton installation root such as the NGC image's
    /opt/tritonserver, whose backend directory (python, onnxruntime, tensorrt, ...) is used as it is."""

    binary: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python version
    libs: Path  # the wheel's bundled shared libraries (libtritonserver, libcudart, ...)
    backends: Path | None = None  # a ready backend directory; None: assembled from python_backend and stub


def installation_at(root: str | os.PathLike) -> Installation:
    """The Triton installation under `root` (bin/tritonserver, backends/, lib/: NGC's /opt/tritonserver),
    whose Python backend stub must have been built for the Python that runs the models (the image's).
    The root is made absolute: the server starts in a work folder of its own."""
    root = Path(root).resolve()
    backends = root / "backends"
    installation = Installation(
        binary=root / "bin" / "tritonserver",
        python_backend=backends / "python",
        stub=backends / "python" / STUB_BINARY,
        libs=root / "lib",
        backends=backends,
    )
    missing = [str(p) for p in (installation.binary, installation.stub) if not p.exists()]
    if missing:
        raise ServerError(f"{root} is not a Triton installation: missing {', '.join(missing)}")
    if not os.access(installation.binary, os.X_OK):
        raise ServerError(f"{installation.binary} is not executable")
    return installation


@functools.cache
def find_installation() -> Installation:
    """Locate tritonserver, the Python backend and the matching stub inside the installed wheel
    (found, not imported: importing pytriton loads grpc and tritonclient, ~0.7 s)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:  # pragma: no cover - the dependency is pinned
        raise ServerError("nvidia-pytriton is not installed: run `make setup`")
    package = Path(spec.origin).resolve().parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    installation = Installation(
        binary=package / "tritonserver" / "bin" / "tritonserver",
        python_backend=package / "tritonserver" / "backends" / "python",
        stub=package / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=package.parent / "nvidia_pytriton.libs",
    )
    missing = [str(p) for p in vars(installation).values() if p is not None and not p.exists()]
    if missing:
        raise ServerError(f"incomplete nvidia-pytriton installation (Python {version}): missing {missing}")
    return installation


def prepare_backend_directory(destination: Path, installation: Installation | None = None) -> Path:
    """Write `destination/python/` = the wheel's Python backend + this interpreter's stub."""
    installation = installation or find_installation()
    python_dir = Path(destination) / "python"
    shutil.copytree(installation.python_backend, python_dir, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(installation.stub, python_dir / "triton_python_backend_stub")
    return Path(destination)


def prepare_stub_python(destination: Path, first: list[str]) -> Path:
    """Write a virtual environment on this interpreter at `destination` whose import path is `first`,
    then PYTHONPATH, then this environment's site-packages; return its bin/ (for the server's PATH)."""
    destination = Path(destination)
    base = Path(getattr(sys, "_base_executable", sys.executable))  # a venv's own python is a link to it
    (destination / "bin").mkdir(parents=True)
    (destination / "bin" / "python3").symlink_to(base)
    (destination / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n")
    site_packages = Path(site.getsitepackages([str(destination)])[0])  # where site.py looks, in that prefix
    site_packages.mkdir(parents=True)
    folders = [os.path.abspath(p) for p in (*first, *os.environ.get("PYTHONPATH", "").split(os.pathsep)) if p]
    # addsitedir, not a plain line: the site-packages' own .pth files (editable installs) count too
    sites = [f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()]
    (site_packages / "ct_triage_stub_path.pth").write_text("\n".join([*folders, *sites]) + "\n")
    return destination / "bin"


def free_ports(count: int = 3) -> list[int]:
    """Ports the kernel reports free right now (held open together so they are distinct)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_in_use(port: int) -> bool:
    """Something listens on port (SO_REUSEADDR: connections in TIME_WAIT do not count)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def process_tree(pid: int) -> set[int]:
    """pid and all its descendants, from /proc (a server and the backend stubs it forks)."""
    found, frontier = {pid}, [pid]
    while frontier:
        for task in Path(f"/proc/{frontier.pop()}/task").glob("*"):
            try:
                children = {int(child) for child in (task / "children").read_text().split()}
            except OSError:
                continue
            frontier.extend(children - found)
            found |= children
    return found


def _processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line contains marker (our stubs carry our backend path and shm prefix)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


class TritonServer:
    """One tritonserver process on a model repository; use as a context manager.

    `start()` returns once /v2/health/ready answers 200 (all models loaded) or raises ServerError
    with the log tail; `stop()` asks for a graceful exit (in-flight requests get
    `exit_timeout_s`), then kills what is left and removes our shared-memory regions.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        http_port: int = SERVING.http_port,
        grpc_port: int = SERVING.grpc_port,
        metrics_port: int = SERVING.metrics_port,
        log_file: str | os.PathLike | None = None,
        startup_timeout_s: float = SERVING.startup_timeout_s,
        exit_timeout_s: int = SERVING.exit_timeout_s,
        hang_timeout_s: float = SERVING.hang_timeout_s,
        drain_timeout_s: float = SERVING.drain_timeout_s,
        log_verbose: int = 0,
        model_config_name: str | None = None,
        cuda_memory_pool_bytes: int | None = None,
        admin_key: str | None = None,
        supervise: bool = False,
        models: Sequence[str] | None = None,
        installation: Installation | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self._installation = installation  # None: the nvidia-pytriton wheel's (find_installation)
        # the models loaded at start (Triton loads an ensemble's steps with it); None: every model.
        # A site that never asks for explanations loads ct_triage alone: no ct_explain process, no
        # second copy of the weights (in GPU memory, with ct_explain on the GPU).
        self.models = tuple(models) if models is not None else None
        self.model_config_name = model_config_name
        # on GPU 0; None: what serve.sizing gives the repository's configs (Triton's default 64 MiB unless
        # ct_preprocess runs on the GPU, whose volumes wait in that pool)
        self.cuda_memory_pool_bytes = cuda_memory_pool_bytes
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.hang_timeout_s = hang_timeout_s  # supervised: a server that answers no health check this long is restarted
        self.drain_timeout_s = drain_timeout_s  # supervised: instances a reload replaced that outlive this get it restarted
        self.log_verbose = log_verbose
        self._admin_key = ADMIN.checked_key(admin_key)  # private: never printed, logged or put in an error
        self._log_file = Path(log_file) if log_file else None
        self._owns_log = log_file is None  # a log we chose is kept (for log_tail) after the rest is removed
        self._workdir: Path | None = None
        self._stub_python: Path | None = None  # bin/ of the stubs' own environment, if CT_TRIAGE_STUB_PYTHONPATH asks for one
        self._process: subprocess.Popen | None = None
        self._reaper: subprocess.Popen | None = None  # serve/reaper.py: cleans up after this process if it dies
        # Unique per server: names its shared-memory regions, so leaks can be found and removed.
        self.shm_prefix = f"ct_triage_{os.getpid()}_{secrets.token_hex(4)}"
        self.supervise = supervise
        self.shm_region_limits: dict[str, int] = {}  # by model, from the served repository once it is up
        self._deployment = None  # serve.sizing.Deployment of the repository's configs, read at each launch (command)
        self.recoveries: list[Recovery] = []  # what the watchdog did, oldest first
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self._launching = threading.Lock()  # stop() and a restart in the watchdog: no server launched once stopping
        self._last_probe, self._unanswered = 0.0, 0  # the last health check sent (monotonic), checks unanswered since one was
        self._launched_at = 0  # offset of the last launch in the server log
        self._known: dict[int, Stub] = {}  # stubs the watchdog has seen alive
        self._retired: set[int] = set()  # stubs of instances a reload replaced: their exit is expected
        # by model: when the instances its last reload replaced must be gone, and their regions (removed at unload)
        self._draining: dict[str, tuple[float, set[Path]]] = {}

    # -- addresses ---------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """host:port as tritonclient expects it (no scheme)."""
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    @property
    def log_file(self) -> Path | None:
        return self._log_file

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def serving(self) -> bool:
        """Running, or being recovered by the watchdog (False once it gave up, or after stop())."""
        return self.is_running() or (self._watchdog is not None and self._watchdog.is_alive())

    @property
    def installation(self) -> Installation:
        return self._installation or find_installation()

    # -- lifecycle ---------------------------------------------------------------------------
    def command(self, backend_directory: Path) -> list[str]:
        """The tritonserver command line (explicit model control, so the load API can override configs);
        it holds the admin key when there is one: never print it. Reads the repository's configs, which
        size the CUDA pool and the watchdog's region limits (serve.sizing)."""
        from serve.sizing import served_deployment  # see _served_region_limits

        self._deployment = served_deployment(self.repository, self.model_config_name, self.models)
        python = "--backend-config=python,"
        return [
            str(self.installation.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in (self.models or ("*",))),
            "--strict-readiness=true",
            # GPU metrics (nv_gpu_*: the dashboards' utilisation and memory panels) where there is a GPU
            *([] if NVIDIA_CONTROL_DEVICE.exists() else ["--allow-gpu-metrics=false"]),
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            # gRPC request objects are not pooled for reuse: a pooled one keeps the capacity of the
            # largest request it carried (a 512 MiB study left ~450 MiB more resident in the server)
            "--grpc-infer-allocation-pool-size=0",
            f"{python}shm-default-byte-size={SERVING.shm_default_byte_size}",
            f"{python}shm-growth-byte-size={SERVING.shm_growth_byte_size}",
            f"{python}shm-region-prefix-name={self.shm_prefix}",
            *([f"--model-config-name={self.model_config_name}"] if self.model_config_name else []),
            *([f"--cuda-memory-pool-byte-size=0:{pool}"] if (pool := self._cuda_pool_bytes()) else []),
            *self._restriction_flags(),
        ]

    def _cuda_pool_bytes(self) -> int | None:
        """The pool asked for, else room for every volume GPU preprocessing can have waiting (None:
        Triton's default, enough where ct_preprocess runs on the CPU)."""
        from serve.sizing import cuda_pool_bytes  # see _served_region_limits

        if self.cuda_memory_pool_bytes is not None:
            return self.cuda_memory_pool_bytes
        return cuda_pool_bytes(self._deployment) if self._deployment.preprocess_on_gpu else None

    def _restriction_flags(self) -> list[str]:
        """Triton's own access control: the restricted APIs answer only requests whose HTTP header
        ADMIN.header or gRPC metadata ADMIN.grpc_metadata holds the key; inference, health,
        metadata and statistics stay open."""
        if self._admin_key is None:
            return []
        restriction = f"{','.join(ADMIN.restricted_apis)}:{ADMIN.header}={self._admin_key}"
        return [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]

    def environment(self) -> dict[str, str]:
        """Environment of the server: the installation's libraries, and this Python's prefix for the stubs."""
        env = dict(os.environ)
        env.pop(ADMIN.key_env, None)  # the models never need it
        libs = str(self.installation.libs)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, env.get("LD_LIBRARY_PATH")) if p)
        # The embedded interpreter in each stub finds its prefix through PATH: put this venv first,
        # so the models import the packages installed there, whatever the working directory.
        python = self._stub_python or Path(sys.prefix) / "bin"
        env["PATH"] = os.pathsep.join(p for p in (str(python), env.get("PATH")) if p)
        env.update(SERVING.malloc_environment)  # freed memory back to the system at once
        return env

    def start(self) -> TritonServer:
        if self.is_running():
            return self
        if not any(self.repository.glob("*/config.pbtxt")):
            raise ServerError(f"{self.repository} holds no model (config.pbtxt); run `python -m export` first")
        paths = [model for model in self.models or () if model in ("", ".", "..") or "/" in model]
        if paths:  # Triton would take a path out of the repository, and fail only once every other model loaded
            raise ServerError(f"model name {paths[0]!r} to load is not a folder name: name a model folder of {self.repository}")
        missing = [model for model in self.models or () if not (self.repository / model / "config.pbtxt").is_file()]
        if missing or self.models == ():
            raise ServerError(f"{self.repository} holds no model {', '.join(missing) or '(none named)'} to load")
        if (self.repository / NAMES.classifier).is_dir() and not (self.repository / NAMES.classifier / "1" / "provenance.json").is_file():
            # the committed configs without export's files: every model would load but the classifier
            raise ServerError(
                f"{self.repository}: {NAMES.classifier} was never exported (no 1/provenance.json); "
                "run `python -m export --checkpoint CKPT` (or --demo-weights) on it first"
            )
        self._check_one_export()
        self._check_config_name()
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) < len(ports):  # Triton would say so only after its whole usage text
            raise ServerError(f"the HTTP, gRPC and metrics ports must differ, not {', '.join(map(str, ports))}")
        busy = [p for p in ports if port_in_use(p)]
        if busy:
            raise ServerError(f"port(s) {busy} already in use")
        self._stopping.clear()
        self._known.clear()
        self._retired.clear()
        self._draining.clear()
        self._workdir = Path(tempfile.mkdtemp(prefix="ct_triage_triton_"))
        if self.installation.backends is None:
            prepare_backend_directory(self._workdir / "backends", self.installation)
        if os.environ.get(STUB_PYTHONPATH):
            self._stub_python = prepare_stub_python(self._workdir / "stub-python", os.environ[STUB_PYTHONPATH].split(os.pathsep))
        if self._owns_log:
            self._log_file = self._workdir / "tritonserver.log"
        # does what stop() does if this process dies without calling it (SIGKILL, an OOM kill)
        self._reaper = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).with_name("reaper.py")), str(self.exit_timeout_s + 15)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        for line in [f"regions {self.shm_prefix}", *(f"folder {folder}" for folder in self._leftover_folders())]:
            self._tell(self._reaper, line)
        atexit.register(self.stop)
        try:
            self._launch()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self.shm_region_limits = self._served_region_limits()
            self._watch_from_now()
            self._watchdog = threading.Thread(target=self._watch, name="triton-watchdog", daemon=True)
            self._watchdog.start()
        return self

    def _check_one_export(self) -> None:
        """Export writes one provenance.json into each model that serves the weights: copies that
        differ come from different exports (a partial rsync, one folder rolled back), and an answer
        would name one model while another computed it (or ct_explain explain another network)."""
        copies = {
            model: path.read_bytes()
            for model in (NAMES.classifier, NAMES.postprocess, NAMES.explain)
            if (path := self.repository / model / "1" / "provenance.json").is_file()
        }
        if len(set(copies.values())) > 1:
            raise ServerError(
                f"{self.repository}: the provenance.json of {', '.join(copies)} differ, so they come from different "
                "exports: run `python -m export` on the repository again"
            )

    def _check_config_name(self) -> None:
        """The classifier's config under model_config_name must be that of the target export wrote its files
        for (its provenance.json): another one looks for files that are not there. A name no model has a
        configs/<name>.pbtxt for is a mistake Triton passes over (config.pbtxt is served), unless it is the
        target's: a rendered copy's config.pbtxt is its target's, and deployments pass the target for either layout."""
        name, classifier = self.model_config_name, self.repository / NAMES.classifier
        provenance = classifier / "1" / "provenance.json"
        try:
            target = json.loads(provenance.read_text()).get("target") if provenance.is_file() else None
        except (OSError, ValueError, AttributeError):
            raise ServerError(f"{provenance} is not what export writes: run `python -m export` on the repository again") from None

        def config(config_name: str | None) -> Path:
            alternative = classifier / "configs" / f"{config_name}.pbtxt"
            return alternative if config_name and alternative.is_file() else classifier / "config.pbtxt"

        needed = target if target is not None and config(target) != config(None) else None
        served = f"with --model-config-name {needed}" if needed else "without --model-config-name"
        exported = f"{NAMES.classifier} was exported for the {target} target, whose config is {config(needed).relative_to(classifier)}"
        if target is not None and config(name) != config(needed):
            raise ServerError(f"{self.repository}: {exported}: serve it {served}")
        folders = [folder for folder in self.repository.iterdir() if folder.is_dir()]
        if name and name != target and not any((folder / "configs" / f"{name}.pbtxt").is_file() for folder in folders):
            hint = f"; {exported}: serve it {served}" if target is not None else ""
            raise ServerError(f"--model-config-name {name}: no model of {self.repository} has configs/{name}.pbtxt{hint}")

    def _launch(self) -> None:
        _check_log_file(self._log_file)  # one line, not a traceback; a restart makes a removed folder again
        with self._launching, _open_log(self._log_file) as log:
            if self._stopping.is_set():
                raise ServerError("stopped during start-up")
            self._launched_at = log.tell() if log.seekable() else 0  # where this launch's lines begin in the log
            command = self.command(self.installation.backends or self._workdir / "backends")
            try:
                self._process = subprocess.Popen(
                    command,
                    env=self.environment(),
                    cwd=self._workdir,  # never the checkout: the models must import installed packages
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # our own process group: a terminal's Ctrl-C reaches us, not it
                    preexec_fn=_die_with_parent,
                )
            except OSError as error:  # a binary that cannot be run (its format, a mount without exec)
                raise ServerError(f"cannot run {command[0]}: {error.strerror or error}") from None
            if self._reaper is not None:
                self._tell(self._reaper, f"group {self._process.pid}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self._process.poll() is not None:
                cause = f" ({found})" if (found := self._load_failure()) else ""
                code = self._process.returncode
                raise ServerError(f"tritonserver exited with code {code} during start-up{cause}:\n{self._failure_log()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        if self._stopping.is_set():
            raise ServerError("stopped during start-up")
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:g} s:\n{self._failure_log()}")

    def stop(self) -> None:
        """Graceful SIGTERM, bounded wait, then SIGKILL of the group; leaves no stub and no shm region."""
        atexit.unregister(self.stop)
        self._stopping.set()
        watchdog, self._watchdog = self._watchdog, None
        joinable = watchdog is not None and watchdog is not threading.current_thread()
        if joinable:
            # it checks _stopping between steps, but a request to a hung server (or a reload's load) can
            # last startup_timeout_s: the server is ended under it, which ends the request
            watchdog.join(WATCHDOG_JOIN_S)
        with self._launching:
            process, self._process = self._process, None
        self._terminate(process)
        if joinable:
            watchdog.join()  # its server gone, it returns at once (a restart it was in launches nothing)
        if self._workdir is not None:
            self._remove_leftovers()
            for folder in self._leftover_folders():
                shutil.rmtree(folder, ignore_errors=True)
            self._stub_python = None
        if self._reaper is not None:
            reaper, self._reaper = self._reaper, None
            self._tell(reaper, "done")
            with suppress(OSError):
                reaper.stdin.close()
            reaper.wait()  # it exits on reading "done"

    def _leftover_folders(self) -> list[Path]:
        """The log we placed in the work folder stays (its path was printed); a caller's log lives elsewhere."""
        if self._owns_log:
            return [self._workdir / "backends", self._workdir / "stub-python"]
        return [self._workdir]

    @staticmethod
    def _tell(reaper: subprocess.Popen, line: str) -> None:
        """serve/reaper.py ends the server `group PGID` names if this process dies before `done`."""
        try:
            reaper.stdin.write(line + "\n")
            reaper.stdin.flush()
        except OSError:  # it was killed: the parent-death signal still ends the server
            pass

    def _terminate(self, process: subprocess.Popen | None, *, graceful: bool = True) -> None:
        """SIGTERM and `exit_timeout_s` + 15 s for in-flight requests (graceful), then SIGKILL of the group."""
        if process is None:
            return
        if graceful and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGCONT)  # a stopped server acts on it
            try:
                process.wait(timeout=self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(process.pid)  # stubs share the server's process group
        process.wait(timeout=15)

    def _remove_leftovers(self) -> None:
        self._reap_stubs()
        for region in self.leaked_shm():
            region.unlink(missing_ok=True)

    # -- supervision ---------------------------------------------------------------------------
    # Triton 2.51's Python backend neither restarts a stub that died nor marks its model unready:
    # /v2/health/ready stays 200 while every request routed to that instance fails with "Stub process
    # '<instance>' is not healthy" (its restart on the next request was removed in 24.08). Nor can it
    # refuse a request by size: a 1 GiB study is copied into a ct_preprocess region (a huge META sent
    # to ct_postprocess into its region), which keeps its size (and its pages) for the life of the stub.
    # The watchdog (supervise=True) repairs both by reloading the model (a region past what serve.sizing
    # gives its model), and restarts the server if it exited or a reload fails.

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            try:
                self._check()
            except Exception as error:  # a failed check must not end supervision; the next one retries
                self._note(f"watchdog check failed ({type(error).__name__}: {error})")

    def _check(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is not None:
            self._restart(f"tritonserver exited with code {process.returncode}")
            return
        if self._hung():
            # it would not act on SIGTERM either (a stopped or deadlocked process): killed at once
            self._restart(f"tritonserver answered no health check for {self.hang_timeout_s:g} s", graceful=False)
            return
        for model, (deadline, regions) in list(self._draining.items()):
            if not any(region.exists() for region in regions):
                del self._draining[model]
            elif time.monotonic() > deadline:
                # its threads, stubs and regions stay until the server exits (with a GPU model, its
                # CUDA memory too): only a restart gives them back
                self._restart(
                    f"the {model} instances a reload replaced still hold their memory {self.drain_timeout_s:g} s later"
                    " (Triton keeps a model version whose stub died mid-request)"
                )
                return
        live = {stub.pid: stub for stub in self.stubs()}
        for stub in live.values():
            self._known.setdefault(stub.pid, stub)
            if _stopped(stub.pid):
                # Triton routes every other request to it, each failing after seconds, and a SIGCONT during
                # a reload aborted tritonserver: killed, its death gets the model reloaded at the next check
                self._note(f"the stub of {stub.instance} (pid {stub.pid}) is stopped (SIGSTOP): killing it")
                with suppress(ProcessLookupError):
                    os.kill(stub.pid, signal.SIGKILL)
        broken: dict[str, str] = {}
        dead: dict[str, set[Path]] = {}  # by model, the regions of its instances whose stub died
        for pid in [pid for pid in self._known if pid not in live]:
            stub = self._known.pop(pid)
            if pid in self._retired:
                self._retired.discard(pid)
            elif self._died(stub):
                broken.setdefault(stub.model, f"the stub of {stub.instance} (pid {pid}) died")
                dead.setdefault(stub.model, set()).add(stub.region)
        # a model the sizing does not know may grow as far as the largest known need
        fallback = max(self.shm_region_limits.values())
        for stub in live.values():
            size, limit = _file_size(stub.region), self.shm_region_limits.get(stub.model, fallback)
            if stub.pid not in self._retired and size > limit:
                reason = f"the shared memory of {stub.instance} grew to {size >> 20} MiB, over the {limit >> 20} MiB {stub.model} needs"
                broken.setdefault(stub.model, reason)
        for model, reason in broken.items():
            if self._stopping.is_set():
                return
            if not self._reload(model, reason, dead.get(model, set())):
                if not self._stopping.is_set():  # a reload cut short by stop(): no new server while stopping
                    self._restart(f"reloading {model} failed")
                return

    def _hung(self) -> bool:
        """Whether /v2/health/live went unanswered at every check for hang_timeout_s (LIVENESS_CHECKS in a
        row, as a Kubernetes liveness probe): Triton alive but stuck (stopped, deadlocked) serves no study
        and never exits, so nothing else here would notice."""
        period = self.hang_timeout_s / LIVENESS_CHECKS
        if time.monotonic() - self._last_probe < period:
            return False
        self._last_probe = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/live", timeout=min(period, 5.0)):
                self._unanswered = 0
        except OSError:  # urllib's errors: a refused connection, a timeout, a status other than 2xx
            self._unanswered += 1
        return self._unanswered >= LIVENESS_CHECKS

    def _watch_from_now(self) -> None:
        """Supervision of a server just ready: its stubs (a check notices only the death of a stub it knew,
        and the first check comes WATCH_INTERVAL_S later: a stub killed in between was never replaced),
        and a fresh count of unanswered health checks."""
        self._known.update({stub.pid: stub for stub in self.stubs()})
        self._last_probe, self._unanswered = time.monotonic(), 0

    def _died(self, stub: Stub) -> bool:
        """A stub that exited while its instance still holds its region: killed, not unloaded (an unload
        removes the region just after the stub exits)."""
        self._stopping.wait(STUB_EXIT_GRACE_S)
        return stub.region.exists() and not self._stopping.is_set()

    def _reload(self, model: str, reason: str, dead_regions: set[Path]) -> bool:
        """Reload `model` with the config it runs now (an operating point set through the load API stays),
        one parameter changed so that Triton loads new instances; the old ones finish their requests, then
        Triton unloads them and removes their regions (`dead_regions`: those of instances whose stub died)."""
        self._note(f"{reason}: reloading {model}")
        started = time.monotonic()
        replaced = {pid for pid, stub in self._known.items() if stub.model == model}
        regions = dead_regions | {self._known[pid].region for pid in replaced}
        try:
            config = self._request(f"/v2/models/{model}/config")
            if self._stopping.is_set():  # stop() began while it waited (its SIGCONT wakes a stopped server): no load now
                return False
            parameters = config.setdefault("parameters", {})
            count = int(parameters.get(RELOAD_PARAMETER, {}).get("string_value", "0")) + 1
            parameters[RELOAD_PARAMETER] = {"string_value": str(count)}
            self._request(f"/v2/repository/models/{model}/load", {"parameters": {"config": json.dumps(config)}})
        except (OSError, ValueError) as error:  # urllib's errors are OSErrors
            if self._stopping.is_set():  # stop() ended the server under it: not a failed reload
                return False
            self._record(f"{reason}; the reload failed ({error})", f"reload {model}", False, started)
            return False
        self._retired |= replaced
        deadline, draining = self._draining.get(model, (time.monotonic() + self.drain_timeout_s, set()))
        self._draining[model] = (deadline, draining | regions)
        self._record(reason, f"reload {model}", True, started)
        return True

    def _restart(self, reason: str, *, graceful: bool = True) -> None:
        """Stop what is left of the server and start it again on the same ports; give up after
        MAX_FAILED_RESTARTS restarts in a row that did not bring it up (a broken repository, not a crash)."""
        self._note(f"{reason}: restarting tritonserver")
        started = time.monotonic()
        self._terminate(self._process, graceful=graceful)
        self._remove_leftovers()
        self._known.clear()
        self._retired.clear()
        self._draining.clear()
        try:
            self._launch()
            self._wait_ready()
        except ServerError as error:
            self._terminate(self._process)
            if self._stopping.is_set():  # stop() ended it: not a failed restart
                return
            self._record(f"{reason}; the restart failed ({str(error).splitlines()[0].rstrip(':')})", "restart", False, started)
            failed = 0
            for previous in reversed(self.recoveries):
                if previous.action != "restart" or previous.ok:
                    break
                failed += 1
            if failed >= MAX_FAILED_RESTARTS:
                self._note(f"{failed} restarts in a row failed: giving up")
                self._remove_leftovers()
                self._stopping.set()  # ends the watchdog: serving() turns False
            return  # otherwise the next check restarts it again
        self.shm_region_limits = self._served_region_limits()
        self._watch_from_now()
        self._record(reason, "restart", True, started)

    def _served_region_limits(self) -> dict[str, int]:
        """Each model's largest legitimate region (serve.sizing, what /dev/shm is sized with) for the
        repository's configs as this launch read them."""
        # imported here: the package imports this module, and `python -m serve.sizing` must find sizing not yet loaded
        from serve.sizing import region_limits

        return region_limits(self._deployment)

    def _request(self, path: str, body: dict | None = None) -> dict:
        """One call to the server's HTTP API (with the admin key, which the load API may need)."""
        headers = {ADMIN.header: self._admin_key} if self._admin_key else {}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=data, headers=headers, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=self.startup_timeout_s) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def _record(self, reason: str, action: str, ok: bool, started: float) -> None:
        recovery = Recovery(reason=reason, action=action, ok=ok, at=time.time(), seconds=round(time.monotonic() - started, 2))
        self.recoveries.append(recovery)
        self._note(f"{reason}: {action} {'done' if ok else 'FAILED'} in {recovery.seconds:.1f} s")

    def _note(self, message: str) -> None:
        """To the launcher's log and the server log (where an operator looks first)."""
        log.warning("watchdog: %s", message)
        # a stream (LOG_STREAMS: a container's log, a file the launcher's output goes to) already carries the
        # launcher's own line, and a line appended through a reopened one would be overwritten by Triton's next
        if self._log_file is None or str(self._log_file) in LOG_STREAMS:
            return
        if self._log_file.is_file() or not self._log_file.exists():
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            try:
                with open(self._log_file, "a", encoding="utf-8") as stream:
                    stream.write(f"W {stamp} ct-triage watchdog: {message}\n")
            except OSError:  # its folder removed, a full disk: the launcher's log has it, and supervision goes on
                pass

    # -- processes and memory ------------------------------------------------------------------
    def stubs(self) -> list[Stub]:
        """The live Python-backend stubs of this server, from /proc (a stub's command line names its
        model file, its region and its instance)."""
        if self._process is None:
            return []
        found = []
        for pid in process_tree(self._process.pid):
            try:
                words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if Path(words[0].decode(errors="replace")).name == STUB_BINARY and len(words) > 8:
                model = Path(words[1].decode(errors="replace")).parent.parent.name
                found.append(Stub(pid, model, words[8].decode(errors="replace"), SHM_DIR / words[2].decode(errors="replace")))
        return found

    def resident_bytes(self) -> dict[str, int]:
        """Resident memory of the server and of each stub (by instance name; a stub's includes the
        pages of its region it has touched)."""
        if self._process is None:
            return {}
        sizes = {"tritonserver": _resident_bytes(self._process.pid)}
        for stub in self.stubs():
            sizes[stub.instance] = _resident_bytes(stub.pid)
        return sizes

    def shm_bytes(self) -> int:
        """Pages of /dev/shm this server's regions hold (the backend allocates a region's whole size)."""
        total = 0
        for region in self.leaked_shm():
            try:
                total += region.stat().st_blocks * 512
            except OSError:
                continue
        return total

    def _reap_stubs(self) -> None:
        deadline = time.monotonic() + 10
        while self.orphans() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.orphans():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def orphans(self) -> list[int]:
        """Processes started for this server that are still alive (stubs carry our shm prefix)."""
        return _processes_mentioning(self.shm_prefix)

    def leaked_shm(self) -> list[Path]:
        """Shared-memory regions with this server's prefix (none may remain after stop)."""
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.exists() else []

    def _readable_log(self) -> Path | None:
        """The server log, where it can be read back: a regular file (never a /dev/stdout, whose
        reading would take the lines meant for a container's log collector)."""
        return self._log_file if self._log_file is not None and self._log_file.is_file() else None

    def _load_failure(self) -> str | None:
        """The first model this launch failed to load, or model folder it could not read (a stray folder, a config
        that does not parse), and why, from Triton's log (one line: the reason's first line): what a start-up
        failure's one-line message and a failed restart's reason name."""
        if self._readable_log() is None:
            return None
        try:
            with open(self._log_file, "rb") as stream:
                stream.seek(self._launched_at)
                text = stream.read().decode(errors="replace")
        except OSError:  # the log removed
            return None
        found = re.search(
            r"(?:failed to load '([^']+)' version (\d+)|Poll failed for model directory '([^']+)'): (.*?)(?:\\n|\"$)", text, re.MULTILINE
        )
        if found is None:
            return None
        failed = f"failed to load {found[1]} version {found[2]}" if found[1] else f"cannot read the model folder {found[3]}"
        return f"{failed}: {found[4]}"

    def _failure_log(self, lines: int = 40) -> str:
        """Triton's error lines (glog "E<date>"), which a long unload sequence can push out of the
        tail, then the tail."""
        if self._readable_log() is None:
            return f"(the server log: {self._log_file})" if self._log_file is not None else "(no server log)"
        text = self._log_file.read_text(errors="replace").splitlines()
        errors = [line for line in text if re.match(r"E\d{4} ", line)][:10]
        head = [*errors, "..."] if errors else []
        return "\n".join(head + text[-lines:])

    def log_tail(self, lines: int = 40) -> str:
        if self._readable_log() is None:
            return f"(the server log: {self._log_file})" if self._log_file is not None else "(no server log)"
        text = self._log_file.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_on_free_ports(repository: str | os.PathLike, *, attempts: int = 3, **options) -> TritonServer:
    """A started TritonServer on ports the kernel reports free. Another process can take one between
    that check and the server's bind, so a port clash is retried (with new ports), anything else raised."""
    for attempt in range(attempts):
        http_port, grpc_port, metrics_port = free_ports(3)
        server = TritonServer(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, **options)
        try:
            return server.start()
        except ServerError as error:
            if "in use" not in str(error).lower() or attempt == attempts - 1:
                raise
    raise ServerError("no free ports")  # attempts < 1


def _check_log_file(path: Path) -> None:
    """The server log can be appended to (its folder made if missing): one line, before anything starts."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise ServerError(f"log file {path} cannot be written ({error.strerror or type(error).__name__})") from None


def _open_log(path: Path):
    """The server log, opened for Triton to append to. /dev/stdout and /dev/stderr are this process's own
    descriptors, not reopened: a reopened file (stdout redirected to one) has an offset of its own, and the
    launcher's lines and Triton's would overwrite each other."""
    descriptor = LOG_STREAMS.get(str(path))
    return open(path, "ab") if descriptor is None else open(descriptor, "ab", closefd=False)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _stopped(pid: int) -> bool:
    """A process stopped by a signal (state T), which will serve nothing until someone continues it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _resident_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM the server if its launcher dies, even by SIGKILL.

    Linux delivers it when the launching *thread* exits, so start servers from a thread that
    lives as long as they should (the main thread, as the CLI, the demo and the tests do).
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
