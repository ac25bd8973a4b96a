"""The kernel interfaces of a seccomp supervisor (x86_64): the filter, the notification fd, pidfds.

Layouts are the kernel's (``include/uapi/linux/seccomp.h``); sizes are checked against
``SECCOMP_GET_NOTIF_SIZES`` at start, so a kernel whose notification struct grew is refused
with a sentence instead of being misread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct

from luo.errors import LuoError

log = logging.getLogger("luo.run")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# syscall numbers (x86_64)
NR_OPEN, NR_IOCTL, NR_FTRUNCATE, NR_CREAT, NR_OPENAT, NR_FALLOCATE = 2, 16, 77, 85, 257, 285
NR_SECCOMP, NR_PIDFD_SEND_SIGNAL, NR_PIDFD_OPEN, NR_OPENAT2, NR_PIDFD_GETFD = 317, 424, 434, 437, 438
X32_SYSCALL_BIT = 0x40000000
AUDIT_ARCH_X86_64 = 0xC000003E

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
# Linux 5.19: once the supervisor has received a call, only SIGKILL interrupts the caller's wait.
# Without it a signal (Go's SIGURG every 10 ms, a profiler, SIGSTOP/SIGCONT) makes the call return
# EINTR or restart after the supervisor has done its work: a retrieve done twice, a session lost.
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000

SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SEND = 1 << 1
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data { s32 nr; u32 arch; u64 ip; u64 args[6]; } }
NOTIF = struct.Struct("<QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
RESP = struct.Struct("<QqiI")
# struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
ADDFD = struct.Struct("<QIIII")


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (ord("!") << 8) | nr


IOCTL_NOTIF_RECV = _iowr(0, NOTIF.size)
IOCTL_NOTIF_SEND = _iowr(1, RESP.size)
IOCTL_NOTIF_ID_VALID = _iow(2, 8)
IOCTL_NOTIF_ADDFD = _iow(3, ADDFD.size)
IOCTL_NOTIF_SET_FLAGS = _iow(4, 8)

PIDFD_THREAD = os.O_EXCL  # Linux 6.9: a pidfd for a thread, not only a thread-group leader


def _err(what: str) -> LuoError:
    e = ctypes.get_errno()
    return LuoError(e, f"{what}: {os.strerror(e)}")


def check_sizes() -> None:
    """Refuse a kernel whose notification structs are not the ones this module lays out."""
    sizes = (ctypes.c_uint16 * 3)()
    if _syscall(NR_SECCOMP, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.byref(sizes)) != 0:
        raise _err("seccomp(SECCOMP_GET_NOTIF_SIZES)")
    if (sizes[0], sizes[1]) != (NOTIF.size, RESP.size):
        raise LuoError(errno.ENOSYS, f"this kernel's seccomp notification structs are {sizes[0]}/{sizes[1]} "
                       f"bytes, luo run knows {NOTIF.size}/{RESP.size}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter(program: bytes) -> int:
    """Install ``program`` (packed ``struct sock_filter``s) on the calling thread; returns the listener fd.

    Runs in the child between fork and exec. Without CAP_SYS_ADMIN the kernel requires no_new_privs.
    """
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    if os.geteuid() != 0 and _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise _err("prctl(PR_SET_NO_NEW_PRIVS)")
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    fd = _syscall(NR_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog))
    if fd < 0:
        raise _err("seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER | WAIT_KILLABLE_RECV) (Linux 5.19 or later)")
    return int(fd)


def pidfd_open(pid: int, flags: int = 0) -> int:
    fd = _syscall(NR_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(flags))
    if fd < 0:
        raise _err(f"pidfd_open({pid})")
    return int(fd)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """A signal to the process the pidfd names, never to a later process with its pid."""
    if _syscall(NR_PIDFD_SEND_SIGNAL, ctypes.c_int(pidfd), ctypes.c_int(sig), None, ctypes.c_uint(0)) < 0:
        raise _err(f"pidfd_send_signal({sig})")


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """The target's open file as a new fd of ours (the same file, not a copy)."""
    fd = _syscall(NR_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(targetfd), ctypes.c_uint(0))
    if fd < 0:
        raise _err(f"pidfd_getfd(fd {targetfd})")
    return int(fd)


class Listener:
    """The notification fd: receive a call, answer it, or put an fd into the caller."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._recv = bytearray(NOTIF.size)
        self.sync_wakeup = False

    def enable_sync_wakeup(self) -> None:
        """Linux 6.6: wake the supervisor on the caller's CPU (a cheaper round trip). Optional."""
        try:  # the kernel takes the flags by value, not through a pointer
            fcntl.ioctl(self.fd, IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
            self.sync_wakeup = True
        except OSError:
            self.sync_wakeup = False

    def recv(self) -> tuple[int, int, int, int, tuple[int, ...]] | None:
        """(id, tid, nr, arch, args), or None when the caller went away before we read it."""
        buf = self._recv
        buf[:] = bytes(NOTIF.size)  # the kernel requires a zeroed buffer
        try:
            fcntl.ioctl(self.fd, IOCTL_NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                return None
            raise
        nid, tid, _flags, nr, arch, _ip, *args = NOTIF.unpack(buf)
        return nid, tid, nr, arch, tuple(args)

    def id_valid(self, nid: int) -> bool:
        try:
            fcntl.ioctl(self.fd, IOCTL_NOTIF_ID_VALID, struct.pack("<Q", nid))
            return True
        except OSError:
            return False

    def respond(self, nid: int, val: int = 0, error: int = 0) -> None:
        """``error`` is a positive errno (the caller sees -1 and errno) or 0 for ``val``."""
        self._send(RESP.pack(nid, val, -error if error else 0, 0))

    def proceed(self, nid: int) -> None:
        """Let the kernel run the call itself (the call is not ours to serve)."""
        self._send(RESP.pack(nid, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE))

    def _send(self, resp: bytes) -> None:
        """Never raises: an answer that cannot be given (the caller was killed meanwhile: ENOENT)
        leaves nothing to do, and the loop must go on."""
        try:
            fcntl.ioctl(self.fd, IOCTL_NOTIF_SEND, resp)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("luo run: answering a call failed: %s", e.strerror)

    def add_fd(self, nid: int, srcfd: int, cloexec: bool, send: bool = False) -> int:
        """Install ``srcfd`` in the caller; with ``send`` its number is also the call's return value."""
        flags = SECCOMP_ADDFD_FLAG_SEND if send else 0
        arg = bytearray(ADDFD.pack(nid, flags, srcfd, 0, os.O_CLOEXEC if cloexec else 0))
        try:
            return fcntl.ioctl(self.fd, IOCTL_NOTIF_ADDFD, arg, True)
        except OSError as e:  # EMFILE: the caller has no fd left; ENOENT: it is gone
            raise LuoError(e.errno or errno.EIO, f"cannot put an fd into the caller: {e.strerror}") from None
