"""What the keeper and its clients share: names in the runtime dir, the protocol version, and a
receive bounded to the keeper's message size.

Every keeper message is small by construction: a batch is at most 253 keys of at most 200
characters (about 52 KB of JSON), error sentences are bounded by luo.host.wire. Receiving into a
64 KiB buffer instead of luo.host.wire's 4 MiB one matters for put/drop latency: CPython allocates
the whole buffer for every recvmsg, and above glibc's mmap threshold (128 KiB) that is an
mmap/munmap pair, about 12 us per receive, two receives per call. Parsing and validation are
luo.host.wire's (parse), so a hostile datagram is refused exactly as on luod's control socket.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from typing import Any

from luo.errors import LuoError
from luo.host.wire import SCM_MAX_FD, parse

PROTOCOL = 1
SOCKET_NAME = "keeper"
LOCK_NAME = "keeper.lock"
LOG_NAME = "keeper.log"
MAX_KEEPER_MSG = 1 << 16  # > 253 * (200 + 3) + overhead: the largest batch a client or keeper sends
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and its fds (close-on-exec), or None at EOF; as luo.host.wire.recv_msg, with
    a buffer of MAX_KEEPER_MSG. Raises only OSError or LuoError (EMSGSIZE for a longer or
    truncated message, EINVAL for bad JSON), having closed the message's fds."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_KEEPER_MSG, socket.CMSG_SPACE(SCM_MAX_FD * fds.itemsize),
                                       socket.MSG_CMSG_CLOEXEC)
    try:
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data and not fds:
            return None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise LuoError(errno.EMSGSIZE, f"keeper message truncated (at most {MAX_KEEPER_MSG} bytes and "
                           f"{SCM_MAX_FD} fds, and only as many fds as the receiver may open)")
        return parse(data), list(fds)
    except BaseException:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
