"""The Triton model repository for one target: the committed one, or a rendered copy.

`model_repository/` is a real repository at the trained size S=256: its configs are committed and
parse as they are; the classifier's per-target configs are `configs/<target>.pbtxt`, which Triton
loads instead of `config.pbtxt` when started with `--model-config-name=<target>` (the `cpu`
target is `config.pbtxt` itself). Export adds only what the target serves:
- in place (the default): `ct_classifier/1/model.xml` + `model.bin` (cpu, openvino: OpenVINO IR),
  `1/model.onnx` (onnx-gpu), `1/model.plan` (tensorrt) or `1/model.pt` (torch-gpu: the weights
  PyTorch runs), `ct_explain/1/weights.pt` (the weights the explanation model runs, for every
  target), and `provenance.json` beside ct_classifier's, ct_postprocess's and ct_explain's model
  files. S, the largest batch and the operating point are read from the committed configs.
- a rendered copy (`out`, another folder): every model folder copied, the target's configs rendered
  with other serving options (S, batching, instances, threshold) as plain `config.pbtxt` files, and
  the same artifacts. Tests and benchmarks use small S this way.
What Triton never serves (the exported weights, the FP16 graph, the parity report, the ONNX graph a
TensorRT plan was built from) goes to the artifacts folder beside the repository,
`<repository>.artifacts/`, so the repository ships nothing it does not load.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from classifier import PRECISIONS
from contract import parse_threshold, validate_size
from settings import EXPORT_TARGETS, NAMES, OPERATING_POINT, PREPROCESSING, SERVING

from . import onnx_graph, parity, tensorrt_engine
from .checkpoint import DEMO_PROVENANCE, Weights, build_classifier, file_sha256, load_checkpoint
from .checkpoint import demo_weights as make_demo_weights
from .errors import ExportError, OutputFolderError

COMMITTED = Path(__file__).resolve().parent.parent / "model_repository"
TARGETS = EXPORT_TARGETS.names
IR_FILES = ("model.xml", "model.bin")  # OpenVINO IR: the graph, and its FP32 weights
SERVED_FILES = {"cpu": IR_FILES, "openvino": IR_FILES, "onnx-gpu": ("model.onnx",), "tensorrt": ("model.plan",), "torch-gpu": ("model.pt",)}
OPENVINO_TARGETS = ("cpu", "openvino")
WRITE_MARGIN_BYTES = 2**20  # beyond the weights: what the largest file export writes (a graph, an IR) holds besides them
MARKER = ".ct-triage-export.json"  # says "export wrote this folder": only such folders are ever replaced
LOCK_SUFFIX = ".export-lock"  # `.<folder>.export-lock` beside an output folder: held while an export writes it
PROVENANCE_FILE = "provenance.json"
ARTIFACTS_SUFFIX = ".artifacts"
WEIGHTS_FILE = "weights.pt"
PARITY_FILE = "parity.json"
FP16_FILE = "model.fp16.onnx"
CONFIG = "config.pbtxt"
TORCH_TARGET = "torch-gpu"
DEVICES = ("cpu", "cuda")  # where ct_preprocess and ct_explain run (KIND_CPU or KIND_GPU instances)
ONNX_PRECISION = {"openvino": "fp32", "onnx-gpu": "fp32 graph, fp16 TensorRT accelerator", "tensorrt": "fp16"}
CPU_PRECISIONS = ("fp32", "bf16")  # classifier.OpenVINOClassifier's; bf16 only ever by choice
# Targets whose classifier config has a `precision` parameter: its choices, the default first.
TARGET_PRECISIONS = {"cpu": CPU_PRECISIONS, TORCH_TARGET: ("fp16", *(p for p in PRECISIONS if p != "fp16"))}
GENERATED = frozenset({*(name for names in SERVED_FILES.values() for name in names), PROVENANCE_FILE, WEIGHTS_FILE})
# Tensors whose dims hold S, per model and direction: (name, dims at S) for every model that has them.
SIZED_TENSORS = {
    NAMES.preprocess: {"output": {NAMES.volume: 5}},
    NAMES.classifier: {"input": {NAMES.volume: 4}},
    NAMES.explain: {"input": {NAMES.volume: 5}, "output": {NAMES.attribution: 3}},
    NAMES.localize: {"input": {NAMES.attribution: 3}},
    NAMES.triage_explain: {"output": {NAMES.volume: 5, NAMES.attribution: 3}},
}


@dataclass(frozen=True)
class ServingOptions:
    """What a rendered copy may change; the committed configs hold the production values."""

    size: int = PREPROCESSING.size
    max_batch_size: int = SERVING.max_batch_size
    # the classifier's batching wait; None: the target's config (0 on the CPU targets, whose engine runs
    # the volumes of a batch one after another, so waiting for more only adds latency)
    max_queue_delay_microseconds: int | None = None
    preprocess_instances: int = SERVING.preprocess_instances
    preprocess_device: str = "cpu"  # "cuda": ct_preprocess on KIND_GPU instances, the volume handed over on the GPU
    explain_device: str = "cpu"  # "cuda": ct_explain on a KIND_GPU instance (an explanation in about one GPU inference)
    threshold: float = OPERATING_POINT.threshold
    precision: str | None = None  # the classifier's `precision` parameter (cpu, torch-gpu); None: the config's

    def validated(self) -> ServingOptions:
        """The same options with the threshold as a float; ContractError/ExportError on a bad value."""
        validate_size(self.size)
        _check_integer("max batch size", self.max_batch_size, 1, SERVING.most_max_batch_size)
        _check_integer("preprocess instances", self.preprocess_instances, 1, SERVING.most_preprocess_instances)
        if self.max_queue_delay_microseconds is not None:
            _check_integer("max queue delay", self.max_queue_delay_microseconds, 0, SERVING.most_queue_delay_microseconds)
        for model, device in (("preprocess", self.preprocess_device), ("explain", self.explain_device)):
            if device not in DEVICES:
                raise ExportError(f"{model} device must be one of {', '.join(DEVICES)}, not {device!r}")
        return replace(self, threshold=parse_threshold(self.threshold))


@dataclass(frozen=True)
class ExportResult:
    """What write_repository produced."""

    repository: Path
    artifacts: Path
    target: str
    options: ServingOptions
    provenance: dict
    parity: parity.ParityReport
    timings_s: dict

    in_place: bool

    @property
    def model_config_name(self) -> str | None:
        """What tritonserver needs as --model-config-name to serve this target from this repository
        (a rendered copy's config.pbtxt is already the target's)."""
        return self.target if self.in_place and self.target != "cpu" else None


def _check_integer(name: str, value, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ExportError(f"{name} must be an integer from {minimum} to {maximum}, got {value!r}")


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")


def served_precision(target: str, classifier: model_config_pb2.ModelConfig) -> str:
    """What the target computes in; the `precision` parameter of the cpu and torch-gpu configs is
    checked here, before any work, rather than when the server loads it."""
    if target not in TARGET_PRECISIONS:
        return ONNX_PRECISION[target]
    choices = TARGET_PRECISIONS[target]
    precision = classifier.parameters["precision"].string_value if "precision" in classifier.parameters else choices[0]
    if precision not in choices:
        raise ExportError(f"{NAMES.classifier} precision {precision!r} for the {target} target: choose one of {', '.join(choices)}")
    return precision


def model_folders(repository: Path = COMMITTED) -> list[Path]:
    folders = sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not any(folder.name == NAMES.classifier for folder in folders):
        raise ExportError(f"{repository} holds no {NAMES.classifier} model")
    return folders


def config_path(folder: Path, target: str) -> Path:
    """The config Triton loads for this model under `--model-config-name=<target>`."""
    special = folder / "configs" / f"{target}.pbtxt"
    return special if target != "cpu" and special.is_file() else folder / CONFIG


def parse_config(text: str, source: str) -> model_config_pb2.ModelConfig:
    """Parse as Triton's ModelConfig protobuf: what the server will do at load time, done now."""
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise ExportError(f"{source} is not a valid Triton model config: {error}") from None


