"""Weights for the classifier: the research team's checkpoint, or seeded demo weights.

Accepted checkpoints (all read with torch.load(weights_only=True), so no arbitrary objects are
unpickled): MedicalNet's released format ({'state_dict'} with `module.` and a `conv_seg` head),
Lightning `.ckpt` files (keys prefixed `model.`, `net.`, ...), and plain state_dicts. After the
prefix is removed the keys must match the network exactly: a silent partial load would serve a
model that is not the one that was validated.
"""

from __future__ import annotations

import functools
import logging
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from classifier import file_sha256
from classifier.network import BLOCKS_PER_LAYER, CHANNELS, NUM_CLASSES, ResNet34Classifier

from .errors import ArchitectureError, CheckpointError
from .volumes import smooth

log = logging.getLogger(__name__)

DEMO_SEED = 0
DEMO_PROVENANCE = "demo, untrained"
# BatchNorm statistics are measured at this size: large enough that the dilated layers are not
# dominated by zero padding (calibrated at 32^3 the logits saturate at 64^3 and above).
_CALIBRATION_SIZE = 64
_LIST_LIMIT = 8  # keys named in one error line; the rest are counted
_STEM_KEYS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight")
_KNOWN_BLOCK_LAYOUTS = {(1, 1, 1, 1): "ResNet-10", (2, 2, 2, 2): "ResNet-18"}  # ResNet-50's layout is ResNet-34's: its shapes differ
# A checkpoint's records may hold this many times the network's float32 weights (about 2 GB): room
# for a Lightning checkpoint's optimizer state (Adam: two moments per weight) even in float64, while
# torch.load, which reads every record into memory, stays within a machine's means.
CHECKPOINT_SIZE_FACTOR = 8
# The dtypes weights may be stored in: each converts to the network's float32, checked after.
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_COUNTER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # BatchNorm's num_batches_tracked
_READABLE_PROTOCOLS = (2, 3)  # the pickle protocols weights-only loading reads (torch.save's default is 2)


@dataclass(frozen=True)
class Weights:
    """A state_dict with exactly the network's keys, and where it came from."""

    state_dict: dict[str, torch.Tensor]
    source: str  # checkpoint SHA-256, or DEMO_PROVENANCE
    checkpoint_format: str  # "medicalnet", "lightning", "state_dict" or "demo"
    head_trained: bool  # False when the FC layer was initialised here (MedicalNet backbone, demo)
    warnings: tuple[str, ...] = field(default=())


def build_classifier(weights: Weights) -> ResNet34Classifier:
    """The network in eval mode with these weights loaded (strictly)."""
    return ResNet34Classifier.from_state_dict(weights.state_dict)


def _network_state() -> dict[str, torch.Tensor]:
    """The network's keys, shapes and dtypes, without allocating or initialising its weights."""
    with torch.device("meta"):
        return ResNet34Classifier().state_dict()


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f" (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else "")


@functools.cache
def most_checkpoint_bytes() -> int:
    """The most a checkpoint's records may hold once read (CHECKPOINT_SIZE_FACTOR x the float32 network)."""
    return CHECKPOINT_SIZE_FACTOR * 4 * sum(value.numel() for value in _network_state().values())


def _check_archive(path: Path) -> None:
    """torch.load inflates a compressed record of its zip format in full before anything can be
    checked (a 2 MB file can hold gigabytes of zeros), so the records are looked at first: torch.save
    never compresses them, and together they may hold at most most_checkpoint_bytes(). Files in the
    legacy (non-zip) format are left to torch.load."""
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":  # torch's own test for its zip format
            return
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as error:
        raise CheckpointError(f"{path.name} is not a PyTorch checkpoint: {error}") from None
    compressed = [record.filename for record in records if record.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(
            f"{path.name} has compressed records ({_key_list(compressed)}), which torch.save never writes and "
            "torch.load would inflate in full: refused; save the state_dict with torch.save"
        )
    total, bound = sum(record.file_size for record in records), most_checkpoint_bytes()
    if total > bound:
        raise CheckpointError(
            f"{path.name} holds {total / 1e9:.2f} GB of records, more than the {bound / 1e9:.2f} GB a checkpoint of this "
            f"network may hold ({CHECKPOINT_SIZE_FACTOR}x its float32 weights); save the state_dict alone"
        )


def _pickle_protocol(path: Path) -> int | None:
    """The protocol the checkpoint's pickle declares (its first opcode, PROTO), read without unpickling;
    None where it declares none (protocols 0 and 1) or holds no pickle."""
    with path.open("rb") as handle:
        if handle.read(4) == b"PK\x03\x04":
            with zipfile.ZipFile(handle) as archive:
                pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
                head = archive.open(pickles[0]).read(2) if pickles else b""
        else:
            handle.seek(0)
            head = handle.read(2)
    return head[1] if len(head) == 2 and head[:1] == pickle.PROTO else None


def _read(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns of any protocol but 2: 3 loads, 4 and 5 are refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported operand" in str(error) and (protocol := _pickle_protocol(path)) not in (None, *_READABLE_PROTOCOLS):
            raise CheckpointError(
                f"{path.name} was saved with pickle protocol {protocol}, which weights-only loading cannot read: "
                "save it again with torch.save's default protocol: torch.save(state_dict, path)"
            ) from None
        if "Unsupported operand" in str(error) or "Weights only load failed" not in str(error):
            raise CheckpointError(f"{path.name} is not a PyTorch checkpoint (not a valid pickle stream)") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module"
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path.name} holds pickled Python objects{what}, refused by weights-only loading; "
            "save the state_dict alone: torch.save(model.state_dict(), path)"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for files that are not checkpoints
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path.name} is not a PyTorch checkpoint: {first_line}") from None


