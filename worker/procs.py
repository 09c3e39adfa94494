"""Facts about other processes of this host, read from ``/proc`` (Linux) where the standard
library has no call: whether a pid still runs, and which processes a pid started.

Used where a worker must notice that a process it depends on is gone (the ranks of a
multi-GPU run watch their supervisor), and by the tests and benchmarks that stop or kill
the processes of a run.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs or is stopped (a zombie, dead but not yet reaped by its parent,
    does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    if fields is None:
        return not Path("/proc/self").exists()  # no /proc: os.kill's answer stands
    return fields[0] not in ("Z", "X")


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (Linux): state, ppid, pgrp, ...; None when
    it cannot be read. The name is in brackets and may hold spaces, hence the split at ")"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (of all its threads); empty when it is gone."""
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return children
    for task in tasks:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def processes_in_group(pgid: int) -> list[int]:
    """The live processes whose process group is ``pgid`` (Linux: field 5 of
    ``/proc/<pid>/stat``); empty where there is no ``/proc``."""
    members: list[int] = []
    for entry in Path("/proc").iterdir() if Path("/proc/self").exists() else ():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def argv_of(pid: int) -> list[str]:
    """The arguments ``pid`` was started with; empty when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