def target_configs(target: str, repository: Path = COMMITTED) -> dict[str, model_config_pb2.ModelConfig]:
    """model name -> the config Triton loads for `target`, parsed and name-checked."""
    _check_target(target)
    configs = {}
    for folder in model_folders(repository):
        path = config_path(folder, target)
        if not path.is_file():
            raise ExportError(f"{folder} holds no {CONFIG}: not a model folder, which Triton cannot load; remove it from {repository}")
        config = parse_config(path.read_text(), str(path.relative_to(repository.parent)))
        if config.name and config.name != folder.name:
            raise ExportError(f"{path} names the model {config.name!r}, not {folder.name!r}")
        configs[folder.name] = config
    return configs


def _volume(config: model_config_pb2.ModelConfig, tensors: str, name: str = NAMES.volume):
    (tensor,) = [t for t in getattr(config, tensors) if t.name == name]
    return tensor


def _sized_dims(size: int, rank: int) -> list[int]:
    """A tensor of S^3 voxels at `rank`: [S, S, S], [1, S, S, S] or [1, 1, S, S, S]."""
    return [1] * (rank - 3) + [size] * 3


def _sized_tensors(configs: dict[str, model_config_pb2.ModelConfig]):
    """(model, tensor config, rank) of every tensor whose dims hold S, in the models present."""
    for model, directions in SIZED_TENSORS.items():
        if model not in configs:
            continue
        for tensors, names in directions.items():
            for name, rank in names.items():
                yield model, _volume(configs[model], tensors, name), rank


