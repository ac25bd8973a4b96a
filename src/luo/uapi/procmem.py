"""A supervised thread's memory and fds, reached through /proc/TID (the caller is stopped in its call).

Every access that fails means the kernel would have faulted: ``MemoryFault`` becomes EFAULT.
"""

from __future__ import annotations

import errno
import os

from luo.errors import LuoError

PATH_MAX = 4096
_PAGE = 4096
_CHUNK = 1 << 16


class MemoryFault(LuoError):
    def __init__(self, addr: int, size: int) -> None:
        super().__init__(errno.EFAULT, f"cannot access {size} bytes at {addr:#x} in the caller")


class Target:
    """The calling thread ``tid``; ``mem`` is opened by the caller of this class (so that
    ``SECCOMP_IOCTL_NOTIF_ID_VALID`` can be checked after the open and before any use)."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.mem = -1

    def open_mem(self) -> None:
        self.mem = os.open(f"/proc/{self.tid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.mem >= 0:
            os.close(self.mem)
            self.mem = -1

    def read(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self.mem, size, addr) if size else b""
        except (OSError, OverflowError):
            raise MemoryFault(addr, size) from None
        if len(data) != size:
            raise MemoryFault(addr, size)
        return data

    def write(self, addr: int, data: bytes) -> None:
        try:
            done = os.pwrite(self.mem, data, addr)
        except (OSError, OverflowError):
            raise MemoryFault(addr, len(data)) from None
        if done != len(data):
            raise MemoryFault(addr, len(data))

    def all_zero(self, addr: int, size: int) -> bool:
        """Are ``size`` bytes at ``addr`` zero? (The kernel's ``check_zeroed_user``; faults raise.)"""
        while size > 0:
            n = min(size, _CHUNK)
            if any(self.read(addr, n)):
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
                chunk = os.pread(self.mem, n, addr)
            except (OSError, OverflowError):
                return None
            if not chunk:
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
