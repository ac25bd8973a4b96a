"""Helpers for the keeper tests (a module of its own: a conftest can be shadowed by another's)."""

from __future__ import annotations

import os
from pathlib import Path

from luo.testing.processes import alive, pids_of


def keeper_pids(runtime: Path) -> list[int]:
    """Running keepers of ``runtime`` (zombies and other luo processes excluded)."""
    out = []
    for pid in pids_of(runtime):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm == "luo-keeper" and alive(pid):
            out.append(pid)
    return out


def content_of(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""