def _state_dict_of(loaded: object, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor mapping inside a loaded checkpoint, and its format ("lightning" or "state_dict")."""
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{name} is not a state dict (it holds a {type(loaded).__name__})")
    checkpoint_format = "state_dict"  # also a plain {"state_dict": ...} wrapper
    if isinstance(loaded.get("state_dict"), dict):
        if "pytorch-lightning_version" in loaded or "epoch" in loaded:
            checkpoint_format = "lightning"
        loaded = loaded["state_dict"]
    tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors or len(tensors) != len(loaded) or not all(isinstance(key, str) for key in loaded):
        raise CheckpointError(f"{name} is not a state dict: expected a mapping of parameter names to tensors")
    return tensors, checkpoint_format


def _strip_prefix(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Remove the wrapper prefix (`module.`, `model.`, `net.`, ...) found in front of the stem keys."""
    candidates = sorted((key[: -len(_STEM_KEYS[0])] for key in state if key.endswith(_STEM_KEYS[0])), key=len)
    for prefix in candidates:
        if (not prefix or prefix.endswith(".")) and all(prefix + key in state for key in _STEM_KEYS):
            outside = sorted(key for key in state if not key.startswith(prefix))
            if outside:
                raise ArchitectureError(f"{name}: unexpected keys outside the network '{prefix}': {_key_list(outside)}")
            return {key[len(prefix) :]: value for key, value in state.items()}
    raise ArchitectureError(
        f"{name} is not a MedicalNet ResNet: no stem keys ({', '.join(_STEM_KEYS)}) under any prefix; it holds {_key_list(sorted(state))}"
    )


def _check_layout(state: dict[str, torch.Tensor], name: str) -> None:
    """Name the architecture when it is clearly another one, before listing key differences."""
    if any(".downsample." in key for key in state):
        raise ArchitectureError(
            f"{name} has downsample (shortcut B) weights: a MONAI/torchvision-style ResNet, "
            "not MedicalNet's shortcut-A ResNet-34 (layer3/4 dilated at stride 1)"
        )
    blocks = [0, 0, 0, 0]
    for key in state:
        found = re.match(r"layer([1-4])\.(\d+)\.", key)
        if found:
            layer = int(found.group(1)) - 1
            blocks[layer] = max(blocks[layer], int(found.group(2)) + 1)
    if tuple(blocks) != BLOCKS_PER_LAYER:
        known = _KNOWN_BLOCK_LAYOUTS.get(tuple(blocks), "an unknown ResNet")
        raise ArchitectureError(
            f"{name} has residual blocks {blocks} per layer ({known}); this network is MedicalNet ResNet-34 {list(BLOCKS_PER_LAYER)}"
        )


def _match(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Strict key and shape matching against the network; fills only num_batches_tracked."""
    expected = _network_state()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=value.dtype)  # older checkpoints predate this counter; it is unused in eval
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_key_list(unexpected)}")
        raise ArchitectureError(f"{name} does not match MedicalNet ResNet-34: " + "; ".join(parts))
    mismatched = [key for key in expected if tuple(state[key].shape) != tuple(expected[key].shape)]
    if mismatched:
        details = [
            f"{key} is {list(state[key].shape)} in the checkpoint, {list(expected[key].shape)} in the network"
            for key in mismatched[:_LIST_LIMIT]
        ]
        more = f" (+{len(mismatched) - _LIST_LIMIT} more)" if len(mismatched) > _LIST_LIMIT else ""
        raise ArchitectureError(f"{name}: shape mismatch: " + "; ".join(details) + more)
    _check_tensors(state, expected, name)
    converted = {key: state[key].to(expected[key].dtype).contiguous() for key in expected}
    _check_values(converted, state, name)
    return converted


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_tensors(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], name: str) -> None:
    """Tensors the conversion to the network's dtypes and the value checks can handle: dense CPU
    tensors (sparse and meta tensors load, then crash them with a traceback) of a floating-point
    dtype they know (integers would silently become zeros; float8 types crash the check)."""
    for key in expected:
        value = state[key]
        if value.layout != torch.strided:
            layout = str(value.layout).removeprefix("torch.")
            raise CheckpointError(f"{name}: {key} is a {layout} tensor, not a dense (strided) one; save it with .to_dense()")
        if value.device.type != "cpu":
            placeholder = " (a placeholder without values)" if value.device.type == "meta" else ""
            raise CheckpointError(f"{name}: {key} is a tensor on the {value.device.type} device{placeholder}, not a CPU tensor")
        if key.endswith("num_batches_tracked"):
            if value.dtype not in _COUNTER_DTYPES:
                raise CheckpointError(f"{name}: {key} holds {_dtype_name(value.dtype)} values, not an integer counter")
        elif value.dtype not in _WEIGHT_DTYPES:
            what = "not floating-point weights" if not value.is_floating_point() else "a dtype export does not convert"
            choices = ", ".join(_dtype_name(dtype) for dtype in _WEIGHT_DTYPES)
            raise CheckpointError(f"{name}: {key} holds {_dtype_name(value.dtype)} values, {what} (use {choices})")


def _check_values(converted: dict[str, torch.Tensor], state: dict[str, torch.Tensor], name: str) -> None:
    """Weights the network can compute with, checked as exported (float32): a NaN, an infinity
    (also a float64 value beyond float32's range) or a negative variance would reach the served
    model (or fail parity, blamed on the export)."""
    for key, value in converted.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not bool(torch.isfinite(value).all()):
            stored = state[key]
            beyond = stored.dtype != value.dtype and bool(torch.isfinite(stored).all())
            where = f" as {_dtype_name(value.dtype)}: its {_dtype_name(stored.dtype)} values lie beyond that range" if beyond else ""
            raise CheckpointError(f"{name}: {key} holds non-finite values (NaN or infinite){where}")
        if key.endswith("running_var") and bool((value < 0).any()):
            raise CheckpointError(f"{name}: {key} holds negative variances")


def _seeded_fc(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bound = CHANNELS[-1] ** -0.5  # nn.Linear's own default range, drawn from a fixed seed
    weight = (torch.rand((NUM_CLASSES, CHANNELS[-1]), generator=generator) * 2 - 1) * bound
    return {"fc.weight": weight, "fc.bias": torch.zeros(NUM_CLASSES)}


def load_checkpoint(path: str | Path) -> Weights:
    """Read a checkpoint safely and return weights with exactly the network's keys.

    Raises CheckpointError / ArchitectureError with one line that says what is wrong.
    """
    path = Path(path)
    loaded = _read(path)
    state, checkpoint_format = _state_dict_of(loaded, path.name)
    state = _strip_prefix(state, path.name)
    warnings: list[str] = []
    head_trained = True
    head = sorted(key for key in state if key.startswith("conv_seg."))
    if head:
        if any(key.startswith("fc.") for key in state):
            raise ArchitectureError(f"{path.name} has both a segmentation head (conv_seg) and a classifier head (fc)")
        state = {key: value for key, value in state.items() if key not in head}
        state.update(_seeded_fc(DEMO_SEED))
        checkpoint_format, head_trained = "medicalnet", False
        warnings.append(
            "MedicalNet pretrained backbone: its segmentation head was dropped and the classifier head (fc) is "
            "UNTRAINED (seeded); the probabilities mean nothing until the model is fine-tuned"
        )
    _check_layout(state, path.name)
    state = _match(state, path.name)
    for message in warnings:
        log.warning(message)
    return Weights(state, file_sha256(path), checkpoint_format, head_trained, tuple(warnings))


def demo_weights(seed: int = DEMO_SEED) -> Weights:
    """Deterministic, untrained weights with realistic BatchNorm statistics.

    Convolutions use MedicalNet's own init (Kaiming, fan_out) from a fixed seed, BatchNorm affine
    parameters are perturbed, and the running statistics are measured on seeded smooth volumes,
    so activations stay well scaled, probabilities are not saturated, and an export bug that
    mishandles BatchNorm (e.g. folding) shows up as a parity failure. Computed once per process
    and seed (the calibration is seconds of CPU); each call gets its own copy of the tensors.
    """
    state = {key: value.clone() for key, value in _demo_state(seed).items()}
    return Weights(state, DEMO_PROVENANCE, "demo", head_trained=False)


@functools.cache
def _demo_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = ResNet34Classifier()  # every tensor is set below: no default initialisation to pay for
    model.to_empty(device="cpu")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.reset_running_stats()
            if isinstance(module, nn.Conv3d):
                fan_out = module.out_channels * module.weight[0, 0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_out) ** 0.5)
            elif isinstance(module, nn.BatchNorm3d):
                module.weight.copy_(0.8 + 0.4 * torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.momentum = None  # cumulative average: the running stats become the batch stats
        head = _seeded_fc(seed)
        model.fc.weight.copy_(head["fc.weight"])
        model.fc.bias.copy_(head["fc.bias"])
        model.train()
        model(smooth(2, _CALIBRATION_SIZE, generator))
    model.eval()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}
