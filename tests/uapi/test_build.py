"""The C programs build (dynamic and static) and run without `luo run` (needs no host)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from .conftest import C_DIR, PROGRAMS, Programs

PT_INTERP = 3


def has_interp(path: Path) -> bool:
    """Whether an ELF64 little-endian executable names a dynamic loader (a PT_INTERP header)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not ELF64 LE"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == PT_INTERP for i in range(phnum))


def test_programs_build(progs: Programs) -> None:
    for name in PROGRAMS:
        path = progs.paths[name]
        assert os.access(path, os.X_OK), path
        assert has_interp(path) == (progs.linkage == "dynamic"), f"{path}: not a {progs.linkage} executable"


def test_header_is_ours_and_complete() -> None:
    text = (C_DIR / "luo_uapi.h").read_text()
    for nr in ("0x00", "0x01", "0x40", "0x41", "0x42", "0x43", "0x02", "0x03", "0x04", "0x05", "0x06", "0x07"):
        assert f"LUO_IOC_TYPE, {nr})" in text or f"LUO_IOC_TYPE, {nr}," in text, nr
    for prog in PROGRAMS:
        assert '#include "check.h"' in (C_DIR / f"{prog}.c").read_text(), prog


@pytest.mark.skipif(os.path.exists("/dev/liveupdate"), reason="this machine has a real /dev/liveupdate")
def test_programs_run_natively(progs: Programs) -> None:
    """Outside `luo run` there is no device here: the programs say so and exit 2 (setup failed)."""
    for argv in ([progs["luo_api"]], [progs["luo_rfcv2"]], [progs["luo_twostage"], "--stage", "1"],
                 [progs["luo_fork_exec"]], [progs["luo_threads"], "2"]):
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert cp.returncode == 2, (argv, cp.returncode, cp.stdout, cp.stderr)
        assert "Bail out! " in cp.stdout and "ENOENT" in cp.stdout, cp.stdout
    cp = subprocess.run([progs["luo_twostage"]], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2 and "usage" in cp.stderr
