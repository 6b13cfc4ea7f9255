"""Checkpoint formats the research team produces load exactly; everything else is refused clearly."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import struct
import zipfile

import pytest
import torch

import export
from classifier import ResNet34Classifier
from export import (
    DEMO_PROVENANCE,
    ArchitectureError,
    CheckpointError,
    build_classifier,
    load_checkpoint,
)


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """A stand-in for the fine-tuned weights: random, with non-default BatchNorm statistics."""
    torch.manual_seed(7)
    state = ResNet34Classifier().state_dict()
    for key, value in state.items():
        if "running_mean" in key:
            state[key] = 0.1 * torch.randn_like(value)
        elif "running_var" in key:
            state[key] = 0.5 + torch.rand_like(value)
    return state


def _medicalnet_seg_head() -> dict[str, torch.Tensor]:
    """MedicalNet's conv_seg head (ConvTranspose3d, BN, Conv3d ... Conv3d to n_seg_classes)."""
    return {
        "conv_seg.0.weight": torch.randn(512, 32, 2, 2, 2),
        "conv_seg.0.bias": torch.randn(32),
        "conv_seg.1.weight": torch.ones(32),
        "conv_seg.1.bias": torch.zeros(32),
        "conv_seg.1.running_mean": torch.zeros(32),
        "conv_seg.1.running_var": torch.ones(32),
        "conv_seg.3.weight": torch.randn(32, 32, 3, 3, 3),
        "conv_seg.4.weight": torch.ones(32),
        "conv_seg.6.weight": torch.randn(2, 32, 1, 1, 1),
    }


def test_medicalnet_release_format_loads_backbone_and_warns(tmp_path, trained, caplog):
    backbone = {f"module.{k}": v for k, v in trained.items() if not k.startswith("fc.") and "num_batches" not in k}
    path = tmp_path / "resnet_34_23dataset.pth"
    torch.save({"state_dict": {**backbone, **{f"module.{k}": v for k, v in _medicalnet_seg_head().items()}}}, path)
    with caplog.at_level(logging.WARNING):
        weights = load_checkpoint(path)
    assert weights.checkpoint_format == "medicalnet" and not weights.head_trained
    assert "UNTRAINED" in weights.warnings[0] and "UNTRAINED" in caplog.text
    for key in ("conv1.weight", "layer3.5.bn2.running_var", "layer4.2.conv2.weight"):
        assert torch.equal(weights.state_dict[key], trained[key])
    assert not any(key.startswith("conv_seg") for key in weights.state_dict)
    assert weights.state_dict["fc.weight"].shape == (2, 512)
    assert weights.source == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("prefix", ["model.", "net.", "model.module."])
def test_lightning_checkpoint_with_prefix(tmp_path, trained, prefix):
    path = tmp_path / "fold0-epoch=12.ckpt"
    torch.save(
        {
            "epoch": 12,
            "global_step": 3400,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {prefix + key: value for key, value in trained.items()},
            "hyper_parameters": {"lr": 1e-4, "gamma": 2.0, "frozen_layers": ["conv1", "layer1"]},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        },
        path,
    )
    weights = load_checkpoint(path)
    assert weights.checkpoint_format == "lightning" and weights.head_trained and not weights.warnings
    assert all(torch.equal(weights.state_dict[key], value) for key, value in trained.items())


def test_plain_state_dict_builds_the_same_model(tmp_path, trained):
    path = tmp_path / "weights.pt"
    torch.save(trained, path)
    model = build_classifier(load_checkpoint(path))
    reference = ResNet34Classifier()
    reference.load_state_dict(trained)
    x = torch.rand(1, 1, 32, 32, 32) * 2 - 1
    with torch.no_grad():
        actual, expected = model(x), reference.eval()(x)
    assert torch.isfinite(expected).all() and torch.allclose(actual, expected, atol=1e-6)


def test_missing_num_batches_tracked_is_tolerated(tmp_path, trained):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in trained.items() if "num_batches_tracked" not in k}, path)
    assert load_checkpoint(path).state_dict["bn1.num_batches_tracked"].item() == 0


def _save(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "scan.pth"
    path.write_bytes(b"DICM this is not a torch file" * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, trained):
    path = _save(tmp_path, {"state_dict": trained, "hparams": argparse.Namespace(lr=1e-3)})
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(argparse.Namespace\)"):
        load_checkpoint(path)


def test_a_blocked_function_is_named_and_never_run(tmp_path):
    """torch words a global of a blocked module (os, subprocess, ...) otherwise than other globals."""
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {ran}",)

    path = _save(tmp_path, {"fc.bias": Payload()})
    with pytest.raises(CheckpointError, match=rf"pickled Python objects \({os.system.__module__}\.system\)"):
        load_checkpoint(path)
    assert not ran.exists()


def test_pickle_protocols_weights_only_loading_cannot_read_are_named_without_torch_warnings(tmp_path, trained, recwarn):
    """torch.save(..., pickle_protocol=4), a common choice for large files: weights-only loading reads
    protocols 2 (torch.save's default) and 3 only, and warns of every protocol but 2."""
    path = tmp_path / "p3.pth"
    torch.save(trained, path, pickle_protocol=3)
    assert load_checkpoint(path).checkpoint_format == "state_dict"
    path = tmp_path / "p4.pth"
    torch.save(trained, path, pickle_protocol=4)
    with pytest.raises(
        CheckpointError, match=r"^p4.pth was saved with pickle protocol 4, which weights-only loading cannot read: save it again"
    ):
        load_checkpoint(path)
    assert not [warning for warning in recwarn if "pickle protocol" in str(warning.message)]


def test_whole_model_pickle_is_refused(tmp_path):
    path = _save(tmp_path, ResNet34Classifier())
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)


