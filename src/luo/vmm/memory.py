"""Guest RAM: one memfd, mapped shared, cut into the two memslots of docs/boot-protocol.md.

The memfd is the only part of a VM that can cross into another process (a KVM fd answers EIO
there), so RAM lives in a memfd from the start and a successor maps the same one without touching
its contents: construct GuestMemory around an existing fd and nothing is written.

Guest RAM may also be *extents* of a bigger memfd (the preserved memory pool: one hugetlb or shmem
memfd carved into 2 MiB-aligned pieces): the extents are mapped in order, side by side, into one
reserved host range, so the host range stays contiguous and the memslots do not know the
difference (guest-physical order = the extents' order).
"""

from __future__ import annotations

import ctypes as C
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from luo.errors import LuoError
from luo.vmm.kvm import sys as ksys

GiB = 1 << 30
LOW_RAM_MAX = 3 * GiB  # slot 0 ends here at most; the MMIO hole follows
HIGH_RAM_BASE = 4 * GiB  # slot 1 starts here
EXTENT_ALIGN = 2 << 20  # the pool's unit; a hugetlb memfd of bigger pages asks for its page size


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
    """A memfd (or extents of one) mapped MAP_SHARED; translates guest-physical addresses to the mapping.

    ``extents``: ``(offset, length)`` pieces of ``memfd`` that make guest RAM, in guest-physical
    order, summing to ``mem_bytes``. Without it RAM is ``memfd`` from offset 0, as one mapping.
    ``self.extents`` is always set (``((0, mem_bytes),)`` then), for the VM's record."""

    def __init__(
        self,
        name: str,
        mem_bytes: int,
        memfd: int | None = None,
        extents: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if mem_bytes <= 0 or mem_bytes % (2 << 20):
            raise LuoError(errno.EINVAL, f"guest RAM must be a positive multiple of 2 MiB, not {mem_bytes}")
        if extents is not None and memfd is None:
            raise LuoError(errno.EINVAL, "guest RAM extents are pieces of a given memfd; none was given")
        self.mem_bytes = mem_bytes
        self.owned = memfd is None
        self.extents: tuple[tuple[int, int], ...] = ((0, mem_bytes),)
        if memfd is None:
            memfd = os.memfd_create(f"luo-vm:{name}:ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(memfd, mem_bytes)
            except OSError:
                os.close(memfd)
                raise
        elif extents is None:
            size = os.fstat(memfd).st_size
            if size < mem_bytes:
                raise LuoError(errno.EINVAL, f"memfd {memfd} holds {size} bytes, less than the {mem_bytes} of RAM asked for")
        self.memfd = memfd
        if extents is None:
            self.addr = ksys.mmap(memfd, mem_bytes, noreserve=True)
        else:
            self.extents, align = _checked_extents(memfd, mem_bytes, extents)
            self.addr = _map_extents(memfd, mem_bytes, self.extents, align)
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
        """Unmap (the extents' reservation too: one range); close the memfd only if this object
        created it (a given memfd belongs to the caller)."""
        if self.addr:
            ksys.munmap(self.addr, self.mem_bytes)
            self.addr = 0
        if self.owned and self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def _checked_extents(
    memfd: int, mem_bytes: int, extents: Sequence[tuple[int, int]]
) -> tuple[tuple[tuple[int, int], ...], int]:
    """The extents as a tuple, and their alignment; EINVAL for any a VM could not run on.

    A hugetlb memfd reports its page size as st_blksize, and maps only at that granularity: refuse
    here, with the extent named, rather than let mmap answer a bare EINVAL. Overlapping extents
    are refused too: two guest pages backed by one host page corrupt the guest silently."""
    st = os.fstat(memfd)
    align = max(EXTENT_ALIGN, st.st_blksize)
    out = tuple((int(off), int(length)) for off, length in extents)
    if not out:
        raise LuoError(errno.EINVAL, "guest RAM extents: none given")
    for off, length in out:
        if off < 0 or length <= 0 or off % align or length % align:
            raise LuoError(
                errno.EINVAL,
                f"guest RAM extent ({off:#x}, {length:#x}) is not a non-empty piece aligned to {align >> 20} MiB",
            )
    total = sum(length for _, length in out)
    if total != mem_bytes:
        raise LuoError(errno.EINVAL, f"guest RAM extents sum to {total} bytes, not the {mem_bytes} of RAM asked for")
    end = max(off + length for off, length in out)
    if end > st.st_size:
        raise LuoError(errno.EINVAL, f"guest RAM extents reach offset {end:#x} of memfd {memfd}, which holds {st.st_size} bytes")
    spans = sorted(out)
    for (a_off, a_len), (b_off, _) in zip(spans, spans[1:], strict=False):
        if a_off + a_len > b_off:
            raise LuoError(errno.EINVAL, f"guest RAM extents overlap at memfd offset {b_off:#x}")
    return out, align


def _map_extents(memfd: int, mem_bytes: int, extents: tuple[tuple[int, int], ...], align: int) -> int:
    """Reserve one ``align``-aligned range of mem_bytes and map each extent MAP_FIXED in turn.

    No MAP_NORESERVE on the pieces: on hugetlb that makes mmap reserve the huge pages (ENOMEM now
    if the pool cannot back them) instead of a SIGBUS, or a KVM_RUN EFAULT, at the first touch;
    on shmem it changes nothing (shared mappings are not accounted)."""
    addr = ksys.reserve(mem_bytes, align)
    try:
        at = addr
        for off, length in extents:
            ksys.mmap(memfd, length, off, at=at)
            at += length
    except BaseException:
        ksys.munmap(addr, mem_bytes)
        raise
    return addr
