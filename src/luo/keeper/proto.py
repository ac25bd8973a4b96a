"""What the keeper and its clients share: names in the runtime dir and a receive bounded to the
keeper's message size. The protocol version is ``luo.abi.KEEPER_PROTOCOL``, with its rule.

Every keeper message is small by construction: a batch is at most 253 keys of at most 200
characters (about 52 KB of JSON), error sentences are bounded by luo.host.wire. Receiving into a
64 KiB buffer instead of luo.host.wire's 4 MiB one matters for put/drop latency: CPython allocates
the whole buffer for every recvmsg, and above glibc's mmap threshold (128 KiB) that is an
mmap/munmap pair, about 12 us per receive, two receives per call. Parsing and validation are
luo.host.wire's (parse), so a hostile datagram is refused exactly as on luod's control socket.
"""

from __future__ import annotations

import socket
from typing import Any

from luo.host.wire import recv_msg

SOCKET_NAME = "keeper"
LOCK_NAME = "keeper.lock"
LOG_NAME = "keeper.log"
MAX_KEEPER_MSG = 1 << 16  # > 253 * (200 + 3) + overhead: the largest batch a client or keeper sends
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """luo.host.wire.recv_msg with a buffer of MAX_KEEPER_MSG (see the module docstring)."""
    return recv_msg(sock, MAX_KEEPER_MSG)