def test_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(_save(tmp_path, [torch.zeros(3)]))
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(_save(tmp_path, {"conv1.weight": torch.zeros(3), "note": "hello"}))


def test_resnet18_is_rejected(tmp_path, trained):
    resnet18 = {
        k: v
        for k, v in trained.items()
        if not k.startswith(("layer1.2", "layer2.2", "layer2.3", "layer3.2", "layer3.3", "layer3.4", "layer3.5", "layer4.2"))
    }
    with pytest.raises(ArchitectureError, match=r"\[2, 2, 2, 2\] per layer \(ResNet-18\)"):
        load_checkpoint(_save(tmp_path, {"state_dict": {f"module.{k}": v for k, v in resnet18.items()}}))


def test_monai_layout_is_rejected(tmp_path, trained):
    """MONAI's resnet34: shortcut B (downsample conv + BN), 3 input channels, 400-class FC."""
    monai = dict(trained)
    monai["conv1.weight"] = torch.randn(64, 3, 7, 7, 7)
    monai["fc.weight"], monai["fc.bias"] = torch.randn(400, 512), torch.randn(400)
    for layer, (cin, cout) in {"layer2": (64, 128), "layer3": (128, 256), "layer4": (256, 512)}.items():
        monai[f"{layer}.0.downsample.0.weight"] = torch.randn(cout, cin, 1, 1, 1)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            monai[f"{layer}.0.downsample.1.{stat}"] = torch.ones(cout)
    with pytest.raises(ArchitectureError, match="shortcut B"):
        load_checkpoint(_save(tmp_path, monai))


def test_shape_mismatch_names_the_layer(tmp_path, trained):
    state = dict(trained, **{"layer2.1.conv2.weight": torch.zeros(128, 128, 1, 1, 1)})
    with pytest.raises(ArchitectureError, match=r"layer2\.1\.conv2\.weight is \[128, 128, 1, 1, 1\]"):
        load_checkpoint(_save(tmp_path, state))


def test_missing_and_unexpected_keys_are_listed(tmp_path, trained):
    state = {k: v for k, v in trained.items() if k != "layer4.2.bn2.weight"}
    state["layer4.2.bn3.weight"] = torch.ones(512)
    with pytest.raises(ArchitectureError, match=r"missing keys layer4\.2\.bn2\.weight; unexpected keys layer4\.2\.bn3"):
        load_checkpoint(_save(tmp_path, state))
    with pytest.raises(ArchitectureError, match=r"unexpected keys outside the network 'model\.': loss\.alpha"):
        load_checkpoint(_save(tmp_path, {**{f"model.{k}": v for k, v in trained.items()}, "loss.alpha": torch.ones(2)}))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("conv1.weight", lambda w: w.to(torch.int64), "conv1.weight holds int64 values, not floating-point weights"),  # not read as zeros
        ("layer1.0.conv1.weight", lambda w: w.index_fill(0, torch.tensor([3]), float("nan")), "holds non-finite values"),
        ("bn1.running_var", lambda w: torch.full_like(w, float("inf")), r"bn1\.running_var holds non-finite values"),
        ("layer2.0.bn1.running_var", lambda w: -w, "layer2.0.bn1.running_var holds negative variances"),
    ],
)
def test_weights_the_network_cannot_compute_with_are_refused(tmp_path, trained, key, value, message):
    """Silently converted (integers to zeros), or served as they are (NaN, infinity), or blamed on the
    export by a failed parity check: the checkpoint is refused, the tensor named."""
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_save(tmp_path, dict(trained, **{key: value(trained[key])})))


