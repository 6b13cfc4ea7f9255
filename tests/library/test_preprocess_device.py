"""preprocess on a torch device: `resample.on_device` computes `fast`'s function as whole-volume tensor
operations. Run here with device="cpu" (the same code a GPU runs); the GPU itself is checked by
benchmarks.gpu_check through `device_report`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, edit

import preprocess
from preprocess import phantom, resample
from preprocess.dicom import parse
from preprocess.pipeline import stored_values
from preprocess.series import select_series
from preprocess.sources import expand

S = 32


def _stored(files: list[bytes]) -> tuple[list[np.ndarray] | np.ndarray, object]:
    """The sorted slices' stored values as the pipeline reads them (in place where it can) and the stack."""
    blobs, _ = expand(files)
    stack, _ = select_series(parse(blobs)[0])
    return stored_values(stack, blobs, in_place=True, threads=2), stack


def _transposed(ds, k):
    """Image rows along the patient's x axis (IOP 0\\1\\0\\1\\0\\0): H reads columns, W rows."""
    image = ds.pixel_array.T.copy()
    ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    ds.Rows, ds.Columns = image.shape
    ds.PixelData = image.tobytes()


def _unsigned_16_bit(ds, k):
    """All 16 bits unsigned, values up to ~43000: above int16's range, so a wrong cast would show."""
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
    ds.RescaleSlope, ds.RescaleIntercept = 0.0625, -2000
    ds.PixelData = ((hu + 2000) * 16).astype(np.uint16).tobytes()


# name: (files, how the stored values reach on_device, their dtype)
STUDIES = {
    "unsigned 12-bit, in place": (lambda: phantom.study_files("series"), list, np.uint16),
    "feet first (mirrored columns), per-slice rescale": (
        lambda: phantom.study_files("series", order="feet_first", rescale="per_slice", slices=40, rows=112, columns=96, seed=3),
        list,
        np.int16,
    ),
    "rows along x (transposed)": (
        lambda: edit(phantom.study_files("series", slices=24, rows=112, columns=96, pixel_spacing=3.0, slice_spacing=5.0), _transposed),
        list,
        np.uint16,
    ),
    "unsigned 16-bit above 32767": (lambda: edit(phantom.study_files("series", slices=24), _unsigned_16_bit), list, np.uint16),
    "scanner air (crop is the field of view)": (lambda: phantom.study_files("series", scanner_air=True), list, np.int16),
    "RLE (a decoded array)": (lambda: phantom.study_files("series", transfer_syntax="rle", rescale="per_slice"), np.ndarray, np.int16),
    "multi-frame feet first, in place": (lambda: phantom.study_files("multiframe", order="feet_first"), list, np.uint16),
}


@pytest.mark.parametrize("name", STUDIES, ids=list(STUDIES))
def test_on_device_computes_what_fast_computes(name):
    files, kind, dtype = STUDIES[name]
    slices, stack = _stored(files())
    assert isinstance(slices, kind) and slices[0].dtype == dtype  # the input form this case is about
    expected, expected_mapping = resample.fast(slices, stack, S, threads=2)
    volume, mapping = resample.on_device(slices, stack, S, device="cpu")
    assert isinstance(volume, torch.Tensor) and volume.dtype == torch.float32 and volume.is_contiguous()
    assert volume.shape == (1, 1, S, S, S)
    assert np.abs(volume.numpy() - expected).max() <= 1e-4
    assert mapping == expected_mapping and mapping.to_meta(stack) == expected_mapping.to_meta(stack)


def test_unsigned_values_keep_their_value_on_the_device():
    slices, _ = _stored(edit(phantom.study_files("series", slices=16, rows=32, columns=32), _unsigned_16_bit))
    stored = resample.upload(slices, "cpu")
    assert stored.dtype == torch.int32 and int(stored.max()) > 32767
    np.testing.assert_array_equal(stored.numpy(), np.stack(slices).astype(np.int32))