def serving_options(configs: dict[str, model_config_pb2.ModelConfig]) -> ServingOptions:
    """The options a set of configs serves with; ExportError if its models disagree on S."""
    classifier, preprocess = configs[NAMES.classifier], configs[NAMES.preprocess]
    size = int(_volume(classifier, "input").dims[-1])
    if list(_volume(classifier, "input").dims) != [1, size, size, size] or list(_volume(preprocess, "output").dims) != [
        1,
        1,
        size,
        size,
        size,
    ]:
        raise ExportError(f"{NAMES.preprocess} and {NAMES.classifier} configs disagree on the volume shape (S)")
    for model, tensor, rank in _sized_tensors(configs):
        if list(tensor.dims) != _sized_dims(size, rank):
            raise ExportError(f"{model}'s {tensor.name} {list(tensor.dims)} disagrees with {NAMES.classifier}'s S={size}")
    return ServingOptions(
        size=validate_size(size, "the configs' S"),
        max_batch_size=classifier.max_batch_size,
        max_queue_delay_microseconds=classifier.dynamic_batching.max_queue_delay_microseconds,
        preprocess_instances=sum(group.count for group in preprocess.instance_group),
        preprocess_device=preprocess.parameters["device"].string_value if "device" in preprocess.parameters else "cpu",
        explain_device=configs[NAMES.explain].parameters["device"].string_value,
        threshold=parse_threshold(configs[NAMES.postprocess].parameters["threshold"].string_value),
    ).validated()


