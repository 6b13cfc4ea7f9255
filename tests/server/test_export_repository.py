"""What export writes: a rendered copy (the session's) and an export into the committed repository,
which then serves as it is; provenance, parity, the artifacts Triton does not load."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import ROOT, TEST_SIZE, discard, run_module

import export
from export.__main__ import main as export_main
from serve import start_on_free_ports
from settings import NAMES

SERVED = {
    NAMES.classifier: ["1/model.bin", "1/model.py", "1/model.xml", "1/provenance.json", "config.pbtxt", "labels.txt"],
    NAMES.postprocess: ["1/model.py", "1/provenance.json", "config.pbtxt"],
    NAMES.preprocess: ["1/model.py", "config.pbtxt"],
    NAMES.triage: ["1/.gitkeep", "config.pbtxt"],
    NAMES.explain: ["1/model.py", "1/provenance.json", "1/weights.pt", "config.pbtxt"],
    NAMES.localize: ["1/model.py", "config.pbtxt"],
    NAMES.triage_explain: ["1/.gitkeep", "config.pbtxt"],
}


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def artifacts(triton_repository) -> Path:
    return triton_repository.with_name(triton_repository.name + ".artifacts")


@pytest.fixture(scope="module")
def provenance(artifacts) -> dict:
    return json.loads((artifacts / "provenance.json").read_text())


def test_a_rendered_copy_holds_what_triton_serves_and_nothing_else(triton_repository, artifacts):
    for model, expected in SERVED.items():
        assert files(triton_repository / model) == expected, model
    assert files(artifacts) == [".ct-triage-export.json", "model.onnx", "parity.json", "provenance.json", "weights.pt"]
    configs = export.target_configs("cpu", triton_repository)
    assert export.serving_options(configs).size == TEST_SIZE
    for path in triton_repository.rglob("*"):
        if path.is_file() and path.suffix in (".pbtxt", ".json", ".txt", ".py"):
            assert str(triton_repository.parent) not in path.read_text() and "/work/" not in path.read_text(), path


def test_served_provenance_names_the_served_files_and_the_kept_weights(triton_repository, artifacts, provenance):
    for model in (NAMES.classifier, NAMES.postprocess, NAMES.explain):
        assert json.loads((triton_repository / model / "1" / "provenance.json").read_text()) == provenance
    assert provenance["checkpoint"] == export.DEMO_PROVENANCE and provenance["size"] == TEST_SIZE
    assert provenance["precision"] == "fp32" and provenance["target"] == "cpu" and "exported_at" in provenance
    version = triton_repository / NAMES.classifier / "1"
    assert provenance["served_sha256"] == {name: export.file_sha256(version / name) for name in ("model.xml", "model.bin")}
    assert provenance["engine"].startswith("openvino 20")
    assert provenance["weights_sha256"] == export.file_sha256(artifacts / "weights.pt")
    assert export.file_sha256(triton_repository / NAMES.explain / "1" / "weights.pt") == provenance["weights_sha256"]


def test_parity_report_within_bounds(artifacts):
    report = json.loads((artifacts / "parity.json").read_text())
    assert report["passed"] and report["size"] == TEST_SIZE and len(report["inputs"]) >= 6
    comparisons = report["comparisons"]
    assert sorted(comparisons) == ["openvino_fp32_vs_torch"] and not report["not_checked"]
    assert comparisons["openvino_fp32_vs_torch"]["max_abs_diff"] <= 1e-4 and comparisons["openvino_fp32_vs_torch"]["decisions_agree"]
    assert report["batch_size"] > 1 and report["batch_vs_single_max_abs_diff"] <= 1e-5
    (graph,) = report["graphs"]
    assert graph["opset"] == 17 and graph["input_shape"] == ["batch", 1, "depth", "height", "width"]
    assert graph["output_shape"] == ["batch", 2]


def test_kept_weights_load_safely_and_match_the_kept_graph_at_another_size(triton_repository, artifacts):
    state = torch.load(artifacts / "weights.pt", weights_only=True)
    model = export.build_classifier(export.Weights(state, "kept", "state_dict", False))
    x = np.random.default_rng(3).uniform(-1, 1, (2, 1, 24, 40, 48)).astype(np.float32)  # not the export S
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    session = ort.InferenceSession(str(artifacts / "model.onnx"), providers=["CPUExecutionProvider"])
    actual = session.run([NAMES.probabilities], {NAMES.volume: x})[0]
    assert np.abs(actual - expected).max() <= 1e-4 and np.allclose(actual.sum(axis=1), 1, atol=1e-6)


def test_parity_detects_a_graph_that_is_not_the_checkpoint(triton_repository, artifacts):
    state = torch.load(artifacts / "weights.pt", weights_only=True)
    state["fc.bias"] = state["fc.bias"] + torch.tensor([0.0, 0.5])  # a different head
    other = export.build_classifier(export.Weights(state, "other", "state_dict", False))
    report = export.check_openvino_parity(other, triton_repository / NAMES.classifier / "1" / "model.xml", size=16, threshold=0.5)
    assert not report.passed and report.comparisons["openvino_fp32_vs_torch"].max_abs_diff > 1e-2
    assert any("openvino_fp32_vs_torch" in failure for failure in report.failures)


def test_cli_renders_a_medicalnet_checkpoint_over_an_earlier_copy(triton_repository, artifacts, tmp_path):
    """End to end: MedicalNet release format in, an earlier copy replaced, loud warning out."""
    state = torch.load(artifacts / "weights.pt", weights_only=True)
    backbone = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    seg_head = {"module.conv_seg.0.weight": torch.randn(512, 32, 2, 2, 2), "module.conv_seg.6.weight": torch.randn(2, 32, 1, 1, 1)}
    checkpoint = tmp_path / "resnet_34.pth"
    torch.save({"state_dict": {**backbone, **seg_head}}, checkpoint)
    repo = tmp_path / "repo"
    shutil.copytree(triton_repository, repo)  # an earlier copy (it carries the marker)
    result = run_module(
        "export", "--checkpoint", str(checkpoint), "--target", "onnx-gpu", "--size", "16", "--out", str(repo), timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stderr and "PASSED" in result.stdout
    provenance = json.loads((repo / NAMES.classifier / "1" / "provenance.json").read_text())
    assert provenance["checkpoint"] == "sha256:" + export.file_sha256(checkpoint)
    assert provenance["checkpoint_format"] == "medicalnet" and provenance["target"] == "onnx-gpu"
    assert not (repo / NAMES.classifier / "1" / "model.py").exists()  # the ONNX Runtime backend runs model.onnx
    config = export.parse_config((repo / NAMES.classifier / "config.pbtxt").read_text(), "onnx-gpu")
    assert config.platform == "onnxruntime_onnx" and list(config.input[0].dims) == [1, 16, 16, 16]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "repo.artifacts", "resnet_34.pth"]  # old copy gone


def test_export_into_the_committed_repository_serves_it_as_it_is(tmp_path):
    """The committed configs unchanged, only the served files added, and tritonserver loads it at S=256."""
    committed = tmp_path / "model_repository"
    shutil.copytree(
        export.COMMITTED,
        committed,
        ignore=shutil.ignore_patterns("__pycache__", *export.repository.GENERATED),
    )
    before = {path: (committed / path).read_bytes() for path in files(committed)}
    (committed / NAMES.classifier / "1" / "model.plan").write_bytes(b"an older tensorrt export")

    result = export.write_repository(target="cpu", demo_weights=True, parity_size=16, source=committed)

    assert result.in_place and result.repository == committed and result.model_config_name is None
    assert result.artifacts == tmp_path / "model_repository.artifacts"
    assert result.options == replace(export.ServingOptions(), max_queue_delay_microseconds=0)  # the defaults; the cpu target's wait
    assert {path: (committed / path).read_bytes() for path in before} == before  # configs, model.py: untouched
    added = sorted(set(files(committed)) - set(before))
    assert added == [
        "ct_classifier/1/model.bin",
        "ct_classifier/1/model.xml",
        "ct_classifier/1/provenance.json",
        "ct_explain/1/provenance.json",
        "ct_explain/1/weights.pt",
        "ct_postprocess/1/provenance.json",
    ]
    server = start_on_free_ports(committed, log_file=tmp_path / "tritonserver.log", exit_timeout_s=5)
    try:
        url = f"http://{server.http_url}/v2/models/{NAMES.classifier}/config"
        with urllib.request.urlopen(url, timeout=10) as response:
            config = json.loads(response.read())
        assert config["backend"] == "python" and config["input"][0]["dims"] == [1, 256, 256, 256]
    finally:
        discard(server)


def _without_the_network(monkeypatch) -> None:
    """Export's steps around the network without it (empty weights), for the torch-gpu target, which
    converts no graph: what happens to the output folders, in a fraction of a second."""
    monkeypatch.setattr(export.repository, "make_demo_weights", lambda: export.Weights({}, export.DEMO_PROVENANCE, "demo", False))
    monkeypatch.setattr(export.repository, "build_classifier", lambda weights: None)


def _passing_parity(classifier, *, size, threshold, **_) -> export.ParityReport:
    return export.ParityReport(size, threshold, [], {}, {}, 1, 0.0)


def _no_work():
    raise AssertionError("the export began")


# python -c: _without_the_network and _passing_parity, then SIGTERM to itself while working
# (in the parity check) or swapping (right after the earlier export was renamed aside)
TERMINATED = """
import os, signal, sys
from pathlib import Path
import export
from export.__main__ import main

