"""Preserved memfds for tests: made with known content, checked by sha256, preserved by a client
that then exits (so the host is their only holder)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

PRESERVE_AND_EXIT = r"""
import hashlib, json, os, sys
from luo.client import connect
c = connect(sys.argv[1])
fd = os.memfd_create(sys.argv[2], os.MFD_ALLOW_SEALING)
data = os.urandom(int(sys.argv[3]))
os.write(fd, data)
print(json.dumps({"token": c.preserve_fd(fd), "sha": hashlib.sha256(data).hexdigest()}))
"""


def sha_of(fd: int) -> str:
    h = hashlib.sha256()
    off = 0
    while chunk := os.pread(fd, 4 << 20, off):
        h.update(chunk)
        off += len(chunk)
    return h.hexdigest()


def memfd(name: str, size: int = 1 << 20) -> tuple[int, str]:
    """A sealable memfd of ``size`` random bytes and their sha256."""
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    data = os.urandom(size)
    os.write(fd, data)
    return fd, hashlib.sha256(data).hexdigest()


def preserve_and_exit(runtime: Path, name: str = "global", size: int = 1 << 20,
                      env: dict[str, str] | None = None) -> dict:
    """A client preserves a memfd through the RFC v2 call and exits: {"token": ..., "sha": ...}."""
    cp = subprocess.run([sys.executable, "-c", PRESERVE_AND_EXIT, str(runtime), name, str(size)],
                        capture_output=True, text=True, check=True, env=env)
    return json.loads(cp.stdout)