def render_configs(target: str, options: ServingOptions, repository: Path = COMMITTED) -> dict[str, model_config_pb2.ModelConfig]:
    """The committed configs for `target` with `options` applied (S, batching, instances and device of
    preprocessing, device of explanations, threshold, and the classifier's precision where the
    target offers a choice)."""
    options = options.validated()
    configs = target_configs(target, repository)
    size = options.size
    for _, tensor, rank in _sized_tensors(configs):  # the volume and the attribution map, in every model that has them
        tensor.dims[:] = _sized_dims(size, rank)
    preprocess = configs[NAMES.preprocess]
    (group,) = preprocess.instance_group
    group.count = options.preprocess_instances
    group.kind = group.KIND_GPU if options.preprocess_device == "cuda" else group.KIND_CPU
    preprocess.parameters["device"].string_value = options.preprocess_device
    explain = configs[NAMES.explain]
    (group,) = explain.instance_group
    group.kind = group.KIND_GPU if options.explain_device == "cuda" else group.KIND_CPU
    explain.parameters["device"].string_value = options.explain_device
    classifier = configs[NAMES.classifier]
    # The NGC OpenVINO backend runs only full batches: its config keeps one study per batch.
    classifier.max_batch_size = 1 if target == "openvino" else options.max_batch_size
    if options.max_queue_delay_microseconds is not None:
        classifier.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_microseconds
    for warmup in classifier.model_warmup:
        warmup.inputs[NAMES.volume].dims[:] = [1, size, size, size]
    if any(warmup.batch_size > 1 for warmup in classifier.model_warmup):
        # engines that tune per input shape (cuDNN autotuning, ONNX Runtime's shape range) warm up at every
        # batch size the dynamic batcher can form, so that no study pays for the tuning
        template = model_config_pb2.ModelWarmup()
        template.CopyFrom(classifier.model_warmup[0])
        del classifier.model_warmup[:]
        for batch in range(1, classifier.max_batch_size + 1):
            warmup = classifier.model_warmup.add()
            warmup.CopyFrom(template)
            warmup.name, warmup.batch_size = f"batch_{batch}", batch
    if options.precision is not None:
        if target not in TARGET_PRECISIONS:
            chosen = "; ".join(f"{name}: {', '.join(choices)}" for name, choices in TARGET_PRECISIONS.items())
            raise ExportError(
                f"precision {options.precision!r}: the {target} target serves {ONNX_PRECISION[target]} and takes no precision "
                f"(a precision is chosen for {chosen})"
            )
        classifier.parameters["precision"].string_value = options.precision
        served_precision(target, classifier)  # one of the target's choices
    configs[NAMES.postprocess].parameters["threshold"].string_value = repr(options.threshold)
    return configs


def config_text(config: model_config_pb2.ModelConfig, source: str) -> str:
    return f"# Rendered by `python -m export` from model_repository/{source} (its comments say why).\n" + text_format.MessageToString(
        config
    )


def _check_folder(folder: Path, kind: str) -> None:
    """An output folder export may replace: absent, empty, or an earlier export's of the same kind
    ("repository" or "artifacts"), whose parent takes new folders. Checked before any work."""
    if os.path.ismount(folder):  # whatever it holds: it cannot be renamed or removed, only written into
        raise OutputFolderError(f"output folder {folder} is a mount point, which export cannot replace: export into a folder inside it")
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / MARKER).is_file():
            raise OutputFolderError(f"output folder {folder} exists, is not empty and was not written by export: refusing to replace it")
        written = _marker_field(folder, "kind")
        if written not in (None, kind):
            raise OutputFolderError(f"output folder {folder} holds an earlier export's {written}, not its {kind}: refusing to replace it")
    parent = next((p for p in (folder.parent, *folder.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"cannot create {folder}: {parent} is not a writable folder")


def _check_outside(folder: Path, source: Path, what: str) -> None:
    """An output inside the source repository is a folder Triton takes for a model (and every later
    export of the source fails on it); one around it would hold the source. Checked before any work."""
    if folder == source or source in folder.parents:
        where = "the source repository" if folder == source else f"inside the source repository {source}"
        raise OutputFolderError(f"the {what} {folder} is {where}: choose a folder outside it")
    if folder in source.parents:
        raise OutputFolderError(f"the {what} {folder} holds the source repository {source}: choose a folder outside it")


def _marker(kind: str, **fields) -> str:
    """The MARKER of a folder export wrote: which kind of output it is, and what it holds."""
    return json.dumps({"written_by": "python -m export", "kind": kind, **fields}, indent=2) + "\n"


def _marker_field(folder: Path, field: str) -> str | None:
    """A field of the marker of an export's folder (its kind; an artifacts folder's repository); None where there
    is no marker or it lacks the field (markers that predate it)."""
    try:
        return json.loads((folder / MARKER).read_text()).get(field)
    except (OSError, ValueError, AttributeError):
        return None


def _owner(repository: Path, artifacts: Path) -> str:
    """The repository as the artifacts' marker names it: its resolved path relative to the artifacts' parent
    (`repository` beside them by default), so that the two moved together, or seen through another mount
    (a container's /models), still belong together, and same-named repositories elsewhere do not."""
    return os.path.relpath(repository, artifacts.parent)


def _check_artifacts_of(artifacts: Path, repository: Path) -> None:
    """An earlier export's artifacts are replaced only by an export of the same repository: another's would
    leave that repository's parity proof and weights those of a network it does not serve."""
    owner = _marker_field(artifacts, "repository")
    if owner not in (None, _owner(repository, artifacts)):
        raise OutputFolderError(
            f"artifacts folder {artifacts} holds the artifacts of the repository {os.path.normpath(artifacts.parent / str(owner))}, "
            f"not of {repository}: refusing to replace them (choose another --artifacts)"
        )


@contextlib.contextmanager
def _export_lock(folder: Path, what: str):
    """Held while this export writes `folder`, so that a second export into it fails at once instead of mixing
    its files with this one's: an flock on a lock file beside the folder (the folder itself is swapped for a
    staged one), which the OS releases when the process dies. The file and the parent folders made for it
    are removed at the end (the parents only if empty: the outputs keep theirs)."""
    made = [parent for parent in (folder.parent, *folder.parent.parents) if not parent.exists()]
    path = folder.with_name(f".{folder.name}{LOCK_SUFFIX}")
    handle = None
    try:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            handle = _locked(path)
        except OSError as error:
            raise OutputFolderError(f"cannot write beside {folder}: {error.strerror}") from None
        if handle is None:
            raise OutputFolderError(f"another export is writing the {what} {folder} (it holds {path}): wait until it has ended")
        yield
    finally:
        with _signals_held():
            if handle is not None:
                path.unlink(missing_ok=True)  # before the lock goes: the next export locks a file of its own
                os.close(handle)
            for parent in made:  # the deepest first
                with contextlib.suppress(OSError):  # only if empty: never what someone else put there meanwhile
                    parent.rmdir()


def _locked(path: Path) -> int | None:
    """A descriptor of the lock file `path`, locked; None if another process holds it. A file the holder removed
    between our open and our lock is no lock any more: the one now at `path` is tried instead."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        try:
            if os.path.samestat(os.fstat(handle), os.stat(path)):
                return handle
        except FileNotFoundError:
            pass
        os.close(handle)


def _staging(folder: Path) -> Path:
    """A new folder beside `folder` (its parent made by _export_lock)."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.export-", dir=folder.parent))
    except OSError as error:
        raise OutputFolderError(f"cannot write beside {folder}: {error.strerror}") from None
    staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    return staging


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block is done, then act as they would have: cut short, swapping
    the outputs in left no repository (between two renames), and cleaning up left folders behind."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers run in the main thread only: they never interrupt this one
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda received, _: caught.append(received)) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