stage, out = sys.argv[1], Path(sys.argv[2]).resolve()
export.repository.make_demo_weights = lambda: export.Weights({}, export.DEMO_PROVENANCE, "demo", False)
export.repository.build_classifier = lambda weights: None

def passing(classifier, *, size, threshold, **options):
    if stage == "working":
        os.kill(os.getpid(), signal.SIGTERM)
    return export.ParityReport(size, threshold, [], {}, {}, 1, 0.0)

rename = Path.rename

def rename_then_terminate(self, target):
    moved = rename(self, target)
    if stage == "swapping" and self == out:
        os.kill(os.getpid(), signal.SIGTERM)
    return moved

export.parity.check_torch_parity = passing
Path.rename = rename_then_terminate
sys.exit(main(["--demo-weights", "--target", "torch-gpu", "--size", "16", "--out", str(out)]))
"""


@pytest.mark.parametrize("stage", ["working", "swapping"])
def test_sigterm_ends_an_export_as_ctrl_c_does(tmp_path, stage):
    """docker stop, a Kubernetes Job's deadline and timeout send SIGTERM: one line, exit 143, no staging
    folder left, and a complete repository in place (the earlier one, or the new one once the swap began:
    the signal waits for the swap, so it never ends the export with the earlier repository renamed aside)."""
    out = tmp_path / "repo"
    out.mkdir()
    (out / export.MARKER).write_text(json.dumps({"written_by": "python -m export", "kind": "repository"}))
    (out / "served.txt").write_text("the earlier export")
    result = subprocess.run([sys.executable, "-c", TERMINATED, stage, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (
        143,
        "export: terminated (an output folder is replaced only once its export is complete)\n",
    )
    if stage == "working":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"] and (out / "served.txt").read_text() == "the earlier export"
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "repo.artifacts"] and not (out / "served.txt").exists()
        assert json.loads((out / NAMES.classifier / "1" / "provenance.json").read_text())["target"] == "torch-gpu"


def test_a_mount_point_as_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """`docker run -v host:/models ... --out /models`: a mount point can be neither renamed nor removed, so
    export refuses it before its work, not with a traceback after it. /proc, a mount point on every Linux,
    stands for one; / is one too, with no name to put the artifacts beside."""
    assert os.path.ismount("/proc")
    monkeypatch.setattr(export.repository, "make_demo_weights", _no_work)
    mount_point = "output folder /proc is a mount point, which export cannot replace: export into a folder inside it"
    cases = [
        (["--out", "/proc"], mount_point),
        (["--out", str(tmp_path / "repo"), "--artifacts", "/proc"], mount_point),
        (["--out", "/"], f"the output folder / holds the source repository {export.COMMITTED}: choose a folder outside it"),
    ]
    for options, message in cases:
        assert export_main(["--demo-weights", "--target", "cpu", "--size", "16", *options]) == 2
        assert capsys.readouterr().err == f"export: error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_a_folder_the_system_will_not_replace_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """An OSError while putting an output in place (EBUSY, as renaming a mount point gives) is one line,
    exit 2, with nothing left behind."""
    _without_the_network(monkeypatch)
    monkeypatch.setattr(export.parity, "check_torch_parity", _passing_parity)
    out = tmp_path / "repo"
    out.mkdir()
    rmdir = os.rmdir

    def busy(path, *args, **kwargs):
        if Path(path) == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        return rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", busy)
    assert export_main(["--demo-weights", "--target", "torch-gpu", "--size", "16", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"export: error: cannot put the repository in place at {out}: Device or resource busy\n"
    assert [p.name for p in tmp_path.rglob("*")] == ["repo"]


def test_a_parity_size_above_s_is_refused_before_any_work(tmp_path, monkeypatch):
    """`--size 32 --parity-size 256` ran minutes to 9 GB; 512 asked for 30 GB: the check is of the served size."""
    monkeypatch.setattr(export.repository, "make_demo_weights", _no_work)
    with pytest.raises(export.ExportError, match=r"^parity size 32 is larger than the served size S=16: choose at most 16$"):
        export.write_repository(tmp_path / "repo", target="cpu", size=16, parity_size=32, demo_weights=True)
    assert not list(tmp_path.iterdir())


def test_running_out_of_memory_in_the_parity_check_is_one_line(tmp_path, capsys, monkeypatch):
    """--size 512 --parity-size 512 asks torch for 30 GB: its allocator's error (as seen on a 12 GB limit),
    one line and exit 2, with nothing left behind."""
    _without_the_network(monkeypatch)
    refused = (
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 30064771072 bytes. Error code 12 (Cannot allocate memory)"
    )

    def out_of_memory(classifier, inputs):
        raise RuntimeError(refused)

    monkeypatch.setattr(export.parity, "reference_probabilities", out_of_memory)
    assert export_main(["--demo-weights", "--target", "torch-gpu", "--size", "16", "--out", str(tmp_path / "repo")]) == 2
    assert (
        capsys.readouterr().err
        == f"export: error: the parity check at 16^3 ran out of memory ({refused}): choose a smaller --parity-size\n"
    )
    assert not list(tmp_path.iterdir())


# python -c: _without_the_network and _passing_parity, then an export whose files may grow to argv[2] bytes
# (RLIMIT_FSIZE: a write past it fails with EFBIG, as one on a full disk fails with ENOSPC)
SIZE_LIMITED = """
import resource, sys
import export
from export.__main__ import main

