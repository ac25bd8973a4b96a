"""The only place that calls libc: ioctl and mmap through ctypes.

ctypes.CDLL releases the GIL for every foreign call, so a vCPU thread blocked in KVM_RUN leaves
the other threads (and the other vCPUs) running; use_errno makes EINTR visible to the pause path.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
from typing import Any

from luo.errors import LuoError

_libc = C.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [C.c_int, C.c_ulong, C.c_void_p]
_ioctl.restype = C.c_int
_ioctl_int = _libc.ioctl  # same function, int argument variant set per call below
_mmap = _libc.mmap
_mmap.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_int, C.c_long]
_mmap.restype = C.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [C.c_void_p, C.c_size_t]
_munmap.restype = C.c_int

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE = 1, 2
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FAILED = C.c_void_p(-1).value


def ioctl(fd: int, req: int, arg: Any = None, what: str = "") -> int:
    """ioctl with a ctypes struct (passed by reference), an int, or nothing; LuoError on failure."""
    if arg is None:
        p: Any = None
    elif isinstance(arg, int):
        p = C.c_void_p(arg)
    else:
        p = C.byref(arg)
    r = _ioctl(fd, req, p)
    if r < 0:
        e = C.get_errno()
        raise LuoError(e, f"{what or hex(req)} failed: {os.strerror(e)}")
    return r


def ioctl_raw(fd: int, req: int, arg: Any = None) -> tuple[int, int]:
    """ioctl returning (result, errno) without raising: for KVM_RUN and probes."""
    p = None if arg is None else (C.c_void_p(arg) if isinstance(arg, int) else C.byref(arg))
    r = _ioctl(fd, req, p)
    return r, (C.get_errno() if r < 0 else 0)


def mmap(fd: int, length: int, offset: int = 0, noreserve: bool = False, at: int | None = None) -> int:
    """MAP_SHARED read/write mapping; returns the address (KVM memslots want a raw address).

    ``at``: MAP_FIXED there, replacing what was mapped (a range of a ``reserve()`` reservation),
    so that pieces of a file can sit side by side in one contiguous host range."""
    flags = MAP_SHARED | (MAP_NORESERVE if noreserve else 0) | (MAP_FIXED if at is not None else 0)
    addr = _mmap(at, length, PROT_READ | PROT_WRITE, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        e = C.get_errno()
        where = f" at {at:#x}" if at is not None else ""
        raise LuoError(e or errno.ENOMEM, f"mmap of {length} bytes at file offset {offset:#x}{where} failed: {os.strerror(e)}")
    return int(addr)


def reserve(length: int, align: int) -> int:
    """An inaccessible (PROT_NONE, no memory charged) range of ``length`` bytes starting on an
    ``align`` boundary, to be filled with ``mmap(..., at=)``: hugetlb MAP_FIXED maps need a
    huge-page-aligned address, and mmap only promises page alignment, so over-reserve by
    ``align`` and give the slack at both ends back. munmap(addr, length) releases it all."""
    total = length + align
    base = _mmap(None, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if base is None or base == MAP_FAILED:
        e = C.get_errno()
        raise LuoError(e or errno.ENOMEM, f"reserving {total} bytes of address space failed: {os.strerror(e)}")
    base = int(base)
    start = (base + align - 1) // align * align
    if start > base:
        _munmap(base, start - base)
    if base + total > start + length:
        _munmap(start + length, base + total - (start + length))
    return start


def munmap(addr: int, length: int) -> None:
    _munmap(addr, length)