def _install(staging: Path, folder: Path, kind: str) -> None:
    """Move a finished folder into place; an older export there is replaced only at the end."""
    _check_folder(folder, kind)  # again: someone may have filled it meanwhile
    try:
        if folder.is_dir() and any(folder.iterdir()):
            retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            try:
                folder.rename(retired / folder.name)
                staging.rename(folder)
            except OSError:  # the earlier export goes back
                if not folder.exists():
                    (retired / folder.name).rename(folder)
                retired.rmdir()
                raise
            shutil.rmtree(retired)
        else:
            if folder.is_dir():
                folder.rmdir()  # empty: nothing of the user's is lost
            staging.rename(folder)
    except OSError as error:
        raise OutputFolderError(f"cannot put the {kind} in place at {folder}: {error.strerror or error}") from None


def _parity(check, *args, size: int, **kwargs) -> parity.ParityReport:
    """check(*args, size=size, ...); running out of memory (a large parity size) is one line."""
    try:
        return check(*args, size=size, **kwargs)
    except Exception as error:  # torch and OpenVINO raise RuntimeError, ONNX Runtime its own type, numpy MemoryError
        if not isinstance(error, MemoryError) and "alloc" not in str(error).lower():
            raise
        text = str(error).strip()
        raise ExportError(
            f"the parity check at {size}^3 ran out of memory ({text.splitlines()[0] if text else type(error).__name__}): "
            "choose a smaller --parity-size"
        ) from None


def _python_model(config: model_config_pb2.ModelConfig) -> str | None:
    return (config.default_model_filename or "model.py") if config.backend == "python" else None