export.repository.make_demo_weights = lambda: export.Weights({}, export.DEMO_PROVENANCE, "demo", False)
export.repository.build_classifier = lambda weights: None
export.parity.check_torch_parity = lambda classifier, *, size, threshold, **_: export.ParityReport(size, threshold, [], {}, {}, 1, 0.0)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(["--demo-weights", "--target", "torch-gpu", "--size", "16", "--out", sys.argv[1]]))
"""


def test_an_output_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    """A volume that fills up mid-export gave a traceback (OSError ENOSPC): the real writes, here stopped by a
    file-size limit (the model files copied into the repository are the first to pass it)."""
    out = tmp_path / "out" / "repo"
    result = subprocess.run(
        [sys.executable, "-c", SIZE_LIMITED, str(out), "2048"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stderr) == (2, f"export: error: cannot write the repository {out}: File too large\n")
    assert not (tmp_path / "out").exists()


def test_a_write_that_fails_without_saying_why_on_a_full_disk_names_the_disk(tmp_path, capsys, monkeypatch):
    """OpenVINO's save_model (`basic_ios::clear: iostream error`) and torch.save fail on a full disk with a
    RuntimeError that does not say so: the free space of the output's folder tells; with room left it is not
    the disk's fault, and the error stays as it is."""
    _without_the_network(monkeypatch)
    monkeypatch.setattr(export.parity, "check_torch_parity", _passing_parity)
    failure = "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"

    def failing_save(*args, **kwargs):
        raise RuntimeError(failure)

    monkeypatch.setattr(export.repository.torch, "save", failing_save)
    statvfs, free_blocks = os.statvfs, [0]

    def statvfs_with_free_blocks(path):
        stats = statvfs(path)
        return os.statvfs_result((*stats[:4], free_blocks[0], *stats[5:]))  # f_bavail: the blocks free to this user

    monkeypatch.setattr(os, "statvfs", statvfs_with_free_blocks)
    out = tmp_path / "repo"
    options = ["--demo-weights", "--target", "torch-gpu", "--size", "16", "--out", str(out)]
    assert export_main(options) == 2
    assert capsys.readouterr().err == f"export: error: cannot write the artifacts folder {out}.artifacts: No space left on device\n"
    assert not list(tmp_path.iterdir())
    free_blocks[0] = 10**6
    with pytest.raises(RuntimeError, match=re.escape(failure)):
        export_main(options)
    assert not list(tmp_path.iterdir())


