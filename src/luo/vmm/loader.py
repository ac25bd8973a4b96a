"""Direct boot per docs/boot-protocol.md: ELF64 PT_LOADs, boot info, cmdline, GDT, page tables.

Only the fresh VM runs this; a restored VM gets everything from RAM and the state record.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from luo.errors import LuoError
from luo.vmm.memory import GiB, GuestMemory

BOOT_INFO_GPA = 0x1000
CMDLINE_GPA = 0x2000
CMDLINE_MAX = 4095
GDT_GPA = 0x3000
PML4_GPA = 0x10000
LOAD_MIN = 0x100000
MMIO_CONSOLE_GPA = 0xD0000000
BOOT_MAGIC = 0x31544F4F424F554C  # "LUOBOOT1"

GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)  # null, 0x08 code64 DPL0, 0x10 data DPL0
PTE_P_RW_US = 0x7
PDE_PS = 0x80

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD = 1


@dataclass(frozen=True)
class LoadedImage:
    entry: int
    lowest: int
    highest: int


def load_elf(mem: GuestMemory, image: bytes) -> LoadedImage:
    """Copy each PT_LOAD to its p_paddr (zero-filling to p_memsz); return the entry point."""
    if len(image) < _EHDR.size or image[:4] != b"\x7fELF":
        raise LuoError(errno.ENOEXEC, "the guest image is not an ELF file")
    ident, _type, machine, _ver, entry, phoff, _sh, _fl, _ehs, phentsize, phnum, *_ = _EHDR.unpack_from(image)
    if ident[4] != 2 or ident[5] != 1 or machine != 62:
        raise LuoError(errno.ENOEXEC, "the guest image is not a little-endian x86-64 ELF64")
    lo, hi = 1 << 64, 0
    for i in range(phnum):
        p_type, _fl, off, _va, paddr, filesz, memsz, _al = _PHDR.unpack_from(image, phoff + i * phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if paddr < LOAD_MIN:
            raise LuoError(errno.ENOEXEC, f"PT_LOAD at {paddr:#x} is below 1 MiB, where the VMM keeps boot data")
        if off + filesz > len(image) or filesz > memsz:
            raise LuoError(errno.ENOEXEC, f"PT_LOAD at {paddr:#x} reaches past the end of the file")
        mem.host_addr(paddr, memsz)  # raises EFAULT if outside RAM
        mem.write(paddr, image[off : off + filesz])
        if memsz > filesz:
            mem.zero(paddr + filesz, memsz - filesz)
        lo, hi = min(lo, paddr), max(hi, paddr + memsz)
    if hi == 0:
        raise LuoError(errno.ENOEXEC, "the guest image has no PT_LOAD segment")
    return LoadedImage(entry, lo, hi)


def write_boot_data(mem: GuestMemory, cmdline: str, ncpus: int) -> None:
    """Boot info at 0x1000, cmdline at 0x2000, GDT at 0x3000, identity page tables at 0x10000."""
    cmd = cmdline.encode()
    if len(cmd) > CMDLINE_MAX:
        raise LuoError(errno.E2BIG, f"the command line is {len(cmd)} bytes; at most {CMDLINE_MAX} fit")
    info = struct.pack(
        "<QQQIIQQQ",
        BOOT_MAGIC,
        mem.mem_bytes,
        CMDLINE_GPA,
        len(cmd),
        ncpus,
        mem.low_ram_end,
        mem.high_ram_end,
        MMIO_CONSOLE_GPA,
    )
    mem.write(BOOT_INFO_GPA, info)
    mem.write(CMDLINE_GPA, cmd + b"\0")
    mem.write(GDT_GPA, struct.pack("<3Q", *GDT))
    mem.write(PML4_GPA, page_tables(max(mem.ram_end, 4 * GiB)))


def page_tables(end: int) -> bytes:
    """PML4 + PDPT + one PD per GiB mapping [0, end) with 2 MiB pages, all P|RW|US."""
    ngib = (end + GiB - 1) // GiB
    if ngib > 512:
        raise LuoError(errno.EINVAL, "identity map above 512 GiB needs more than one PDPT")
    pdpt_gpa = PML4_GPA + 0x1000
    pd_gpa = PML4_GPA + 0x2000
    if pd_gpa + ngib * 0x1000 > LOAD_MIN:
        raise LuoError(errno.EINVAL, f"page tables for {ngib} GiB would run into the image at 1 MiB")
    pml4 = struct.pack("<Q", pdpt_gpa | PTE_P_RW_US).ljust(0x1000, b"\0")
    pdpt = struct.pack(f"<{ngib}Q", *((pd_gpa + i * 0x1000) | PTE_P_RW_US for i in range(ngib))).ljust(0x1000, b"\0")
    pds = struct.pack(f"<{ngib * 512}Q", *((i << 21) | PDE_PS | PTE_P_RW_US for i in range(ngib * 512)))
    return pml4 + pdpt + pds
