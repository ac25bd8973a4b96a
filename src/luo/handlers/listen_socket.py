"""``socket-listen-v1`` (our own compatible): preserve a listening socket.

What crosses: the socket object itself (the host hands the same open file description to the
successor by SCM_RIGHTS), so its bound address, its options and every connection queued in its
accept backlog survive; clients see no refused connection during the update. This is the
listening-socket handover of systemd's fd store and Envoy/nginx/HAProxy hot restart, put under
LUO's preserve/retrieve/finish rules. The u64 data is the address family.

How the restored file differs from the original: not at all — it is the same socket. Connected
sockets are not accepted (their peers' state would need a protocol of its own).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from luo.abi import SOCKET_LISTEN_COMPATIBLE
from luo.core.participants import FileHandler, IncomingFile, PreservedFile
from luo.errors import LuoError
from luo.handlers.inode import inode_of

FAMILIES = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6", socket.AF_UNIX: "AF_UNIX"}
_TYPES = {socket.SOCK_STREAM: "SOCK_STREAM", socket.SOCK_SEQPACKET: "SOCK_SEQPACKET"}


@contextmanager
def _borrow(fd: int) -> Iterator[socket.socket]:
    """A socket object over ``fd`` that does not close it when done."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _listening_family(fd: int) -> int | None:
    """The family of a listening socket of a kind we keep, else None. Never raises."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        with _borrow(fd) as s:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
                return None
            family = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    except OSError:
        return None
    return family if family in FAMILIES else None


def format_address(family: int, addr: object) -> str:
    """A human form of getsockname(): ``host:port``, ``[v6]:port``, a path, or ``@abstract``."""
    if family == socket.AF_INET and isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    if family == socket.AF_INET6 and isinstance(addr, tuple):
        return f"[{addr[0]}]:{addr[1]}"
    if isinstance(addr, bytes):
        if addr.startswith(b"\0"):
            return "@" + addr[1:].decode("utf-8", "backslashreplace")
        return addr.decode("utf-8", "backslashreplace")
    if isinstance(addr, str) and addr:
        return os.fsencode(addr).decode("utf-8", "backslashreplace")
    return str(addr) if addr else "(unnamed)"


class ListenSocketHandler(FileHandler):
    """Preserves listening AF_INET/AF_INET6/AF_UNIX sockets; data is the family."""

    compatible = SOCKET_LISTEN_COMPATIBLE

    def can_preserve(self, fd: int) -> bool:
        return _listening_family(fd) is not None

    def identity(self, fd: int) -> tuple[int, int]:
        """The socket's inode: one socket is preserved once (v7.2, EBUSY)."""
        return inode_of(fd)

    def preserve(self, pf: PreservedFile) -> int:
        family = _listening_family(pf.fd)
        if family is None:
            raise LuoError(errno.ENOENT, f"fd {pf.fd} is not a listening INET/INET6/UNIX socket.")
        return family

    def retrieve(self, inc: IncomingFile) -> int:
        family = _listening_family(inc.fd)
        if family is None:
            raise LuoError(errno.EIO, f"token {inc.token}: the handed-over socket is no longer listening.")
        if family != inc.data:
            raise LuoError(
                errno.EIO,
                f"token {inc.token}: the socket's family is {family}, the handover says {inc.data}.",
            )
        return os.dup(inc.fd)

    def describe(self, fd: int) -> dict[str, str]:
        try:
            with _borrow(fd) as s:
                family = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
                kind = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
                return {
                    "family": FAMILIES.get(family, str(family)),
                    "type": _TYPES.get(kind, str(kind)),
                    "address": format_address(family, s.getsockname()),
                }
        except OSError:
            return {}