def test_the_artifacts_of_another_repository_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Export B with --artifacts of export A's folder replaced A's parity proof and weights with B's, A's
    repository still serving (and naming) A's."""
    _without_the_network(monkeypatch)
    monkeypatch.setattr(export.parity, "check_torch_parity", _passing_parity)
    assert export_main(["--demo-weights", "--target", "torch-gpu", "--size", "16", "--out", str(tmp_path / "ra")]) == 0
    kept = {path: path.read_bytes() for path in (tmp_path / "ra.artifacts").iterdir()}
    capsys.readouterr()
    monkeypatch.setattr(export.repository, "make_demo_weights", _no_work)
    options = ["--out", str(tmp_path / "rb"), "--artifacts", str(tmp_path / "ra.artifacts")]
    assert export_main(["--demo-weights", "--target", "torch-gpu", "--size", "16", *options]) == 2
    assert capsys.readouterr().err == (
        f"export: error: artifacts folder {tmp_path / 'ra.artifacts'} holds the artifacts of the repository {tmp_path / 'ra'}, "
        f"not of {tmp_path / 'rb'}: refusing to replace them (choose another --artifacts)\n"
    )
    assert {path: path.read_bytes() for path in (tmp_path / "ra.artifacts").iterdir()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ra", "ra.artifacts"]


def test_the_artifacts_of_a_same_named_repository_elsewhere_are_refused(tmp_path, capsys, monkeypatch):
    """The artifacts' marker names the repository's path, not its folder's name alone, so b/repo never
    replaces a/repo's artifacts; the path is relative to the artifacts' folder, so the two moved together
    still belong together, and a marker naming a folder beside them (the default layout) is that folder's."""
    _without_the_network(monkeypatch)
    monkeypatch.setattr(export.parity, "check_torch_parity", _passing_parity)
    options = ["--demo-weights", "--target", "torch-gpu", "--size", "16"]
    shared = tmp_path / "a" / "artifacts"
    assert export_main([*options, "--out", str(tmp_path / "a" / "repo"), "--artifacts", str(shared)]) == 0
    kept = {path: path.read_bytes() for path in shared.iterdir()}
    capsys.readouterr()
    assert export_main([*options, "--out", str(tmp_path / "b" / "repo"), "--artifacts", str(shared)]) == 2
    assert capsys.readouterr().err == (
        f"export: error: artifacts folder {shared} holds the artifacts of the repository {tmp_path / 'a' / 'repo'}, "
        f"not of {tmp_path / 'b' / 'repo'}: refusing to replace them (choose another --artifacts)\n"
    )
    assert {path: path.read_bytes() for path in shared.iterdir()} == kept
    (tmp_path / "a").rename(tmp_path / "moved")
    assert export_main([*options, "--out", str(tmp_path / "moved" / "repo"), "--artifacts", str(tmp_path / "moved" / "artifacts")]) == 0
    beside = tmp_path / "c" / "repo.artifacts"
    beside.mkdir(parents=True)
    (beside / export.MARKER).write_text(json.dumps({"written_by": "python -m export", "kind": "artifacts", "repository": "repo"}))
    assert export_main([*options, "--out", str(tmp_path / "c" / "repo")]) == 0


def test_a_second_export_into_the_same_folders_fails_at_once_and_the_first_completes(tmp_path, capsys, monkeypatch):
    """Two exports into one repository or artifacts folder at once interleaved their writes (one's configs
    beside the other's weights): the second fails at once, one line naming the folder, the first goes on. A
    lock file a killed export left behind (the OS released its lock) stops nobody; none is left after an export."""
    _without_the_network(monkeypatch)
    working, go_on = threading.Event(), threading.Event()

    def parity_held(classifier, **options):
        if threading.current_thread() is not threading.main_thread():  # the first export, until the second has tried
            working.set()
            go_on.wait(60)
        return _passing_parity(classifier, **options)

    monkeypatch.setattr(export.parity, "check_torch_parity", parity_held)
    out, other = tmp_path / "out" / "repo", tmp_path / "other"
    artifacts = out.with_name("repo.artifacts")
    first: dict = {}
    thread = threading.Thread(
        target=lambda: first.update(result=export.write_repository(out, target="torch-gpu", size=16, demo_weights=True))
    )
    thread.start()
    try:
        assert working.wait(60)
        for options, what, folder in (
            (["--out", str(out), "--artifacts", str(other)], "repository", out),
            (["--out", str(other), "--artifacts", str(artifacts)], "artifacts folder", artifacts),
        ):
            assert export_main(["--demo-weights", "--target", "torch-gpu", "--size", "16", *options]) == 2
            lock = folder.with_name(f".{folder.name}.export-lock")
            assert (
                capsys.readouterr().err
                == f"export: error: another export is writing the {what} {folder} (it holds {lock}): wait until it has ended\n"
            )
    finally:
        go_on.set()
        thread.join(60)
    assert first["result"].repository == out and json.loads((out / export.MARKER).read_text())["target"] == "torch-gpu"
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and sorted(p.name for p in out.parent.iterdir()) == ["repo", "repo.artifacts"]
    (out.parent / ".repo.export-lock").touch()  # as a SIGKILL leaves it
    assert export_main(["--demo-weights", "--target", "torch-gpu", "--size", "16", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["repo", "repo.artifacts"]


def test_the_openvino_target_refuses_a_batch_size_it_would_not_serve(tmp_path, capsys, monkeypatch):
    """Its config keeps one study per batch: --max-batch-size 8 is refused, not accepted and served as 1."""
    monkeypatch.setattr(export.repository, "make_demo_weights", _no_work)
    assert export_main(["--demo-weights", "--target", "openvino", "--max-batch-size", "8", "--out", str(tmp_path / "repo")]) == 2
    assert capsys.readouterr().err == (
        "export: error: max batch size 8: the openvino target serves one study per batch (the NGC image's OpenVINO backend "
        "runs only full batches); leave --max-batch-size out\n"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "target, in_place, serve",
    [
        ("cpu", True, ""),
        ("torch-gpu", True, " --model-config-name torch-gpu"),
        ("torch-gpu", False, ""),
        ("openvino", True, " --model-config-name openvino --tritonserver /opt/tritonserver"),
        ("openvino", False, " --tritonserver /opt/tritonserver"),  # the bundled server has no OpenVINO backend
        ("onnx-gpu", False, " --tritonserver /opt/tritonserver"),
    ],
)
def test_the_printed_serve_command_serves_the_target(tmp_path, capsys, monkeypatch, target, in_place, serve):
    report = export.ParityReport(16, 0.5, [], {}, {}, 1, 0.0)
    result = export.ExportResult(tmp_path, tmp_path, target, export.ServingOptions(), {"checkpoint": "demo"}, report, {}, in_place)
    monkeypatch.setattr("export.__main__.write_repository", lambda *args, **kwargs: result)
    assert export_main(["--demo-weights", "--target", target]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"serve it with: python -m serve --repository {tmp_path}{serve}")
