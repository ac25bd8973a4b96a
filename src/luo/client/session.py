"""A session (Linux 6.19): a named set of preserved fds, held as its own socket fd.

Like the kernel's session fd, closing it has a meaning: an outgoing session is unpreserved,
a retrieved one is finished. The host learns of the close from the socket's EOF, so it also
happens when the owning process dies.
"""

from __future__ import annotations

import errno
import socket

from luo.errors import LuoError
from luo.host.wire import raise_for, recv_msg, send_msg


class Session:
    def __init__(self, name: str, sock: socket.socket, incoming: bool) -> None:
        self.name = name
        self.incoming = incoming
        self._sock: socket.socket | None = sock

    def _call(self, msg: dict, fds: tuple[int, ...] = ()) -> tuple[dict, list[int]]:
        if self._sock is None:
            raise LuoError(errno.EBADF, f"session {self.name!r} is closed")
        try:
            send_msg(self._sock, msg, fds)
            got = recv_msg(self._sock)
        except (BrokenPipeError, ConnectionResetError):
            got = None
        if got is None:
            raise LuoError(errno.ENOTCONN,
                           f"session {self.name!r} belongs to a host that is gone; retrieve it from the new host")
        reply, rfds = got
        raise_for(reply)
        return reply, rfds

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock else -1

    def preserve_fd(self, fd: int, token: int) -> None:
        self._call({"op": "preserve_fd", "token": int(token)}, (fd,))

    def retrieve_fd(self, token: int) -> int:
        _, fds = self._call({"op": "retrieve_fd", "token": int(token)})
        if len(fds) != 1:
            raise LuoError(errno.EPROTO, "host answered retrieve_fd without an fd")
        return fds[0]

    def finish(self, reserved: int = 0) -> None:
        """Finish a retrieved session (EINVAL on a created one). ``reserved`` is FINISH's reserved
        field: non-zero is EINVAL (v7.3)."""
        self._call({"op": "finish", "reserved": int(reserved)})

    def get_name(self) -> str:
        """The session's name as the host knows it (v7.2 GET_NAME), created or retrieved."""
        reply, _ = self._call({"op": "get_name"})
        return str(reply["name"])

    def status(self) -> dict:
        reply, _ = self._call({"op": "status"})
        return reply["session"]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def detach(self) -> None:
        """Forget the socket without the close semantics (used after the host went away)."""
        self.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
