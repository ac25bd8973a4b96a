"""libluo for Python: the RFC v2 global calls and 6.19 sessions over the host's control socket.

Every method returns on success and raises ``luo.LuoError`` carrying the kernel's errno on
failure, mirroring libluo's 0 / -errno convention.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from luo.client.connection import Connection
from luo.client.session import Session
from luo.core.states import State
from luo.errors import LuoError


class Client:
    """libluo on the host of ``runtime_dir``. ``timeout``: seconds to wait for a host to appear
    when (re)connecting; 0 (the default) raises ECONNREFUSED at once when no host listens."""

    def __init__(self, runtime_dir: str | os.PathLike[str] | None = None, timeout: float = 0.0) -> None:
        self.conn = Connection(runtime_dir, timeout)

    def call(self, op: str, fds: tuple[int, ...] = (), *, timeout: float | None = None, retry: bool = True,
             **fields: Any) -> tuple[dict[str, Any], list[int]]:
        return self.conn.call({"op": op, **fields}, fds, timeout=timeout, retry=retry)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- RFC v2 global API -------------------------------------------------------------
    @property
    def state(self) -> State:
        reply, _ = self.call("get_state")
        return State(int(reply["state"]))

    def preserve_fd(self, fd: int, token: int | None = None) -> int:
        reply, _ = self.call("preserve_fd", (fd,), token=token)
        return int(reply["token"])

    def unpreserve_fd(self, token: int) -> None:
        self.call("unpreserve_fd", token=int(token))

    def restore_fd(self, token: int) -> int:
        _, fds = self.call("restore_fd", token=int(token))
        if len(fds) != 1:
            raise LuoError(errno.EPROTO, "host answered restore_fd without an fd")
        return fds[0]

    def prepare(self) -> None:
        self.call("prepare")

    def freeze(self) -> None:
        self.call("freeze")

    def cancel(self) -> None:
        self.call("cancel")

    def finish(self) -> None:
        self.call("finish")

    # -- sessions ----------------------------------------------------------------------
    def _session(self, op: str, name: str, program: str | None) -> Session:
        _, fds = self.call(op, name=name, program=program)
        if len(fds) != 1:
            raise LuoError(errno.EPROTO, f"host answered {op} without a session fd")
        sock = socket.socket(fileno=fds[0])
        return Session(name, sock, incoming=(op == "retrieve_session"))

    def create_session(self, name: str, program: str | None = None) -> Session:
        """EINVAL for an empty or too long name, EEXIST for a name in use. ``program``: what this
        client acts for (at most 200 bytes), shown in ``luo status`` as its claim."""
        return self._session("create_session", name, program)

    def retrieve_session(self, name: str, program: str | None = None) -> Session:
        """ENOENT for a name the previous host did not hand over, EINVAL if retrieved already."""
        return self._session("retrieve_session", name, program)

    # -- for luo run's /dev/liveupdate ---------------------------------------------------
    def open_device(self, program: str | None = None) -> dict[str, Any]:
        """Hold the host's /dev/liveupdate on this connection (EBUSY, naming the holder, while
        another connection holds it). Returns ``{"pid": luod's pid, "liveupdate_number": N}``.
        Released by ``close_device`` or when this connection closes (also when the host is
        replaced by an update: hold it again on the new one)."""
        reply, _ = self.call("open_device", program=program)
        return {"pid": int(reply["pid"]), "liveupdate_number": int(reply["liveupdate_number"])}

    def close_device(self) -> None:
        self.call("close_device", retry=False)

    def preserved_size(self, dev: int, ino: int) -> tuple[bool, int | None]:
        """Whether the file of inode (``dev``, ``ino``) is frozen by LUO, and its recorded size."""
        reply, _ = self.call("preserved_size", dev=int(dev), ino=int(ino))
        size = reply.get("size")
        return bool(reply["preserved"]), None if size is None else int(size)

    # -- host --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        reply, _ = self.call("status")
        return reply["status"]

    def pid(self) -> int:
        reply, _ = self.call("get_state")
        return int(reply["pid"])


def connect(runtime_dir: str | os.PathLike[str] | None = None, timeout: float = 0.0) -> Client:
    """Open libluo on the host of ``runtime_dir`` (else $LUO_RUNTIME_DIR, else /run/luo).

    No host listening raises ECONNREFUSED at once; with ``timeout`` > 0, waits up to that long
    for one to start."""
    c = Client(runtime_dir, timeout)
    c.conn._ensure()
    return c
