"""Guest RAM: one memfd, mapped shared, cut into the two memslots of docs/boot-protocol.md.

The memfd is the only part of a VM that can cross into another process (a KVM fd answers EIO
there), so RAM lives in a memfd from the start and a successor maps the same one without touching
its contents: construct GuestMemory around an existing fd and nothing is written.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
from dataclasses import dataclass

from luo.errors import LuoError
from luo.vmm.kvm import sys as ksys

GiB = 1 << 30
LOW_RAM_MAX = 3 * GiB  # slot 0 ends here at most; the MMIO hole follows
HIGH_RAM_BASE = 4 * GiB  # slot 1 starts here


@dataclass(frozen=True)
class Slot:
    slot: int
    gpa: int
    size: int
    file_offset: int  # offset inside the memfd (and the mapping)


def layout(mem_bytes: int) -> list[Slot]:
    """Memslots for mem_bytes of RAM: [0, min(mem, 3G)) and, above 3 GiB of RAM, [4G, ...)."""
    low = min(mem_bytes, LOW_RAM_MAX)
    slots = [Slot(0, 0, low, 0)]
    if mem_bytes > LOW_RAM_MAX:
        slots.append(Slot(1, HIGH_RAM_BASE, mem_bytes - LOW_RAM_MAX, LOW_RAM_MAX))
    return slots


class GuestMemory:
    """A memfd of mem_bytes mapped MAP_SHARED; translates guest-physical addresses to the mapping."""

    def __init__(self, name: str, mem_bytes: int, memfd: int | None = None) -> None:
        if mem_bytes <= 0 or mem_bytes % (2 << 20):
            raise LuoError(errno.EINVAL, f"guest RAM must be a positive multiple of 2 MiB, not {mem_bytes}")
        self.mem_bytes = mem_bytes
        self.owned = memfd is None
        if memfd is None:
            memfd = os.memfd_create(f"luo-vm:{name}:ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(memfd, mem_bytes)
            except OSError:
                os.close(memfd)
                raise
        else:
            size = os.fstat(memfd).st_size
            if size < mem_bytes:
                raise LuoError(errno.EINVAL, f"memfd {memfd} holds {size} bytes, less than the {mem_bytes} of RAM asked for")
        self.memfd = memfd
        self.addr = ksys.mmap(memfd, mem_bytes, noreserve=True)
        self.slots = layout(mem_bytes)

    @property
    def low_ram_end(self) -> int:
        return self.slots[0].size

    @property
    def high_ram_end(self) -> int:
        return self.slots[1].gpa + self.slots[1].size if len(self.slots) > 1 else 0

    @property
    def ram_end(self) -> int:
        return self.high_ram_end or self.low_ram_end

    def host_addr(self, gpa: int, length: int) -> int:
        for s in self.slots:
            if s.gpa <= gpa and gpa + length <= s.gpa + s.size:
                return self.addr + s.file_offset + (gpa - s.gpa)
        raise LuoError(errno.EFAULT, f"guest range {gpa:#x}+{length:#x} is not inside guest RAM")

    def write(self, gpa: int, data: bytes) -> None:
        C.memmove(self.host_addr(gpa, len(data)), data, len(data))

    def read(self, gpa: int, length: int) -> bytes:
        return C.string_at(self.host_addr(gpa, length), length)

    def zero(self, gpa: int, length: int) -> None:
        C.memset(self.host_addr(gpa, length), 0, length)

    def close(self) -> None:
        """Unmap; close the memfd only if this object created it (a given memfd belongs to the caller)."""
        if self.addr:
            ksys.munmap(self.addr, self.mem_bytes)
            self.addr = 0
        if self.owned and self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
