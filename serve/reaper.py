"""Ends a launcher's tritonserver, its stubs and their leftovers when the launcher dies without stopping it.

A launcher killed by SIGKILL (an OOM kill, `kill -9`, a CI timeout) runs no cleanup, and the kernel's
parent-death signal reaches tritonserver only: a Python-backend stub still loading its model outlived
it for good, holding its /dev/shm region. This process holds the read end of a pipe whose only writer
is the launcher, so end of file on it is the launcher's death, however it died.

The launcher writes what to clean up on that pipe, one line each: `regions PREFIX` (its shared-memory
regions' names begin so), `folder PATH` (one to remove), `group PGID` for each server it launches (the
server leads a process group its stubs share), and `done` once it has stopped the server itself. End of
file without `done`: SIGTERM the server, up to GRACE_S seconds for it to exit, SIGKILL its group, then
remove the regions and folders. (Nothing on the command line names the server: the launcher finds its
stubs by the region prefix in their command lines.)

Run by serve.launcher only, as a script of the standard library (no import of the project):
    python -I reaper.py GRACE_S
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def main(argv: list[str]) -> int:
    grace_s = float(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the launcher's to act on
    prefix, folders, group = None, [], None
    for line in sys.stdin:
        word, _, value = line.rstrip("\n").partition(" ")
        if word == "done":
            return 0
        if word == "regions":
            prefix = value
        elif word == "folder":
            folders.append(value)
        elif word == "group":
            group = int(value)
    if group is not None:
        end_group(group, grace_s)
    if prefix:
        for region in SHM_DIR.glob(f"{prefix}*"):
            region.unlink(missing_ok=True)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def end_group(group: int, grace_s: float) -> None:
    """As the launcher's own stop: SIGTERM the leader (the server unloads its models and ends its
    stubs), a bounded wait for it, then SIGKILL of whatever of the group is left."""
    if group in _members(group):  # checked first: a pid no longer ours may be another process's now
        with contextlib.suppress(ProcessLookupError):
            os.kill(group, signal.SIGTERM)
        _wait(lambda: group not in _members(group), grace_s)
    if _members(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        _wait(lambda: not _members(group), 10)


def _members(group: int) -> set[int]:
    """Live processes of the process group (a zombie, not yet reaped by its new parent, is not one)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            found.add(int(stat.parent.name))
    return found


def _wait(done, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
