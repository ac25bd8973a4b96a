"""What each /dev/liveupdate ioctl means, carried out over luo's socket protocol (libluo).

The fds a program gets are luod's own sockets, not stand-ins: opening /dev/liveupdate gives it
a control connection that holds the host's device (``open_device``, so a second opener anywhere
on the host gets EBUSY, as from the kernel), and a session fd is the session socket luod made
for it. So the kernel's fd semantics hold without the supervisor: closing a session's last
copy unpreserves (created) or finishes (retrieved) it, a fork shares it, and if ``luo run``
itself dies nothing preserved is lost (the program still holds its sessions; only its ioctls
stop being served).

For a call that needs luod the supervisor takes the program's fd (pidfd_getfd, the same open
file), checks it is still the socket it installed (same inode, same peer), sends the request on
it and reads the answer. A socket whose host is gone (a live update handed everything to the
successor, or luod exited) is *stale*: every call that needs a host gives ENODEV (GET_NAME still
answers the name) and closing it changes nothing on the new host. A kexec would have killed its
holders; here they may live on (``luo update --reboot``). luod lets a connection holding the
device do only what the device's ioctls do (``DEVICE_OPS``): the program could write to it.

The caller (the supervised thread) is reached through ``Caller``. ioctls that make an fd follow
the kernel's order as far as a supervisor can: the struct is checked writable before anything
is created, the fd is put in, then its number is written.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from luo.core.states import State
from luo.errors import LuoError
from luo.host.wire import close_fds, raise_for, recv_msg, send_msg
from luo.uapi import abi
from luo.uapi.ioctls import Call, Memory, c_name, c_name_bytes

REPLY_MAX = 1 << 16  # bytes of a reply to a device or session request (they are small)
REQUEST_TIMEOUT = 30.0  # seconds luod may take to answer (an update in progress delays it)


class Caller(Protocol):
    mem: Memory

    def take_fd(self, fd: int) -> int:
        """The caller's ``fd`` as a new fd of ours (EBADF if it has none)."""

    def give_fd(self, fd: int) -> int:
        """Put our ``fd`` into the caller (O_CLOEXEC); returns its number there."""

    def give_session(self, sock: int, info: FileInfo) -> int:
        """Put session socket ``sock`` into the caller (O_CLOEXEC), remembered as ``info``."""

    def check_fd_room(self) -> None:
        """EMFILE if the caller has no free fd (checked before a request that cannot be undone)."""


@dataclass(frozen=True)
class FileInfo:
    """What the supervisor knows of a socket it gave a program, keyed by the socket's inode."""

    kind: Literal["device", "session"]
    name: str  # the session's name; the device path for the device
    incoming: bool  # a retrieved session
    host_pid: int  # the luod that served the open (a later host makes the file stale)
    peer_pid: int  # SO_PEERCRED of the socket: checked on every use
    state_file: Path
    program: str


def stale_error(what: str, why: str) -> LuoError:
    return LuoError(errno.ENODEV, f"{what} belongs to a luo host that is gone ({why}); open /dev/liveupdate "
                    "again to reach the host that serves now")


def peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[0:4], "little")