def _copy_model_files(folder: Path, destination: Path, config: model_config_pb2.ModelConfig) -> None:
    """A model's committed files without its configs; of the Python files in its version folder only
    the one the config runs (`model.py` or its default_model_filename), and none for other backends."""
    for source in sorted(folder.rglob("*")):
        relative = source.relative_to(folder)
        if (
            not source.is_file()
            or "__pycache__" in relative.parts
            or source.suffix == ".pyc"
            or relative.parts[0] == "configs"
            or relative.as_posix() == CONFIG
            or source.name in GENERATED  # what an earlier export put into this checkout: this export writes its own
            or (source.suffix == ".py" and source.name != _python_model(config))
        ):
            continue
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / relative)


def write_repository(
    out_dir: str | Path | None = None,
    *,
    target: str,
    checkpoint: str | Path | None = None,
    demo_weights: bool = False,
    size: int | None = None,
    max_batch_size: int | None = None,
    max_queue_delay_microseconds: int | None = None,
    preprocess_instances: int | None = None,
    preprocess_device: str | None = None,
    explain_device: str | None = None,
    threshold: float | None = None,
    precision: str | None = None,
    parity_size: int | None = None,
    artifacts_dir: str | Path | None = None,
    source: Path = COMMITTED,
) -> ExportResult:
    """Export the classifier for `target` into the `source` repository (out_dir None: the committed
    one), or render a copy of it into out_dir with the serving options given (the others from settings).

    Fails (ExportError, ContractError) before writing anything if the inputs are wrong, and without
    touching the repository if the export or the parity check fails.
    """
    started = time.perf_counter()
    source = Path(source).resolve()
    in_place = out_dir is None or Path(out_dir).resolve() == source
    repository = source if in_place else Path(out_dir).resolve()  # "." has no name to put beside
    given = dict(
        size=size,
        max_batch_size=max_batch_size,
        max_queue_delay_microseconds=max_queue_delay_microseconds,
        preprocess_instances=preprocess_instances,
        preprocess_device=preprocess_device,
        explain_device=explain_device,
        threshold=threshold,
        precision=precision,
    )
    given = {key: value for key, value in given.items() if value is not None}
    if in_place and given:
        raise ExportError(
            f"{', '.join(sorted(given))}: the committed repository's configs set these; edit them there, "
            "or render a copy with other values into another folder (--out)"
        )
    if target == "openvino" and "max_batch_size" in given:
        raise ExportError(
            f"max batch size {max_batch_size}: the openvino target serves one study per batch (the NGC image's OpenVINO "
            "backend runs only full batches); leave --max-batch-size out"
        )
    if not in_place:
        _check_outside(repository, source, "output folder")  # first: "/" has no name to put the artifacts beside
    artifacts = Path(artifacts_dir).resolve() if artifacts_dir is not None else repository.with_name(repository.name + ARTIFACTS_SUFFIX)
    _check_outside(artifacts, source, "artifacts folder")
    if in_place:
        configs = target_configs(target, source)
        options = serving_options(configs)
    else:
        options = replace(ServingOptions(), **given).validated()
        configs = render_configs(target, options, source)
    parity_size = validate_size(min(options.size, parity.MAX_PARITY_SIZE) if parity_size is None else parity_size, "parity size")
    if parity_size > options.size:
        raise ExportError(f"parity size {parity_size} is larger than the served size S={options.size}: choose at most {options.size}")
    if (checkpoint is None) == (not demo_weights):
        raise ExportError("give exactly one of a checkpoint or demo weights")
    if artifacts == repository or artifacts in repository.parents or repository in artifacts.parents:
        raise OutputFolderError(
            f"the artifacts folder {artifacts} and the repository {repository} must be separate, neither inside the other"
        )
    _check_folder(artifacts, "artifacts")
    _check_artifacts_of(artifacts, repository)
    if not in_place:
        _check_folder(repository, "repository")
    if target == "tensorrt":
        tensorrt_engine.require_tensorrt()  # before minutes of work, not after
    with _export_lock(repository, "repository"), _export_lock(artifacts, "artifacts folder"):
        return _export(
            target=target,
            checkpoint=checkpoint,
            configs=configs,
            options=options,
            parity_size=parity_size,
            repository=repository,
            artifacts=artifacts,
            source=source,
            in_place=in_place,
            started=started,
        )


