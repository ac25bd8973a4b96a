"""What each /dev/liveupdate ioctl means, carried out over luo's socket protocol (libluo).

A ``DeviceFile`` is one open of ``/dev/liveupdate``: its own connection to luod, which holds the
host's device (``open_device``), so a second opener anywhere on that host gets EBUSY as from the
kernel. A ``SessionFile`` is one session fd: the session socket luod gave for it, so closing it
unpreserves (created) or finishes (retrieved) exactly as a libluo session does.

Both belong to one host. When that host is gone (a live update handed everything to its
successor, or it exited), the files are *stale*: every call gives ENODEV and closing them
changes nothing on the new host. A kexec would have killed their holders; here they may live on
(``luo update --reboot`` ends them).

The caller (the supervised thread) is reached through ``Caller``: its memory, taking one of its
fds, and putting new fds into it. ioctls with a new fd follow the kernel's order as far as a
supervisor can: the struct is checked writable before anything is created, the fd is put in,
then its number is written.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Protocol

from luo.client.connection import Connection
from luo.client.session import Session
from luo.core.states import State
from luo.errors import LuoError
from luo.uapi import abi
from luo.uapi.ioctls import Call, Memory, c_name, c_name_bytes

log = logging.getLogger("luo.run")


class Caller(Protocol):
    mem: Memory

    def take_fd(self, fd: int) -> int:
        """The caller's ``fd`` as a new fd of ours (EBADF if it has none)."""

    def give_fd(self, fd: int) -> int:
        """Put our ``fd`` into the caller (O_CLOEXEC); returns its number there."""

    def give_file(self, file: SessionFile) -> int:
        """Make a session fd for ``file`` in the caller (O_CLOEXEC); returns its number there."""


def stale_error(what: str, why: str) -> LuoError:
    return LuoError(errno.ENODEV, f"{what} belongs to a luo host that is gone ({why}); open /dev/liveupdate "
                    "again to reach the host that serves now")


class DeviceFile:
    """One open of /dev/liveupdate."""

    kind = "device"

    def __init__(self, conn: Connection, program: str, host_pid: int, liveupdate_number: int) -> None:
        self.conn = conn
        self.state_file = conn.runtime.state
        self.program = program
        self.host_pid = host_pid
        self.liveupdate_number = liveupdate_number
        self.stale: str | None = None

    @classmethod
    def open(cls, runtime_dir: str, program: str) -> DeviceFile:
        conn = Connection(runtime_dir)
        try:
            reply, _ = conn.call({"op": "open_device", "program": program}, retry=False)
        except LuoError as e:
            conn.close()
            if e.errno == errno.ECONNREFUSED:  # no host: as a kernel booted without liveupdate=on
                raise LuoError(errno.ENOENT, f"no /dev/liveupdate: {e.message}") from None
            raise
        return cls(conn, program, int(reply.get("pid", 0)), int(reply.get("liveupdate_number", 0)))

    def socket_fd(self) -> int:
        sock = self.conn._sock
        return sock.fileno() if sock is not None else -1

    def close(self) -> None:
        self.conn.close()

    def went_away(self, why: str) -> None:
        self.stale = why
        self.conn.close()

    def _call(self, op: str, fds: tuple[int, ...] = (), **fields: Any) -> tuple[dict[str, Any], list[int]]:
        if self.stale:
            raise stale_error("this /dev/liveupdate fd", self.stale)
        try:
            return self.conn.call({"op": op, **fields}, fds, retry=False)
        except LuoError as e:
            if e.errno == errno.ECONNRESET:
                self.went_away("its connection ended")
                raise stale_error("this /dev/liveupdate fd", self.stale or "") from None
            raise

    def serve(self, call: Call, caller: Caller) -> None:
        op = call.op
        if op in (abi.CREATE_SESSION, abi.RETRIEVE_SESSION):
            name = c_name(call.fields[2])
            call.answer(caller.mem)  # the kernel fails with EFAULT before creating anything
            which = "create_session" if op is abi.CREATE_SESSION else "retrieve_session"
            _, fds = self._call(which, name=name, program=self.program)
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise LuoError(errno.EPROTO, f"luod answered {which} without a session fd")
            import socket

            session = Session(name, socket.socket(fileno=fds[0]), incoming=(which == "retrieve_session"))
            file = SessionFile(session, self)
            number = caller.give_file(file)
            call.answer(caller.mem, f1=number)
        elif op is abi.FD_PRESERVE:  # RFC v2: the kernel assigns the token
            fd, flags, _token = call.fields
            if flags:
                raise LuoError(errno.EINVAL, f"FD_PRESERVE: flags {flags:#x} are not zero (RFC v2 defines none)")
            call.answer(caller.mem)
            mine = caller.take_fd(fd)
            try:
                reply, _ = self._call("preserve_fd", (mine,))
            finally:
                os.close(mine)
            call.answer(caller.mem, f2=int(reply["token"]))
        elif op is abi.FD_UNPRESERVE:
            self._call("unpreserve_fd", token=call.fields[0])
        elif op is abi.FD_RESTORE:
            _fd, flags, token = call.fields
            if flags:
                raise LuoError(errno.EINVAL, f"FD_RESTORE: flags {flags:#x} are not zero (RFC v2 defines none)")
            call.answer(caller.mem)
            _, fds = self._call("restore_fd", token=token)
            self._give_one(call, caller, fds, "f0")
        elif op is abi.GET_STATE:
            call.answer(caller.mem, f0=self._state())
        elif op.cmd in abi.EVENTS:
            self._call(abi.EVENTS[op.cmd])
        else:
            raise LuoError(errno.ENOTTY, f"{op.name} is not a /dev/liveupdate ioctl")

    def _state(self) -> int:
        """The state luod publishes in ``<runtime>/state`` before it answers any event (the
        kernel's sysfs file): read there, a GET_STATE costs no round trip to luod."""
        if self.stale:
            raise stale_error("this /dev/liveupdate fd", self.stale)
        try:
            with open(self.state_file) as f:
                return State[f.read().strip().upper()].value
        except (OSError, ValueError, KeyError):
            reply, _ = self._call("get_state")
            return int(reply["state"])

    @staticmethod
    def _give_one(call: Call, caller: Caller, fds: list[int], field: str) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise LuoError(errno.EPROTO, f"luod answered {call.op.name} without an fd")
        try:
            number = caller.give_fd(fds[0])
        finally:
            os.close(fds[0])
        call.answer(caller.mem, **{field: number})


