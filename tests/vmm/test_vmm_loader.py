"""Guest RAM layout and the direct-boot loader, on a real memfd (no KVM needed)."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from luo.errors import LuoError
from luo.vmm import loader
from luo.vmm.memory import GiB, GuestMemory, layout


def test_layout_splits_at_3g() -> None:
    assert [(s.gpa, s.size) for s in layout(256 << 20)] == [(0, 256 << 20)]
    s0, s1 = layout(6 * GiB)
    assert (s0.gpa, s0.size, s0.file_offset) == (0, 3 * GiB, 0)
    assert (s1.gpa, s1.size, s1.file_offset) == (4 * GiB, 3 * GiB, 3 * GiB)


def test_existing_memfd_is_not_touched() -> None:
    a = GuestMemory("t", 4 << 20)
    a.write(0x200000, b"survives")
    b = GuestMemory("t2", 4 << 20, memfd=a.memfd)
    assert b.read(0x200000, 8) == b"survives" and not b.owned
    b.close()
    assert os.fstat(a.memfd).st_size == 4 << 20  # still open: b did not own it
    a.close()
    with pytest.raises(LuoError) as ei:
        GuestMemory("x", 8 << 20, memfd=os.memfd_create("small"))
    assert ei.value.errno == errno.EINVAL


def test_boot_data_and_page_tables() -> None:
    m = GuestMemory("t", 5 * GiB)
    loader.write_boot_data(m, "console=ttyS0 x", 2)
    magic, mem, cgpa, clen, ncpus, low, high, mmio = struct.unpack("<QQQIIQQQ", m.read(0x1000, 56))
    assert (magic, mem, cgpa, clen, ncpus) == (loader.BOOT_MAGIC, 5 * GiB, 0x2000, 15, 2)
    assert (low, high, mmio) == (3 * GiB, 6 * GiB, 0xD0000000)
    assert m.read(0x2000, 16) == b"console=ttyS0 x\0"
    assert struct.unpack("<3Q", m.read(0x3000, 24))[1] == 0x00AF9B000000FFFF
    pml4 = struct.unpack("<Q", m.read(0x10000, 8))[0]
    assert pml4 == 0x11000 | 7
    pdpt = struct.unpack("<6Q", m.read(0x11000, 48))
    assert pdpt[5] == (0x12000 + 5 * 0x1000) | 7
    assert struct.unpack("<Q", m.read(0x11000 + 6 * 8, 8))[0] == 0  # RAM ends at 6 GiB
    last_pde = struct.unpack("<Q", m.read(0x12000 + 5 * 0x1000 + 511 * 8, 8))[0]
    assert last_pde == (6 * GiB - (2 << 20)) | 0x87
    m.close()


def test_elf_loaded_at_paddr(counter_elf: Path) -> None:
    m = GuestMemory("t", 16 << 20)
    img = loader.load_elf(m, counter_elf.read_bytes())
    assert img.entry == 0x100000 == img.lowest
    assert m.read(0x100000, 3) == bytes.fromhex("4989f5")  # mov %rsi,%r13
    with pytest.raises(LuoError) as ei:
        loader.load_elf(m, b"not an elf at all" * 8)
    assert ei.value.errno == errno.ENOEXEC
    m.close()
