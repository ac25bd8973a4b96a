"""Finding and ending every process that belongs to one runtime dir (hosts, successors, VMMs)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def pids_of(runtime: Path) -> list[int]:
    """Processes whose command line names this runtime dir (every luo process is started with it)."""
    needle = str(runtime).encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(int(entry))
        except OSError:
            pass
    return out


def kill_all(runtime: Path) -> None:
    for pid in pids_of(runtime):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def alive(pid: int) -> bool:
    """Running (a zombie, which only awaits its parent's wait, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
