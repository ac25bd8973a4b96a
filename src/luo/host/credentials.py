"""Who is on the other end of a control connection (SO_PEERCRED)."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from luo.core.participants import Owner


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return cls(*struct.unpack("3i", raw))

    @property
    def privileged(self) -> bool:
        """Only root or the host's own user may preserve fds or drive events."""
        return self.uid == 0 or self.uid == os.geteuid()

    def owner(self) -> Owner:
        return Owner(pid=self.pid, uid=self.uid, comm=process_name(self.pid))


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
