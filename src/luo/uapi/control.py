"""Each ``luo run`` supervisor's own socket, ``<runtime>/run/PID.sock``: status, and the reboot.

A kexec ends every process; a luo update does not, so a program that held sessions before the
update (an upstream-style stage-1 holder) lives on with stale fds. ``luo update --reboot`` asks
every supervisor of the host to end, with SIGKILL as a reboot would, each process that still
holds a /dev/liveupdate or session fd of a host other than the one now serving, and waits for
them to be gone. The socket is 0600 in the runtime dir and only root or the supervisor's own
user may ask; requests are validated like any other message (one JSON object, known op).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from luo.errors import LuoError
from luo.host import fields
from luo.host.wire import error_reply, ok, raise_for, recv_msg, send_msg
from luo.uapi.seccomp import pidfd_open, pidfd_send_signal

if TYPE_CHECKING:
    from luo.uapi.supervisor import Supervisor

log = logging.getLogger("luo.run")
KILL_WAIT = 5.0  # seconds for killed holders to be gone


def run_dir(runtime_dir: str) -> Path:
    return Path(runtime_dir) / "run"


class ControlSocket:
    """The listening socket of one supervisor (shared by its background continuation)."""

    def __init__(self, runtime_dir: str) -> None:
        d = run_dir(runtime_dir)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = d / f"{os.getpid()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.path.unlink(missing_ok=True)
            self.sock.bind(str(self.path))
            self.sock.listen(8)
        except OSError:
            self.sock.close()
            raise
        finally:
            os.umask(old)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def serve_one(self, sup: Supervisor) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2.0)
            try:
                got = recv_msg(conn, 4096)
                if got is None:
                    return
                msg, fds = got
                for fd in fds:
                    os.close(fd)
                reply = self._handle(sup, conn, msg)
            except LuoError as e:
                reply = error_reply(e)
            except OSError:
                return
            try:
                send_msg(conn, reply, large=True)  # (the files of thousands of sessions)
            except OSError:
                pass

    @staticmethod
    def _handle(sup: Supervisor, conn: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        uid = int.from_bytes(creds[4:8], "little")
        if uid not in (0, os.getuid()):
            raise LuoError(errno.EPERM, f"uid {uid} may not control this luo run supervisor")
        op = fields.choice(msg, "op", ("status", "reboot"))
        if op == "status":  # (after the move to the background the pid is not the socket's name)
            return ok(pid=os.getpid(), **sup.describe())
        host_pid = fields.integer(msg, "host_pid", 1, 1 << 22)
        return ok(killed=end_stale_holders(sup, host_pid))


def holders(inodes: set[int], only: int | None = None) -> dict[int, set[int]]:
    """pid -> the inodes among ``inodes`` it holds an fd of (a scan of /proc/*/fd, or of ``only``)."""
    want = {f"socket:[{ino}]": ino for ino in inodes}
    found: dict[int, set[int]] = {}
    names = [str(only)] if only is not None else [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    for name in names:
        pid = int(name)
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            ino = want.get(link)
            if ino is not None:
                found.setdefault(pid, set()).add(ino)
    return found


def end_stale_holders(sup: Supervisor, host_pid: int) -> list[int]:
    """SIGKILL every process holding a file of a host other than ``host_pid``; wait until gone.

    Each one is signalled through a pidfd opened *before* checking, once more, that it holds such
    a file, so a pid reused meanwhile is never hit. Returns the pids that are gone."""
    stale = {ino for (_dev, ino), info in sup.files.items() if info.host_pid != host_pid}
    if not stale:
        return []
    pidfds: dict[int, int] = {}
    try:
        for pid in sorted(p for p in holders(stale) if p != os.getpid()):
            try:
                pfd = pidfd_open(pid)
            except LuoError:
                continue  # gone already
            pidfds[pid] = pfd
            if not holders_among(pid, stale):
                continue
            try:
                pidfd_send_signal(pfd, signal.SIGKILL)
            except LuoError as e:
                log.warning("reboot: cannot end pid %d: %s", pid, e)
        gone = []
        deadline = time.monotonic() + KILL_WAIT
        for pid, pfd in pidfds.items():
            p = select.poll()
            p.register(pfd, select.POLLIN)
            if p.poll(max(0.0, deadline - time.monotonic()) * 1000.0):
                gone.append(pid)
    finally:
        for pfd in pidfds.values():
            os.close(pfd)
    log.info("reboot: ended %s (they held files of a host before pid %d)", gone, host_pid)
    return gone


def holders_among(pid: int, inodes: set[int]) -> bool:
    """Does ``pid`` hold an fd of one of these socket inodes?"""
    return pid in holders(inodes, only=pid)


def ask_all(runtime_dir: str, msg: dict[str, Any], timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send ``msg`` to every supervisor of the runtime dir; a socket nobody listens on is removed."""
    out: list[dict[str, Any]] = []
    d = run_dir(runtime_dir)
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.sock")):
        named = int(path.stem) if path.stem.isdigit() else 0
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            send_msg(s, msg)
            got = recv_msg(s, 1 << 20)
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # a supervisor that is gone
            continue
        except OSError as e:
            out.append({"pid": named, "error": str(e)})
            continue
        finally:
            s.close()
        if got is None:
            continue
        reply, fds = got
        for fd in fds:
            os.close(fd)
        try:
            raise_for(reply)
        except LuoError as e:
            out.append({"pid": named, "error": str(e)})
            continue
        reply.setdefault("pid", named)
        reply.pop("errno", None)
        out.append(reply)
    return out


def reboot(runtime_dir: str, host_pid: int) -> tuple[list[int], list[str]]:
    """End the holders of pre-update files in every supervisor: the pids ended, and a sentence
    for each supervisor that could not do it (the update itself has succeeded either way)."""
    killed: list[int] = []
    errors: list[str] = []
    for reply in ask_all(runtime_dir, {"op": "reboot", "host_pid": host_pid}):
        if "error" in reply:
            errors.append(f"luo run supervisor {reply['pid']}: {reply['error']}")
        else:
            killed += [int(p) for p in reply.get("killed", [])]
    return sorted(killed), errors