def test_values_are_checked_as_exported_in_float32(tmp_path, trained):
    """A float64 value beyond float32's range is finite where it is stored and infinite in the exported
    weights: the check runs on what is exported. Float64 weights within range load."""
    variances = trained["layer1.0.bn1.running_var"].double()
    loaded = load_checkpoint(_save(tmp_path, dict(trained, **{"layer1.0.bn1.running_var": variances})))
    assert loaded.state_dict["layer1.0.bn1.running_var"].dtype == torch.float32
    assert torch.equal(loaded.state_dict["layer1.0.bn1.running_var"], variances.float())
    variances[0] = 1e300
    with pytest.raises(
        CheckpointError, match=r"layer1\.0\.bn1\.running_var holds non-finite values \(NaN or infinite\) as float32: its float64"
    ):
        load_checkpoint(_save(tmp_path, dict(trained, **{"layer1.0.bn1.running_var": variances})))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fc.bias", lambda w: w.to(torch.float8_e4m3fn), r"fc\.bias holds float8_e4m3fn values, a dtype export does not convert"),
        ("fc.weight", lambda w: w.to_sparse(), r"fc\.weight is a sparse_coo tensor, not a dense \(strided\) one"),
        ("fc.weight", lambda w: w.to_sparse_csr(), r"fc\.weight is a sparse_csr tensor, not a dense \(strided\) one"),
        ("fc.bias", lambda w: torch.empty_like(w, device="meta"), r"fc\.bias is a tensor on the meta device \(a placeholder"),
        ("bn1.num_batches_tracked", lambda w: w.to("meta"), r"bn1\.num_batches_tracked is a tensor on the meta device"),
        ("conv1.weight", lambda w: w.to(torch.complex64), "conv1.weight holds complex64 values, not floating-point weights"),
    ],
)
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_tensors_the_checks_cannot_handle_are_refused(tmp_path, trained, key, value, message):
    """torch.load(weights_only=True) reads these; the conversion or the value check would crash on them
    with a traceback: refused in one line that names the tensor and what it is."""
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_save(tmp_path, dict(trained, **{key: value(trained[key])})))


def _rezip(source, destination, compression=zipfile.ZIP_DEFLATED):
    """The records of a torch.save file written again into a zip with `compression`."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w", compression) as rewritten:
        for record in original.infolist():
            rewritten.writestr(record.filename, original.read(record))
    return destination


def test_compressed_records_are_refused_before_torch_load_inflates_them(tmp_path):
    """A zip bomb: 4 MB of zeros deflate to a few KB, and torch.load would inflate every record in
    full (a 2 MB file made export use 2.3 GB); torch.save never compresses, so any compression is refused."""
    bomb = _rezip(_save(tmp_path, {"conv1.weight": torch.zeros(2**20)}, "zeros.pth"), tmp_path / "bomb.pth")
    assert bomb.stat().st_size < 2**20 // 20
    with pytest.raises(CheckpointError, match=r"bomb\.pth has compressed records \(.*data/0.*\), which torch\.save never writes"):
        load_checkpoint(bomb)


def test_records_declaring_more_than_a_checkpoint_may_hold_are_refused(tmp_path):
    """The sizes the zip declares are checked before torch.load reads a record: a few bytes stored, 3 GB declared."""
    data = bytearray(_save(tmp_path, {"conv1.weight": torch.zeros(16)}, "small.pth").read_bytes())
    entries = [i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)]  # the central directory
    (entry,) = [i for i in entries if data[i + 46 : i + 46 + struct.unpack_from("<H", data, i + 28)[0]].endswith(b"data/0")]
    struct.pack_into("<I", data, entry + 24, 3 * 2**30)  # its uncompressed size: 3 GB
    (tmp_path / "declared.pth").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"declared\.pth holds 3\.22 GB of records, more than the 2\.03 GB"):
        load_checkpoint(tmp_path / "declared.pth")
    assert export.checkpoint.most_checkpoint_bytes() == export.checkpoint.CHECKPOINT_SIZE_FACTOR * 4 * 63_312_099


def test_a_checkpoint_in_torch_legacy_format_loads(tmp_path, trained):
    path = tmp_path / "legacy.pth"
    torch.save(trained, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert all(torch.equal(value, trained[key]) for key, value in load_checkpoint(path).state_dict.items())


def test_no_resnet_at_all(tmp_path):
    with pytest.raises(ArchitectureError, match="no stem keys"):
        load_checkpoint(_save(tmp_path, {"encoder.weight": torch.zeros(2, 2)}))


def test_demo_weights_are_deterministic_with_real_batchnorm_statistics(demo_weights):
    from export.checkpoint import DEMO_SEED, _demo_state

    first, again = demo_weights, _demo_state.__wrapped__(DEMO_SEED)  # computed anew, not the process's copy
    assert first.source == DEMO_PROVENANCE and not first.head_trained
    assert all(torch.equal(first.state_dict[k], again[k]) for k in first.state_dict)
    mine = export.demo_weights()  # each call its own tensors: changing them changes no later call's
    mine.state_dict["fc.bias"].add_(1.0)
    assert torch.equal(export.demo_weights().state_dict["fc.bias"], first.state_dict["fc.bias"])
    for key in ("bn1", "layer2.0.bn1", "layer4.2.bn2"):
        mean, var = first.state_dict[f"{key}.running_mean"], first.state_dict[f"{key}.running_var"]
        assert mean.abs().max() > 1e-3 and (var - 1).abs().max() > 1e-2 and (var > 0).all()
    model = build_classifier(first)
    with torch.no_grad():
        p = torch.softmax(model(torch.rand(2, 1, 64, 64, 64) * 2 - 1), dim=1)[:, 1]
    assert ((p > 0.05) & (p < 0.95)).all()  # not saturated: parity on them means something