def test_an_all_air_study_is_empty_on_both_paths():
    def air(ds, k):  # -1000 HU everywhere: nothing strictly above the crop threshold
        stored = round((-1000 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = np.full((ds.Rows, ds.Columns), stored, np.uint16).tobytes()

    slices, stack = _stored(edit(phantom.study_files("series", slices=16, rows=32, columns=32), air))
    with pytest.raises(preprocess.EmptyVolumeError) as on_cpu:
        resample.fast(slices, stack, S, threads=2)
    with pytest.raises(preprocess.EmptyVolumeError) as on_device:
        resample.on_device(slices, stack, S, device="cpu")
    assert str(on_device.value) == str(on_cpu.value) == "no voxel above -1000 HU: the images are empty"


def test_preprocess_study_on_a_device_returns_a_tensor_there():
    files = phantom.study_files("series", rescale="per_slice")
    default = preprocess.preprocess_study(files, size=S)
    tensor = preprocess.preprocess_study(files, size=S, device="cpu")
    assert isinstance(default.volume, np.ndarray) and default.meta["device"] is None
    assert isinstance(tensor.volume, torch.Tensor) and tensor.volume.device.type == "cpu" and tensor.meta["device"] == "cpu"
    assert np.abs(tensor.volume.numpy() - default.volume).max() <= 1e-4
    differ = {key for key in default.meta if default.meta[key] != tensor.meta[key]}
    assert differ == {"device", "timings_s"}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(mode="reference", device="cpu"), "reference mode runs on the CPU only"),
        (dict(device="gpu0"), "not 'gpu0'"),
        (dict(device="meta"), "not 'meta'"),
        (dict(device=f"cuda:{torch.cuda.device_count()}"), "CUDA devices here"),
    ],
    ids=["reference", "unknown name", "not cpu or cuda", "absent GPU"],
)
def test_a_device_the_caller_got_wrong_is_refused_before_any_work(options, message):
    with pytest.raises(ValueError, match=message) as refused:
        preprocess.preprocess_study([b"not even DICOM"], size=S, **options)
    assert not isinstance(refused.value, preprocess.StudyError)


def test_the_fast_and_device_paths_never_import_simpleitk():
    """SimpleITK is the reference's alone: GPU servers and the device benchmark run without it."""
    code = (
        "import sys, preprocess\n"
        "from preprocess import phantom\n"
        "from benchmarks.preprocessing import device_report\n"
        "files = phantom.study_files('series', slices=16, rows=32, columns=32)\n"
        "preprocess.preprocess_study(files, size=16)\n"
        "preprocess.preprocess_study(files, size=16, device='cpu')\n"
        "device_report('cpu', slices=16, rows=32, columns=32, size=16, repeats=1)\n"
        "print('SimpleITK' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_device_report_runs_on_the_cpu_at_a_tiny_scale():
    from benchmarks.preprocessing import device_report

    report = device_report("cpu", slices=24, rows=64, columns=64, size=16, repeats=2)
    assert report["shape"] == [24, 64, 64] and report["size"] == 16 and report["device"] == "cpu"
    assert report["max_abs_diff_vs_fast"] <= 1e-4 and report["same_mapping"]
    for key in ("upload_ms", "device_ms", "fast_s"):
        assert 0 < report[key]["min"] <= report[key]["median"], key
    assert report["peak_allocated_mib"] is None and report["stored_dtype"] == "int16"


def test_the_served_models_take_cpu_or_cuda_on_gpu_instances_only():
    """ct_preprocess's and ct_explain's `device` parameter, read at load time."""
    from preprocess.workers import instance_device

    def device(setting, args):
        return instance_device("ct_preprocess", setting, args)

    assert device("cpu", {"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == "cpu"
    with pytest.raises(ValueError, match="must be 'cpu' or 'cuda', not 'gpu'"):
        device("gpu", {"model_instance_kind": "GPU", "model_instance_device_id": "0"})
    with pytest.raises(ValueError, match="needs instance_group kind KIND_GPU, not CPU"):
        device("cuda", {"model_instance_kind": "CPU", "model_instance_device_id": "0"})
    if torch.cuda.is_available():
        assert device("cuda", {"model_instance_kind": "GPU", "model_instance_device_id": "1"}) == "cuda:1"
    else:
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            device("cuda", {"model_instance_kind": "GPU", "model_instance_device_id": "0"})


def test_a_gpu_instance_of_ct_preprocess_warms_up_on_the_device_path(monkeypatch):
    """ct_preprocess's load-time warm-up runs a real study through `on_device` (here on the CPU, the same
    tensor code): the CUDA context, cuBLAS and the lazily loaded kernels are then paid for at load."""
    import importlib.util
    import types

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("ct_preprocess_model", ROOT / "model_repository" / "ct_preprocess" / "1" / "model.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)

    study = model.warm_up("cpu", S)
    assert isinstance(study.volume, torch.Tensor) and study.volume.shape == (1, 1, S, S, S)  # the device path, not numpy
    assert study.meta["device"] == "cpu" and torch.isfinite(study.volume).all() and study.volume.abs().max() <= 1