class Link:
    """The program's socket for one call, taken from it only when a request needs it (GET_NAME
    and GET_STATE do not): ``take`` returns it checked, or None if the fd is no longer ours."""

    def __init__(self, info: FileInfo, take: Callable[[], socket.socket | None]) -> None:
        self.info = info
        self._take = take
        self._sock: socket.socket | None = None

    @classmethod
    def of(cls, sock: socket.socket, info: FileInfo) -> Link:
        link = cls(info, lambda: sock)
        link._sock = sock
        return link

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._take()
            if self._sock is None:
                raise LuoError(errno.EBADF, "the fd changed while the call was served")
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def request(link: Link, msg: dict[str, Any], fds: tuple[int, ...] = (), *,
            want_fd: bool = False) -> tuple[dict[str, Any], int | None]:
    """One request on the program's own socket: its answer, and with ``want_fd`` the one fd that
    came with it (any other fd is closed). A host that is gone makes it ENODEV.

    The socket is the program's too, so the program can change it under us: the file may be
    O_NONBLOCK (so we poll and never block in a call), there may be answers to requests it sent
    itself (read and dropped before ours), and it may even read our answer (we give up after
    REQUEST_TIMEOUT instead of hanging every supervised thread)."""
    info = link.info
    what = "this /dev/liveupdate fd" if info.kind == "device" else f"session {info.name!r}"
    gone = stale_error(what, f"luod pid {info.host_pid} ended: a live update or an exit")
    sock = link.sock
    deadline = time.monotonic() + REQUEST_TIMEOUT
    try:
        while _wait(sock, select.POLLIN, 0.0):  # drop what is already there: not an answer to us
            got = recv_msg(sock, REPLY_MAX, socket.MSG_DONTWAIT)
            if got is None:
                raise gone
            close_fds(got[1])
        while True:
            try:
                send_msg(sock, msg, fds)
                break
            except BlockingIOError:
                if not _wait(sock, select.POLLOUT, deadline - time.monotonic()):
                    raise LuoError(errno.ETIMEDOUT, f"luod does not take requests on {what}") from None
        while True:
            if not _wait(sock, select.POLLIN, deadline - time.monotonic()):
                raise LuoError(errno.ETIMEDOUT, f"no answer from luod on {what} in {REQUEST_TIMEOUT:.0f} s")
            try:
                got = recv_msg(sock, REPLY_MAX, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:  # the program read it first; wait for the deadline
                continue
    except (BrokenPipeError, ConnectionResetError):
        raise gone from None
    if got is None:
        raise gone
    reply, rfds = got
    try:
        raise_for(reply)
        if not want_fd:
            return reply, None
        if len(rfds) != 1:
            raise LuoError(errno.EPROTO, f"luod answered {msg.get('op')} with {len(rfds)} fds, not one")
        return reply, rfds.pop()
    finally:
        close_fds(rfds)


def _wait(sock: socket.socket, events: int, timeout: float) -> bool:
    """Is ``sock`` ready for ``events`` (or hung up) within ``timeout`` seconds?"""
    p = select.poll()
    p.register(sock.fileno(), events)
    return bool(p.poll(max(0.0, timeout) * 1000.0))


def serve_device(link: Link, call: Call, caller: Caller) -> None:
    info = link.info
    op = call.op
    if op in (abi.CREATE_SESSION, abi.RETRIEVE_SESSION):
        name = c_name(call.fields[2])
        call.answer(caller.mem)  # the kernel fails with EFAULT before creating anything
        which = "create_session" if op is abi.CREATE_SESSION else "retrieve_session"
        if which == "retrieve_session":  # cannot be repeated: EMFILE before, as the kernel does
            caller.check_fd_room()
        reply, session = request(link, {"op": which, "name": name, "program": info.program}, want_fd=True)
        assert session is not None
        # a session luod held for its owner since a crash comes back as what it was: outgoing
        incoming = which == "retrieve_session" and not reply.get("recovered")
        try:
            sinfo = FileInfo("session", name, incoming, info.host_pid,
                             info.host_pid, info.state_file, info.program)
            number = caller.give_session(session, sinfo)
        finally:
            os.close(session)
        call.answer(caller.mem, f1=number)
    elif op is abi.FD_PRESERVE:  # RFC v2: the kernel assigns the token
        fd, flags, _token = call.fields
        if flags:
            raise LuoError(errno.EINVAL, f"FD_PRESERVE: flags {flags:#x} are not zero (RFC v2 defines none)")
        call.answer(caller.mem)
        mine = caller.take_fd(fd)
        try:
            reply, _ = request(link, {"op": "preserve_fd"}, (mine,))
        finally:
            os.close(mine)
        call.answer(caller.mem, f2=int(reply["token"]))
    elif op is abi.FD_UNPRESERVE:
        request(link, {"op": "unpreserve_fd", "token": call.fields[0]})
    elif op is abi.FD_RESTORE:
        _fd, flags, token = call.fields
        if flags:
            raise LuoError(errno.EINVAL, f"FD_RESTORE: flags {flags:#x} are not zero (RFC v2 defines none)")
        call.answer(caller.mem)
        caller.check_fd_room()  # RFC v2 restore cannot be repeated: fail before, as the kernel does
        _, fd = request(link, {"op": "restore_fd", "token": token}, want_fd=True)
        assert fd is not None
        _give_answer(call, caller, fd, "f0")
    elif op is abi.GET_STATE:
        call.answer(caller.mem, f0=_state(link))
    elif op.cmd in abi.EVENTS:
        request(link, {"op": abi.EVENTS[op.cmd]})
    else:
        raise LuoError(errno.ENOTTY, f"{op.name} is not a /dev/liveupdate ioctl")


def _state(link: Link) -> int:
    """The state luod publishes in ``<runtime>/state`` before it answers any event (the kernel's
    sysfs file): read there, GET_STATE costs no round trip. A stale device still says ENODEV."""
    info = link.info
    try:
        if int(_read(info.state_file.parent / "luod.pid")) == info.host_pid:
            return State[_read(info.state_file).upper()].value
    except (OSError, ValueError, KeyError):
        pass
    reply, _ = request(link, {"op": "get_state"})  # ENODEV when that host is gone
    return int(reply["state"])


def _read(path: Path) -> str:
    """A small file's text with three system calls (``open()`` builds a text stack for each call)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 64).decode().strip()
    finally:
        os.close(fd)


def _give_answer(call: Call, caller: Caller, fd: int, field: str) -> None:
    try:
        number = caller.give_fd(fd)
    finally:
        os.close(fd)
    call.answer(caller.mem, **{field: number})


def serve_session(link: Link, call: Call, caller: Caller) -> None:
    info = link.info
    op = call.op
    if op is abi.PRESERVE_FD:
        _size, fd, token = call.fields
        if info.incoming:  # v7.2: files are added only to a session this host created
            raise LuoError(errno.EINVAL, f"session {info.name!r} was retrieved: files cannot be added to it")
        mine = caller.take_fd(fd)
        try:
            request(link, {"op": "preserve_fd", "token": token}, (mine,))
        finally:
            os.close(mine)
    elif op is abi.RETRIEVE_FD:
        _size, _fd, token = call.fields
        if not info.incoming:
            raise LuoError(errno.EINVAL, f"session {info.name!r} was created here: nothing to retrieve")
        call.answer(caller.mem)
        _, fd = request(link, {"op": "retrieve_fd", "token": token}, want_fd=True)
        assert fd is not None
        _give_answer(call, caller, fd, "f1")
    elif op is abi.FINISH:
        _size, reserved = call.fields
        if reserved:  # v7.3
            raise LuoError(errno.EINVAL, f"FINISH: reserved is {reserved:#x}, not zero")
        if not info.incoming:
            raise LuoError(errno.EINVAL, f"session {info.name!r} was created here: nothing to finish")
        request(link, {"op": "finish"})
    elif op is abi.GET_NAME:
        call.answer(caller.mem, f2=c_name_bytes(info.name))
    else:
        raise LuoError(errno.ENOTTY, f"{op.name} is not a session ioctl")


def open_device(runtime_dir: Path, program: str) -> tuple[socket.socket, FileInfo]:
    """A control connection holding the host's /dev/liveupdate, and what to remember of it."""
    from luo.client.connection import open_socket

    state_file = runtime_dir / "state"
    try:
        sock = open_socket(runtime_dir / "liveupdate")
    except LuoError as e:
        if e.errno == errno.ECONNREFUSED:  # no host: as a kernel booted without liveupdate=on
            raise LuoError(errno.ENOENT, f"no /dev/liveupdate: {e.message}") from None
        raise
    try:
        info = FileInfo("device", abi.DEVICE_PATH, False, 0, peer_pid(sock), state_file, program)
        reply, _ = request(Link.of(sock, info), {"op": "open_device", "program": program})
    except BaseException:
        sock.close()
        raise
    return sock, FileInfo("device", abi.DEVICE_PATH, False, int(reply.get("pid", 0)), info.peer_pid,
                          state_file, program)
