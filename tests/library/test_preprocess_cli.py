"""`python -m preprocess`: the contract other checks call (success writes .pt + .json; failure writes nothing).

The CLI's `main` runs in this process (a new Python per case would cost seconds of imports each);
one case runs the real `python -m preprocess` from another working directory.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import subprocess

import numpy as np
import pydicom
import pytest
import torch
from helpers import edit, run_module

import preprocess
from preprocess import phantom
from preprocess.__main__ import main


@pytest.fixture
def run(capsys):
    def call(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["python", "-m", "preprocess", *args], code, captured.out, captured.err)

    return call


@pytest.mark.parametrize("form", ["series", "zip", "multiframe"])
def test_cli_writes_tensor_and_metadata(run, tmp_path, form):
    study = phantom.write_study(tmp_path / ("in.zip" if form == "zip" else "in.dcm" if form == "multiframe" else "in"), form)
    out = tmp_path / "out" / "study.pt"
    result = run(str(study), "-o", str(out), "--size", "24", "--mode", "fast")
    assert result.returncode == 0, result.stderr
    tensor = torch.load(out, weights_only=True)
    assert tensor.shape == (1, 1, 24, 24, 24) and tensor.dtype == torch.float32
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["size"] == 24 and meta["mode"] == "fast" and meta["original_shape"] == [48, 128, 128]


def test_cli_reference_mode_and_forced_series(run, tmp_path):
    study = phantom.write_study(tmp_path / "in", "series", slices=20, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=5.0)
    uid = str(pydicom.dcmread(study / "IM0001.dcm", stop_before_pixels=True).SeriesInstanceUID)
    out = tmp_path / "ref.pt"
    result = run(str(study), "-o", str(out), "--size", "16", "--mode", "reference", "--series", uid)
    assert result.returncode == 0, result.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["mode"] == "reference" and "requested" in meta["series_selection"]["reason"]


def _study_libraries_complain_about(folder):
    """A series encoded implicit VR but declared explicit (pydicom warns as it reads it), and the thinner
    series chosen, RLE with a run longer than its segment (pylibjpeg-rle's Rust decoder panics on stderr)."""
    folder.mkdir()
    tiny = dict(slices=16, rows=8, columns=8, pixel_spacing=20.0)
    rle = phantom.study_files("series", slice_spacing=10.0, transfer_syntax="rle", **tiny)
    study_uid = pydicom.dcmread(io.BytesIO(rle[0])).StudyInstanceUID  # two series of one study
    # 192 mm against the RLE series' 160: both cover enough of the chest to compete, and the thinner wins
    for k, data in enumerate(phantom.study_files("series", slice_spacing=12.0, seed=1, **tiny)):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID = study_uid
        pydicom.dcmwrite(folder / f"warns{k}.dcm", ds, implicit_vr=True, little_endian=True, force_encoding=True)
    for k, data in enumerate(rle):
        if k == 5:
            frame = next(pydicom.encaps.generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=1))
            segment = data.index(frame) + struct.unpack_from("<I", frame, 4)[0]
            (folder / f"rle{k}.dcm").write_bytes(data[:segment] + b"\x81" + data[segment + 1 :])  # a 128-byte run, 64-byte segment
        else:
            (folder / f"rle{k}.dcm").write_bytes(data)
    return folder