class SessionFile:
    """One session fd ("[luo_session] NAME" in the kernel)."""

    kind = "session"

    def __init__(self, session: Session, device: DeviceFile) -> None:
        self.session = session
        self.name = session.name
        self.incoming = session.incoming
        self.host_pid = device.host_pid
        self.liveupdate_number = device.liveupdate_number
        self.stale: str | None = None

    def socket_fd(self) -> int:
        return self.session.fileno()

    def close(self) -> None:
        self.session.close()

    def went_away(self, why: str) -> None:
        self.stale = why
        self.session.detach()

    def _call(self, fn: Any, *args: Any) -> Any:
        if self.stale:
            raise stale_error(f"session {self.name!r}", self.stale)
        try:
            return fn(*args)
        except LuoError as e:
            if e.errno == errno.ENOTCONN:
                self.went_away("its connection ended")
                raise stale_error(f"session {self.name!r}", self.stale or "") from None
            raise

    def serve(self, call: Call, caller: Caller) -> None:
        op = call.op
        if op is abi.PRESERVE_FD:
            _size, fd, token = call.fields
            if self.incoming:  # v7.2: files are added only to a session this host created
                raise LuoError(errno.EINVAL, f"session {self.name!r} was retrieved: files cannot be added to it")
            mine = caller.take_fd(fd)
            try:
                self._call(self.session.preserve_fd, mine, token)
            finally:
                os.close(mine)
        elif op is abi.RETRIEVE_FD:
            _size, _fd, token = call.fields
            if not self.incoming:
                raise LuoError(errno.EINVAL, f"session {self.name!r} was created here: nothing to retrieve")
            call.answer(caller.mem)
            fd = self._call(self.session.retrieve_fd, token)
            try:
                number = caller.give_fd(fd)
            finally:
                os.close(fd)
            call.answer(caller.mem, f1=number)
        elif op is abi.FINISH:
            _size, reserved = call.fields
            if reserved:  # v7.3
                raise LuoError(errno.EINVAL, f"FINISH: reserved is {reserved:#x}, not zero")
            if not self.incoming:
                raise LuoError(errno.EINVAL, f"session {self.name!r} was created here: nothing to finish")
            self._call(self.session.finish)
        elif op is abi.GET_NAME:
            if self.stale:
                raise stale_error(f"session {self.name!r}", self.stale)
            call.answer(caller.mem, f2=c_name_bytes(self.name))
        else:
            raise LuoError(errno.ENOTTY, f"{op.name} is not a session ioctl")
