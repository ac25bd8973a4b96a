"""A supervised thread's memory and fds, reached by pid/tid (the caller is stopped in its call).

Memory goes through ``process_vm_readv``/``process_vm_writev``, which honour page protections as
the kernel's own ``copy_from_user``/``copy_to_user`` do (``/proc/PID/mem`` would read and write a
``PROT_NONE`` or read-only page). Every access that fails means the kernel would have faulted:
``MemoryFault`` becomes EFAULT. A pid names the caller only while its call is pending, so reads
are trusted only after ``SECCOMP_IOCTL_NOTIF_ID_VALID`` (the caller's ``attach``), and each write
checks it again just before (``still_valid``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

from luo.errors import LuoError

PATH_MAX = 4096
_PAGE = 4096
_CHUNK = 1 << 16

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_readv = _libc.process_vm_readv
_writev = _libc.process_vm_writev
for _fn in (_readv, _writev):
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                    ctypes.c_ulong]


# One buffer and one pair of iovecs for every access: the supervisor serves one call at a time,
# and building ctypes objects per access cost more than the system call.
_BUF = ctypes.create_string_buffer(_CHUNK)
_LOCAL = _Iovec(ctypes.addressof(_BUF), 0)
_REMOTE = _Iovec(0, 0)
_LOCAL_P = ctypes.pointer(_LOCAL)
_REMOTE_P = ctypes.pointer(_REMOTE)


class MemoryFault(LuoError):
    def __init__(self, addr: int, size: int) -> None:
        super().__init__(errno.EFAULT, f"cannot access {size} bytes at {addr:#x} in the caller")


class Target:
    """The calling thread ``tid``."""

    def __init__(self, tid: int, still_valid: Callable[[], bool] = lambda: True) -> None:
        self.tid = tid
        self.still_valid = still_valid

    def _transfer(self, fn: object, addr: int, size: int) -> int:
        """Move ``size`` bytes between the caller's ``addr`` and ``_BUF`` (one process_vm call)."""
        if addr < 0 or addr + size > 1 << 64 or size > _CHUNK:
            return -1
        _LOCAL.len = _REMOTE.len = size
        _REMOTE.base = addr
        return int(fn(self.tid, _LOCAL_P, 1, _REMOTE_P, 1, 0))  # type: ignore[operator]

    def read(self, addr: int, size: int) -> bytes:
        out = b""
        while size > 0:  # (chunks: the one buffer holds _CHUNK bytes)
            n = min(size, _CHUNK)
            if self._transfer(_readv, addr, n) != n:
                raise MemoryFault(addr, n)
            out += ctypes.string_at(_BUF, n)
            addr += n
            size -= n
        return out

    def write(self, addr: int, data: bytes) -> None:
        if not self.still_valid():
            raise LuoError(errno.ESRCH, "the caller is gone")
        if len(data) > _CHUNK:
            raise MemoryFault(addr, len(data))
        ctypes.memmove(_BUF, data, len(data))
        if data and self._transfer(_writev, addr, len(data)) != len(data):
            raise MemoryFault(addr, len(data))

    def all_zero(self, addr: int, size: int) -> bool:
        """Are ``size`` bytes at ``addr`` zero? (The kernel's ``check_zeroed_user``; faults raise.)"""
        while size > 0:
            n = min(size, _CHUNK)
            chunk = self.read(addr, n)
            if chunk.count(0) != n:  # (in C; any() would walk a 4 GiB size byte by byte in Python)
                return False
            addr += n
            size -= n
        return True

    def read_path(self, addr: int) -> bytes | None:
        """A NUL-terminated path (at most PATH_MAX), read page by page so that a path near the end
        of a mapping is still found; None if unreadable or unterminated (the kernel then fails)."""
        out = b""
        while len(out) < PATH_MAX:
            n = _PAGE - (addr % _PAGE)
            try:
                chunk = self.read(addr, n)
            except MemoryFault:
                return None
            end = chunk.find(b"\0")
            if end >= 0:
                return out + chunk[:end]
            out += chunk
            addr += len(chunk)
        return None

    def fd_identity(self, fd: int) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the caller's fd, or None when it has no such fd."""
        try:
            st = os.stat(f"/proc/{self.tid}/fd/{fd}")
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def fd_link(self, fd: int) -> str | None:
        try:
            return os.readlink(f"/proc/{self.tid}/fd/{fd}")
        except OSError:
            return None

    def resolve(self, dirfd: int, path: bytes) -> str | None:
        """The absolute, normalized form of ``path`` as the caller would look it up (symlinks are not
        followed: ``/dev/liveupdate`` exists nowhere, so only its spelling can name it)."""
        p = os.fsdecode(path)
        if not p.startswith("/"):
            base = f"/proc/{self.tid}/cwd" if dirfd == -100 else f"/proc/{self.tid}/fd/{dirfd}"  # AT_FDCWD
            try:
                p = os.path.join(os.readlink(base), p)
            except OSError:
                return None
        return os.path.normpath(p).replace("//", "/")
