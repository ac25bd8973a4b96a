"""Helpers for the keeper tests (a module of its own: a conftest can be shadowed by another's)."""

from __future__ import annotations

import array
import os
import socket
from pathlib import Path

from luo.testing.processes import alive, pids_of


def keeper_pids(runtime: Path) -> list[int]:
    """Running keepers of ``runtime`` (zombies and other luo processes excluded)."""
    out = []
    for pid in pids_of(runtime):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm == "luo-keeper" and alive(pid):
            out.append(pid)
    return out


def content_of(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


class FakeSystemd:
    """The manager's side of $NOTIFY_SOCKET, with its fd store semantics: FDSTORE=1 adds fds under
    FDNAME (a name may hold several), FDSTOREREMOVE=1 removes every fd of a name."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(address)
        self.sock.settimeout(5)
        self.store: list[tuple[str, int]] = []

    def recv(self) -> tuple[str, list[int]]:
        fds = array.array("i")
        data, anc, flags, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        return data.decode(), list(fds)

    def apply(self, n: int) -> list[tuple[str, list[int]]]:
        """Receive ``n`` datagrams and do what systemd does with them; return them as received."""
        got = []
        for _ in range(n):
            text, fds = self.recv()
            got.append((text, fds))
            fields = dict(line.split("=", 1) for line in text.split("\n"))
            if fields.get("FDSTOREREMOVE") == "1":
                for name, fd in [e for e in self.store if e[0] == fields["FDNAME"]]:
                    os.close(fd)
                    self.store.remove((name, fd))
            elif fields.get("FDSTORE") == "1":
                self.store.extend((fields.get("FDNAME", "stored"), os.dup(fd)) for fd in fds)
        return got

    def drain(self) -> int:
        """Apply every datagram already queued; how many there were."""
        n = 0
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    self.sock.recv(0, socket.MSG_PEEK)
                except BlockingIOError:
                    return n
                self.sock.setblocking(True)
                self.apply(1)
                self.sock.setblocking(False)
                n += 1
        finally:
            self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()
        for _, fd in self.store:
            os.close(fd)


# Started as systemd starts a service: the fds at 3.., then exec with LISTEN_PID set to the pid
# that exec keeps. (The child sets it itself: only it knows its pid before exec.)
WRAPPER = r"""
import fcntl, os, sys
src = [int(x) for x in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in src]
for fd in src:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""