@pytest.mark.parametrize("case", ["text file", "missing path", "single slice", "unknown series", "two patients", "library warnings"])
def test_cli_failure_is_one_line_without_traceback_or_output(run, tmp_path, case):
    if case == "text file":
        source = tmp_path / "notes.txt"
        source.write_text("not a study")
        args = [str(source)]
    elif case == "missing path":
        args = [str(tmp_path / "nowhere")]
    elif case == "single slice":
        source = tmp_path / "one.dcm"
        source.write_bytes(phantom.study_files("series", slices=16)[0])
        args = [str(source)]
    elif case == "unknown series":
        args = [str(phantom.write_study(tmp_path / "s.zip", "zip", slices=16, rows=32, columns=32)), "--series", "9.9.9"]
    elif case == "two patients":
        folder = phantom.write_study(tmp_path / "two", "series", slices=16, rows=32, columns=32)
        other = phantom.study_files("series", slices=16, rows=32, columns=32, seed=3)
        for k, data in enumerate(other):
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.PatientID = "SOMEONE-ELSE"
            ds.save_as(folder / f"other{k}.dcm")
        args = [str(folder)]
    else:  # the real command, once: in-process, pytest would catch the warnings itself
        args = [str(_study_libraries_complain_about(tmp_path / "complaints"))]
    out = tmp_path / "out.pt"
    if case != "library warnings":
        result = run(*args, "-o", str(out), "--size", "16")
        assert case != "two patients" or result.stderr.endswith("so none is chosen (choose one with --series UID)\n")
    else:
        result = run_module("preprocess", *args, "-o", str(out), "--size", "16", cwd=tmp_path)
        assert "file 12: pixel data could not be decoded (RLE Lossless, PanicException)" in result.stderr, result.stderr
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_benchmark_prints_its_json_last(tmp_path, capsys):
    from benchmarks import preprocessing as benchmark

    study = phantom.write_study(tmp_path / "s.zip", "zip", slices=20, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=5.0)
    assert benchmark.main(["--study", str(study), "--repeat", "2", "--size", "16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["files"] == 1 and result["original_shape"] == [20, 64, 64]
    assert result["fast_s"] > 0 and result["reference_s"] > 0 and result["peak_mb"] >= 0
    assert len(result["paired_speedups"]) == 2
    assert result["mean_abs_diff"] < 1e-3


def test_cli_refuses_a_size_the_network_cannot_take(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "-o", str(tmp_path / "out.pt"), "--size", "5000"])
    assert stopped.value.code == 2
    assert "size 5000 is not usable: it must be a multiple of 8 between 16 and 512" in capsys.readouterr().err


def test_cli_device_writes_the_same_tensor_on_the_cpu(run, tmp_path):
    study = phantom.write_study(tmp_path / "in", "series", slices=20, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=5.0)
    saved = {}
    for device in (None, "cpu"):
        out = tmp_path / f"{device}.pt"
        result = run(str(study), "-o", str(out), "--size", "16", *(["--device", device] if device else []))
        assert result.returncode == 0, result.stderr
        saved[device] = torch.load(out, weights_only=True)
        assert json.loads(out.with_suffix(".json").read_text())["device"] == device
    assert saved["cpu"].device.type == "cpu" and (saved["cpu"] - saved[None]).abs().max() <= 1e-4


def test_cli_refuses_a_device_with_reference_mode(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "-o", str(tmp_path / "out.pt"), "--mode", "reference", "--device", "cpu"])
    assert stopped.value.code == 2
    assert "reference mode runs on the CPU only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "out, message",
    [
        ("folder", "-o {tmp}/folder is a folder: name the tensor file"),
        ("a_file/study.pt", "-o {tmp}/a_file/study.pt: {tmp}/a_file is a file, not a folder"),
        ("study.json", "name the tensor file (OUT.pt); its metadata is written beside it as OUT.json"),
    ],
)
def test_an_output_path_that_cannot_hold_the_results_is_refused_before_any_work(run, tmp_path, out, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("mine")
    study = phantom.write_study(tmp_path / "in.zip", "zip")
    with pytest.raises(SystemExit) as stopped:
        run(str(study), "-o", str(tmp_path / out), "--size", "16")
    assert stopped.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder", "in.zip"] and (tmp_path / "a_file").read_text() == "mine"


def test_usage_errors_name_the_output_problem_in_one_line(tmp_path, capsys):
    study = phantom.write_study(tmp_path / "in.zip", "zip")
    with pytest.raises(SystemExit):
        main([str(study), "-o", str(tmp_path / "study.json")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "its metadata is written beside it as OUT.json" in errors[0]


def test_a_failed_run_removes_the_outputs_of_an_earlier_one(run, tmp_path):
    out = tmp_path / "study.pt"
    assert run(str(phantom.write_study(tmp_path / "good.zip", "zip")), "-o", str(out), "--size", "16").returncode == 0
    (tmp_path / "bad.dcm").write_bytes(b"not a study")
    failed = run(str(tmp_path / "bad.dcm"), "-o", str(out), "--size", "16")
    assert failed.returncode == 1 and "the earlier outputs at -o were removed" in failed.stderr
    assert not out.exists() and not out.with_suffix(".json").exists()


ESCAPE = "\x1b]0;owned\x07\x1b[2J"  # a window title, then a cleared screen


def test_no_escape_sequence_reaches_the_terminal(run, tmp_path, monkeypatch):
    """The error line and the series UID are printed with control characters escaped, whatever they hold."""
    files = phantom.study_files("series", slices=16, rows=32, columns=32)
    for name, change in (
        ("uid", lambda ds, k: setattr(ds, "SeriesInstanceUID", "1.2.3\r" + ESCAPE + "\n1.2.3")),
        ("modality", lambda ds, k: setattr(ds, "Modality", ESCAPE + "MR")),
    ):
        folder = tmp_path / name
        folder.mkdir()
        for k, data in enumerate(edit(files, change)):
            (folder / f"{k}.dcm").write_bytes(data)
    shown = run(str(tmp_path / "uid"), "-o", str(tmp_path / "uid.pt"), "--size", "16")
    assert shown.returncode == 0 and "from series <invalid SeriesInstanceUID> in" in shown.stdout
    refused = run(str(tmp_path / "modality"), "-o", str(tmp_path / "modality.pt"), "--size", "16")
    assert refused.returncode == 1 and refused.stderr == "error: series is <invalid Modality>, not CT\n"

    def study_error(files, **options):
        raise preprocess.StudyError("series 1.2" + ESCAPE + " is odd")

    monkeypatch.setattr("preprocess.__main__.read_study", lambda path: [])
    monkeypatch.setattr("preprocess.__main__.preprocess_study", study_error)
    refused = run(str(tmp_path / "study"), "-o", str(tmp_path / "out.pt"), "--size", "16")  # read_study is replaced
    assert refused.stderr == "error: series 1.2\\x1b]0;owned\\x07\\x1b[2J is odd\n"
    volume = np.zeros((1, 1, 16, 16, 16), np.float32)
    study = preprocess.PreprocessedStudy(volume, "1.2", "1.2" + ESCAPE, {"timings_s": {"total": 0.5}})
    monkeypatch.setattr("preprocess.__main__.preprocess_study", lambda files, **options: study)
    shown = run(str(tmp_path / "study"), "-o", str(tmp_path / "out.pt"), "--size", "16")  # read_study is replaced
    assert shown.stdout.endswith("from series 1.2\\x1b]0;owned\\x07\\x1b[2J in 0.50 s\n")


def _small_zip(path):
    return phantom.write_study(path, "zip", slices=16, rows=32, columns=32)


@pytest.mark.parametrize(
    "case", ["failing study onto itself", "good study onto itself", "OUT.json is the input", "inside the input folder"]
)
def test_an_output_that_is_the_input_is_refused_before_any_work(run, tmp_path, monkeypatch, case):
    if case == "failing study onto itself":
        source = out = tmp_path / "mine.dcm"
        source.write_bytes(phantom.study_files("series", slices=16)[0])  # one slice: the study fails
    elif case == "good study onto itself":
        source = out = _small_zip(tmp_path / "mine.zip")
    elif case == "OUT.json is the input":
        source = _small_zip(tmp_path / "mine.json")
        out = tmp_path / "mine.pt"
    else:
        source = phantom.write_study(tmp_path / "folder", "series", slices=16, rows=32, columns=32)
        out = source / "out.pt"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr("preprocess.__main__.read_study", lambda path: pytest.fail("read before -o was checked"))
    with pytest.raises(SystemExit) as stopped:
        run(str(source), "-o", str(out), "--size", "16")
    assert stopped.value.code == 2
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("good_study", [False, True])
@pytest.mark.parametrize("which", ["OUT", "OUT.json"])
@pytest.mark.parametrize(
    "content",
    ["text", "json without the metadata's keys", "other torch file", "link to an earlier output"],
)
def test_a_file_at_out_that_is_not_its_output_is_refused_and_kept(run, tmp_path, capsys, good_study, which, content):
    study = _small_zip(tmp_path / "in.zip") if good_study else tmp_path / "bad.dcm"
    if not good_study:
        study.write_bytes(b"not a study")
    earlier = tmp_path / "earlier" / "study.pt"
    assert run(str(_small_zip(tmp_path / "earlier.zip")), "-o", str(earlier), "--size", "16").returncode == 0
    out = tmp_path / "notes.pt"
    target = out if which == "OUT" else out.with_suffix(".json")
    if content == "text":
        target.write_text("important notes")
    elif content == "json without the metadata's keys":
        target.write_text('{"my": "config"}')
    elif content == "other torch file":
        torch.save({"weights": torch.zeros(1, 1, 16, 16, 16)} if which == "OUT" else torch.zeros(3), target)
    else:
        target.symlink_to(earlier if which == "OUT" else earlier.with_suffix(".json"))
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as stopped:
        run(str(study), "-o", str(out), "--size", "16")
    assert stopped.value.code == 2
    errors = capsys.readouterr().err
    assert f"{target} exists and is not an output of this command" in errors and "Traceback" not in errors
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == kept and target.is_symlink() == (content.startswith("link"))


def test_a_good_run_replaces_the_outputs_of_an_earlier_one(run, tmp_path):
    out = tmp_path / "study.pt"
    for size in ("16", "24"):
        assert run(str(_small_zip(tmp_path / "in.zip")), "-o", str(out), "--size", size).returncode == 0
    assert torch.load(out, weights_only=True).shape[-1] == 24 and json.loads(out.with_suffix(".json").read_text())["size"] == 24


@pytest.mark.parametrize("input_, out, message", [("", "x.pt", "INPUT is empty"), ("IN", "", "-o is empty")])
def test_an_empty_input_or_output_is_a_usage_error(tmp_path, capsys, monkeypatch, input_, out, message):
    monkeypatch.chdir(tmp_path)
    _small_zip(tmp_path / "IN")
    with pytest.raises(SystemExit) as stopped:
        main([input_, "-o", out, "--size", "16"])
    assert stopped.value.code == 2
    errors = capsys.readouterr().err
    assert message in errors and "Traceback" not in errors and sorted(p.name for p in tmp_path.iterdir()) == ["IN"]


def test_the_success_line_is_one_line_whatever_the_output_name(run, tmp_path):
    out = tmp_path / "new\nline.pt"
    result = run(str(_small_zip(tmp_path / "in.zip")), "-o", str(out), "--size", "16")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1 and "new\\nline.pt: tensor" in result.stdout


@pytest.mark.parametrize("when", ["while the study is read", "while torch.save writes", "after the tensor is written"])
def test_ctrl_c_is_one_line_and_leaves_no_half_output(run, tmp_path, monkeypatch, when):
    out = tmp_path / "study.pt"
    assert run(str(_small_zip(tmp_path / "in.zip")), "-o", str(out), "--size", "16").returncode == 0
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if when == "while the study is read":
        monkeypatch.setattr("preprocess.__main__.read_study", lambda path: (_ for _ in ()).throw(KeyboardInterrupt))
    elif when == "while torch.save writes":

        def interrupted_in_save(path, write, **options):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662") from None

        monkeypatch.setattr("preprocess.__main__.write_atomically", interrupted_in_save)
    else:
        real = preprocess.output.write_atomically

        def interrupted_at_meta(path, write, **options):
            if str(path).endswith(".json"):
                raise KeyboardInterrupt
            return real(path, write, **options)

        monkeypatch.setattr("preprocess.__main__.write_atomically", interrupted_at_meta)
    try:
        result = run(str(tmp_path / "in.zip"), "-o", str(out), "--size", "24")
    except KeyboardInterrupt:  # left to pytest it would end the session
        pytest.fail("Ctrl-C went past main: Python prints its traceback")
    assert result.returncode == 130 and result.stderr == "interrupted (nothing written)\n"
    left = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert left == (earlier if when == "while the study is read" else {"in.zip": earlier["in.zip"]})


def test_phantom_refuses_more_voxels_than_preprocess_accepts_before_allocating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(phantom, "write_study", lambda *args, **options: pytest.fail("the phantom was made"))
    with pytest.raises(SystemExit) as stopped:
        phantom.main([str(tmp_path / "huge.zip"), "--slices", "2000", "--rows", "1024", "--columns", "1024"])
    assert stopped.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        "python -m preprocess.phantom: error: 2000 x 1024 x 1024 = 2,097,152,000 voxels: at most 524,288,000 (a study preprocess accepts)"
    ]
    assert phantom.voxels_problem(500, 1024, 1024) is None and not list(tmp_path.iterdir())


def test_sigterm_ends_a_run_as_ctrl_c_does(run, tmp_path, monkeypatch):
    """A job's deadline or `timeout` sends SIGTERM: one line, exit 143, nothing written (its default
    action ended the process where it was, a temporary file left), and the handler given back."""
    out = tmp_path / "study.pt"

    def terminated(path, limits=None):
        # what a SIGTERM arriving now runs (the signal itself is not sent: where no handler was
        # installed it would end the test process)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "no SIGTERM handler during the run: the default action ends the process"
        handler(signal.SIGTERM, None)
        pytest.fail("SIGTERM did not stop the run")

    monkeypatch.setattr("preprocess.__main__.read_study", terminated)
    before = signal.getsignal(signal.SIGTERM)
    result = run(str(_small_zip(tmp_path / "in.zip")), "-o", str(out), "--size", "16")
    assert result.returncode == 143 and result.stderr == "terminated (nothing written)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zip"] and signal.getsignal(signal.SIGTERM) is before
