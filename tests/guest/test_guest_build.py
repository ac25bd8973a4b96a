"""The guest builds with the machine's gcc, and the build refuses instructions PVM will not emulate."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from guest_console import GUEST_DIR

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("make") is None, reason="needs gcc and make"
)


def test_make_builds_a_bootable_elf(tmp_path: Path) -> None:
    out = tmp_path / "build"
    subprocess.run(
        ["make", "-s", "-C", str(GUEST_DIR), f"BUILD={out}"], check=True, capture_output=True, text=True
    )
    img = (out / "luo-guest.elf").read_bytes()
    assert img[:4] == b"\x7fELF" and img[4] == 2  # ELF64
    e_machine = struct.unpack_from("<H", img, 18)[0]
    e_entry, e_phoff = struct.unpack_from("<QQ", img, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", img, 54)
    assert e_machine == 62  # x86-64
    loads = []
    for i in range(e_phnum):
        p_type, _flags, _off, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", img, e_phoff + i * e_phentsize
        )
        if p_type == 1:
            loads.append((paddr, filesz, memsz))
    assert loads, "no PT_LOAD segment"
    # The boot protocol: segments at p_paddr >= 1 MiB, well inside a 256 MiB guest.
    for paddr, filesz, memsz in loads:
        assert paddr >= 0x100000 and memsz >= filesz and paddr + memsz < 64 << 20
    assert any(p <= e_entry < p + m for p, _f, m in loads)


def test_clean_removes_the_build(tmp_path: Path) -> None:
    out = tmp_path / "build"
    subprocess.run(["make", "-s", "-C", str(GUEST_DIR), f"BUILD={out}"], check=True, capture_output=True)
    subprocess.run(
        ["make", "-s", "-C", str(GUEST_DIR), f"BUILD={out}", "clean"], check=True, capture_output=True
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "insn", ["popcnt %rax, %rbx", "int3", "clac", "xrstor (%rax)", "cmpxchg16b (%rax)", "fwait"]
)
def test_check_insns_rejects_what_pvm_cannot_emulate(tmp_path: Path, insn: str) -> None:
    src = tmp_path / "bad.S"
    src.write_text(f".text\n.globl _start\n_start:\n    nop\n    {insn}\n    ret\n")
    elf = tmp_path / "bad.elf"
    subprocess.run(
        ["gcc", "-nostdlib", "-static", "-no-pie", "-o", str(elf), str(src)], check=True, capture_output=True
    )
    r = subprocess.run(["sh", str(GUEST_DIR / "check-insns.sh"), str(elf)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "PVM" in r.stderr and insn.split()[0] in r.stderr


def test_check_insns_accepts_the_guest(tmp_path: Path) -> None:
    out = tmp_path / "build"
    subprocess.run(["make", "-s", "-C", str(GUEST_DIR), f"BUILD={out}"], check=True, capture_output=True)
    r = subprocess.run(
        ["sh", str(GUEST_DIR / "check-insns.sh"), str(out / "luo-guest.elf")], capture_output=True
    )
    assert r.returncode == 0
