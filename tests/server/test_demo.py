"""`python -m demo`'s refusals and stops: one line each, exit 2 for what it refuses, 130 or 143 for
Ctrl-C or SIGTERM with nothing left behind. The full run (a server, a study) is shown in README.md;
none of these tests starts a server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

import demo.__main__ as demo
from settings import INPUT_LIMITS


@pytest.mark.parametrize("case", ["a file", "a repository of user files"])
def test_an_out_that_is_a_file_or_holds_a_repository_of_user_files_is_one_line_and_exit_2(tmp_path, capsys, case):
    if case == "a file":
        out = tmp_path / "a_file"
        out.write_text("mine")
        reason = f"--out {out}: not a folder"
    else:
        out = tmp_path / "user"
        (out / "repository").mkdir(parents=True)
        (out / "repository" / "notes.txt").write_text("mine")
        reason = f"output folder {out / 'repository'} exists, is not empty and was not written by export"
    assert demo.main(["--out", str(out), "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m demo: error: {reason}") and err.count("\n") == 1, err
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == (
        ["a_file"] if case == "a file" else ["user", "user/repository", "user/repository/notes.txt"]
    )


def test_a_phantom_larger_than_a_study_may_be_is_refused_before_it_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda *args: pytest.fail("the demo ran"))
    slices = INPUT_LIMITS.max_voxels // (1024 * 1024) + 1  # at the largest matrix: one slice too many
    with pytest.raises(SystemExit) as exit:
        demo.main(["--out", str(tmp_path / "out"), "--slices", str(slices), "--matrix", "1024"])
    assert exit.value.code == 2
    assert f"voxels: at most {INPUT_LIMITS.max_voxels:,} (a study preprocess accepts)" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_and_exit_130_with_the_handlers_given_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda *args: signal.raise_signal(signal.SIGINT))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert demo.main(["--out", str(tmp_path)]) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as KeyboardInterrupt (a traceback)")
    assert capsys.readouterr().err == "python -m demo: stopped by SIGINT; nothing is left running\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_during_the_export_leaves_no_staging_folder_and_exits_143(tmp_path):
    """SIGTERM's default action left export's staging folders (438 MB at S=256) and, during the
    server's start, its stubs and shared memory: the demo unwinds through their clean-up instead."""
    out = tmp_path / "out"
    demo_run = subprocess.Popen(
        [sys.executable, "-m", "demo", "--out", str(out), "--size", "32", "--slices", "40", "--matrix", "64"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(path.name.startswith(".repository.") for path in out.glob(".*")):  # export's staging
            assert demo_run.poll() is None and time.monotonic() < deadline, "the export never started staging"
            time.sleep(0.05)
        demo_run.send_signal(signal.SIGTERM)
        stdout, stderr = demo_run.communicate(timeout=60)
    finally:
        demo_run.kill()
    assert demo_run.returncode == 143, stderr
    assert stderr == "python -m demo: stopped by SIGTERM; nothing is left running\n" and stdout == ""
    assert list(out.iterdir()) == []