def _export(
    *,
    target: str,
    checkpoint: str | Path | None,
    configs: dict[str, model_config_pb2.ModelConfig],
    options: ServingOptions,
    parity_size: int,
    repository: Path,
    artifacts: Path,
    source: Path,
    in_place: bool,
    started: float,
) -> ExportResult:
    """write_repository's work, on checked inputs and locked outputs (checkpoint None: demo weights)."""
    timings: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - since, 3)
        return now

    mark = time.perf_counter()
    weights: Weights = load_checkpoint(checkpoint) if checkpoint is not None else make_demo_weights()
    classifier = build_classifier(weights)
    mark = lap("weights", mark)

    staged: list[Path] = []
    placed: list[tuple[Path, Path]] = []  # (temporary, destination) of the files an export in place renames
    writing = ("artifacts folder", artifacts)  # the output whose files are being written, for a write failure's message
    try:
        kept = _staging(artifacts)
        staged.append(kept)
        precision = served_precision(target, configs[NAMES.classifier])
        engine: dict[str, str] = {}  # what runs the served files, where the format does not say it
        if target == TORCH_TARGET:  # the served engine itself, on the GPU when this machine has one
            device = "cuda" if torch.cuda.is_available() else "cpu"
            report = _parity(
                parity.check_torch_parity, classifier, device=device, precision=precision, size=parity_size, threshold=options.threshold
            )
            mark = lap("parity", mark)
        else:
            graph = kept / "model.onnx"
            onnx_graph.export_fp32(classifier, graph)
            mark = lap("onnx_fp32", mark)
            graphs = [onnx_graph.check_graph(graph)]
            if target in OPENVINO_TARGETS:
                from classifier.openvino_engine import convert, openvino_version  # GPU servers need no OpenVINO

                convert(graph, kept / IR_FILES[0])
                engine = {"engine": f"openvino {openvino_version()}"}
                mark = lap("openvino_ir", mark)
                report = _parity(
                    parity.check_openvino_parity,
                    classifier,
                    kept / IR_FILES[0],
                    size=parity_size,
                    threshold=options.threshold,
                    precision=precision,
                )
            else:
                clamped = onnx_graph.convert_fp16(graph, kept / FP16_FILE)
                mark = lap("onnx_fp16", mark)
                graphs.append(onnx_graph.check_graph(kept / FP16_FILE, clamped))
                report = _parity(parity.check_parity, classifier, graph, kept / FP16_FILE, size=parity_size, threshold=options.threshold)
            report.graphs = [vars(checked) for checked in graphs]
            mark = lap("parity", mark)
        (kept / PARITY_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if not report.passed:
            raise ExportError("exported model does not match the checkpoint: " + "; ".join(report.failures))
        served = [kept / name for name in SERVED_FILES[target]]
        if target == "tensorrt":
            tensorrt_engine.build_engine(graph, served[0], size=options.size, max_batch_size=options.max_batch_size)
            mark = lap("tensorrt_engine", mark)
        torch.save(weights.state_dict, kept / WEIGHTS_FILE)
        if target == TORCH_TARGET:
            shutil.copyfile(kept / WEIGHTS_FILE, served[0])
        provenance = {
            "checkpoint": weights.source if weights.source == DEMO_PROVENANCE else f"sha256:{weights.source}",
            "checkpoint_format": weights.checkpoint_format,
            "classifier_head_trained": weights.head_trained,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "size": options.size,
            "precision": precision,
            "target": target,
            **({} if target == TORCH_TARGET else {"opset": onnx_graph.OPSET}),
            **engine,
            "weights_sha256": file_sha256(kept / WEIGHTS_FILE),
            "served_sha256": {path.name: file_sha256(path) for path in served},
            "parity": report.summary(),
            "warnings": list(weights.warnings),
        }
        provenance_text = json.dumps(provenance, indent=2) + "\n"
        (kept / PROVENANCE_FILE).write_text(provenance_text)
        (kept / MARKER).write_text(_marker("artifacts", repository=_owner(repository, artifacts)))
        served_files = {
            **{Path(NAMES.classifier, "1", path.name): path for path in served},
            Path(NAMES.classifier, "1", PROVENANCE_FILE): kept / PROVENANCE_FILE,
            Path(NAMES.postprocess, "1", PROVENANCE_FILE): kept / PROVENANCE_FILE,
        }
        if NAMES.explain in configs:  # the explanation model runs the exported weights in PyTorch on every target
            served_files[Path(NAMES.explain, "1", WEIGHTS_FILE)] = kept / WEIGHTS_FILE
            served_files[Path(NAMES.explain, "1", PROVENANCE_FILE)] = kept / PROVENANCE_FILE
        writing = ("repository", repository)
        if in_place:
            _place_in_place(source, served_files, placed)
        else:
            rendered = _staging(repository)
            staged.append(rendered)
            for folder in model_folders(source):
                config = configs[folder.name]
                (rendered / folder.name).mkdir()
                _copy_model_files(folder, rendered / folder.name, config)
                origin = config_path(folder, target).relative_to(source).as_posix()
                (rendered / folder.name / CONFIG).write_text(config_text(config, origin))
            for relative, written in served_files.items():
                (rendered / relative).parent.mkdir(parents=True, exist_ok=True)  # a version folder may hold no model.py
                shutil.copy2(written, rendered / relative)
            (rendered / MARKER).write_text(_marker("repository", **provenance))
        for path in served:
            path.unlink()  # now in the repository: the artifacts keep only what Triton does not load
        with _signals_held():  # both outputs go in before an interrupt acts
            if in_place:
                _replace_in_place(source, placed, target)
            else:
                _install(rendered, repository, "repository")
            _install(kept, artifacts, "artifacts")
    except BaseException as error:
        failed = _write_failure(error, *writing, weights)  # before the clean-up gives the space back
        with _signals_held():  # a second Ctrl-C or SIGTERM must not cut the clean-up short
            for folder in staged:
                shutil.rmtree(folder, ignore_errors=True)
            for temporary, _ in placed:
                temporary.unlink(missing_ok=True)
        if failed is not None:
            raise failed from None
        raise
    lap("total", started)
    return ExportResult(repository, artifacts, target, options, provenance, report, timings, in_place)


def _write_failure(error: BaseException, what: str, folder: Path, weights: Weights) -> OutputFolderError | None:
    """A failed write of an output (a full disk or quota, a file-size limit) as one line naming it and the cause.
    OpenVINO's save_model and torch.save raise a RuntimeError that does not say why (`basic_ios::clear: iostream
    error`, `file write failed`) and remove what they wrote: the disk is named as the cause when it has no room
    left for the largest file export writes (the weights in FP32, and a graph's or an IR's own bytes)."""
    if isinstance(error, OSError):
        cause = error.strerror or str(error)
    elif (
        isinstance(error, RuntimeError)
        and _free_bytes(folder.parent) < 4 * sum(t.numel() for t in weights.state_dict.values()) + WRITE_MARGIN_BYTES
    ):
        cause = os.strerror(errno.ENOSPC)
    else:
        return None
    return OutputFolderError(f"cannot write the {what} {folder}: {cause}")


def _free_bytes(folder: Path) -> float:
    try:
        stats = os.statvfs(folder)
    except OSError:  # the folder gone: nothing known
        return float("inf")
    return stats.f_bavail * stats.f_frsize


def _place_in_place(repository: Path, files: dict[Path, Path], placed: list[tuple[Path, Path]]) -> None:
    """Copy each served file into the repository under a temporary name beside the old one, each
    added to `placed` as soon as it exists (so a failed export removes it)."""
    for relative, source in files.items():
        destination = repository / relative
        handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
        os.close(handle)
        placed.append((Path(temporary), destination))
        shutil.copyfile(source, temporary)
        os.chmod(temporary, 0o644)


def _replace_in_place(repository: Path, placed: list[tuple[Path, Path]], target: str) -> None:
    """Rename each placed file over the old one; the other target's graph goes, so version 1 holds
    exactly what is served."""
    for temporary, destination in placed:
        os.replace(temporary, destination)
    for name in GENERATED - {*SERVED_FILES[target], PROVENANCE_FILE}:
        (repository / NAMES.classifier / "1" / name).unlink(missing_ok=True)
