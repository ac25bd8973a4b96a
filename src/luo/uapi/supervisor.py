"""The notification loop of ``luo run``: one thread, one epoll, one notification at a time.

Watched fds:

- the seccomp listener: a call to serve (EPOLLIN), or no supervised process left (EPOLLHUP);
- our end of each placeholder socket pair: the program's end is its /dev/liveupdate or session
  fd; EOF means the program closed its last copy (or every holder died), so the file is closed;
- each luod connection: EOF while idle means that host is gone, and the file goes stale.

A placeholder is recognised in any process of the program, whatever its fd number, by the
identity (st_dev, st_ino) of the socket behind ``/proc/TID/fd/N``. Every call is answered
exactly once: served, refused with an errno, or continued (the kernel runs it itself) when it
is not ours: another path, another fd.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from dataclasses import dataclass

from luo.client.connection import Connection
from luo.errors import LuoError
from luo.uapi import abi, ioctls
from luo.uapi.control import ControlSocket
from luo.uapi.device import DeviceFile, SessionFile
from luo.uapi.procmem import Target
from luo.uapi.seccomp import (
    NR_FALLOCATE,
    NR_FTRUNCATE,
    NR_IOCTL,
    NR_OPEN,
    NR_OPENAT,
    NR_OPENAT2,
    PIDFD_THREAD,
    Listener,
    pidfd_getfd,
    pidfd_open,
)

log = logging.getLogger("luo.run")

File = DeviceFile | SessionFile
_U32 = 0xFFFFFFFF


def _s32(v: int) -> int:
    v &= _U32
    return v - (1 << 32) if v & 0x80000000 else v


@dataclass
class Placeholder:
    """Our end of the pair whose other end the program holds as a /dev/liveupdate or session fd."""

    ours: socket.socket
    identity: tuple[int, int]  # (st_dev, st_ino) of the program's end
    file: File


class Notification:
    """One intercepted call; ``answered`` guards the exactly-once rule."""

    def __init__(self, listener: Listener, nid: int, tid: int, nr: int, args: tuple[int, ...]) -> None:
        self.listener, self.nid, self.tid, self.nr, self.args = listener, nid, tid, nr, args
        self.answered = False
        self.target = Target(tid)

    def proceed(self) -> None:
        if not self.answered:
            self.answered = True
            self.listener.proceed(self.nid)

    def fail(self, err: int) -> None:
        if not self.answered:
            self.answered = True
            self.listener.respond(self.nid, error=err)

    def succeed(self, val: int = 0) -> None:
        if not self.answered:
            self.answered = True
            self.listener.respond(self.nid, val)

    def attach(self) -> bool:
        """Open the caller's memory, then check the call is still pending (so the pid was not reused)."""
        try:
            self.target.open_mem()
        except OSError:
            return False
        return self.listener.id_valid(self.nid)


class CallerView:
    """``device.Caller`` for one notification."""

    def __init__(self, sup: Supervisor, n: Notification) -> None:
        self.sup, self.n = sup, n
        self.mem = n.target

    def take_fd(self, fd: int) -> int:
        try:
            pidfd = pidfd_open(self.n.tid, PIDFD_THREAD)
        except LuoError as e:
            raise LuoError(errno.ESRCH, f"the caller is gone: {e.message}") from None
        try:
            return pidfd_getfd(pidfd, fd)
        except LuoError as e:
            if e.errno == errno.EBADF:
                raise LuoError(errno.EBADF, f"fd {fd} is not open in the caller") from None
            raise
        finally:
            os.close(pidfd)

    def give_fd(self, fd: int) -> int:
        return self.sup.listener.add_fd(self.n.nid, fd, cloexec=True)

    def give_file(self, file: SessionFile) -> int:
        return self.sup.install(self.n, file, cloexec=True, send=False)


class Supervisor:
    def __init__(self, listener_fd: int, runtime_dir: str, program: str) -> None:
        self.listener = Listener(listener_fd)
        self.listener.enable_sync_wakeup()
        self.runtime_dir = runtime_dir
        self.program = program
        self.ep = select.epoll()
        self.ep.register(listener_fd, select.EPOLLIN)
        self.by_identity: dict[tuple[int, int], Placeholder] = {}
        self.by_ours: dict[int, Placeholder] = {}  # our end's fd -> placeholder
        self.by_host_sock: dict[int, Placeholder] = {}  # luod socket fd -> placeholder
        self.extra: dict[int, object] = {}  # other fds in the epoll (the main program's pidfd)
        self.listener_gone = False
        self._query: Connection | None = None
        self.served = 0
        self.control: ControlSocket | None = None

    def listen(self) -> None:
        """Open ``<runtime>/run/PID.sock`` (status, reboot); a dir we may not write only costs that."""
        try:
            self.control = ControlSocket(self.runtime_dir)
        except OSError as e:
            log.warning("luo run: no control socket in %s/run: %s", self.runtime_dir, e.strerror)
            return
        self.ep.register(self.control.fileno(), select.EPOLLIN)

    def describe(self) -> dict[str, object]:
        files = [{"kind": ph.file.kind, "name": getattr(ph.file, "name", abi.DEVICE_PATH),
                  "incoming": getattr(ph.file, "incoming", False), "host_pid": ph.file.host_pid,
                  "stale": ph.file.stale} for ph in self.by_identity.values()]
        return {"program": self.program, "files": files, "served": self.served}

    # -- the loop ------------------------------------------------------------------------------
    def poll_once(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Handle what is ready; returns the (fd, events) of fds in ``extra`` for the caller."""
        other: list[tuple[int, int]] = []
        for fd, ev in self.ep.poll(-1 if timeout is None else timeout):
            if fd == self.listener.fd:
                if ev & select.EPOLLIN:
                    self.on_notification()
                elif ev & (select.EPOLLHUP | select.EPOLLERR):
                    self.listener_gone = True
                    self.ep.unregister(fd)
            elif self.control is not None and fd == self.control.fileno():
                self.control.serve_one(self)
            elif fd in self.by_ours:
                self.on_placeholder(self.by_ours[fd], ev)
            elif fd in self.by_host_sock:
                self.on_host_sock(self.by_host_sock[fd], ev)
            elif fd in self.extra:
                other.append((fd, ev))
        return other

    def serve_until_idle(self) -> None:
        """Serve until no supervised process is left (the listener hangs up)."""
        while not self.listener_gone:
            self.poll_once()
        self.close_all()

    def close_all(self) -> None:
        for ph in list(self.by_ours.values()):
            self.drop(ph)
        if self.control is not None:
            self.control.close()
            self.control = None

    # -- placeholders --------------------------------------------------------------------------
    def install(self, n: Notification, file: File, cloexec: bool, send: bool) -> int:
        """Give the caller a new fd standing for ``file``; returns its number there."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            st = os.fstat(theirs.fileno())
            number = self.listener.add_fd(n.nid, theirs.fileno(), cloexec=cloexec, send=send)
        except BaseException:
            ours.close()
            file.close()
            raise
        finally:
            theirs.close()
        if send:
            n.answered = True
        ph = Placeholder(ours, (st.st_dev, st.st_ino), file)
        ours.setblocking(False)
        self.by_identity[ph.identity] = ph
        self.by_ours[ours.fileno()] = ph
        self.ep.register(ours.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        host_fd = file.socket_fd()
        if host_fd >= 0:
            self.by_host_sock[host_fd] = ph
            self.ep.register(host_fd, select.EPOLLIN | select.EPOLLRDHUP)
        log.info("%s %s -> fd %d in tid %d", file.kind, getattr(file, "name", abi.DEVICE_PATH), number, n.tid)
        return number

    def on_placeholder(self, ph: Placeholder, ev: int) -> None:
        if ev & select.EPOLLIN and not ev & (select.EPOLLHUP | select.EPOLLRDHUP):
            self._drain(ph)  # the program wrote into its fd: nothing there is for us
            return
        self.drop(ph)

    def _drain(self, ph: Placeholder) -> None:
        try:
            while True:
                data, anc, _flags, _ = ph.ours.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for i in range(0, len(payload) - len(payload) % 4, 4):
                            os.close(int.from_bytes(payload[i:i + 4], "little"))
                if not data:
                    self.drop(ph)
                    return
        except BlockingIOError:
            return
        except OSError:
            self.drop(ph)

    def drop(self, ph: Placeholder) -> None:
        """The program closed the file: close it here too (unpreserve, finish, release the device)."""
        fd = ph.ours.fileno()
        if fd in self.by_ours:
            del self.by_ours[fd]
            self.ep.unregister(fd)
        self.by_identity.pop(ph.identity, None)
        self._forget_host_sock(ph)
        ph.ours.close()
        what = getattr(ph.file, "name", abi.DEVICE_PATH)
        if ph.file.stale:
            log.info("%s %s closed (stale: nothing changes on the host)", ph.file.kind, what)
        else:
            log.info("%s %s closed", ph.file.kind, what)
        ph.file.close()

    def _forget_host_sock(self, ph: Placeholder) -> None:
        for hfd, other in list(self.by_host_sock.items()):
            if other is ph:
                del self.by_host_sock[hfd]
                try:
                    self.ep.unregister(hfd)
                except (KeyError, ValueError, OSError):
                    pass

    def on_host_sock(self, ph: Placeholder, ev: int) -> None:
        """luod spoke while no request was pending: its end closed (the host is gone)."""
        self._forget_host_sock(ph)
        log.info("%s %s: its luo host (pid %d) is gone", ph.file.kind, getattr(ph.file, "name", abi.DEVICE_PATH),
                 ph.file.host_pid)
        ph.file.went_away(f"host pid {ph.file.host_pid} ended: live update or exit")

    # -- calls ---------------------------------------------------------------------------------
    def on_notification(self) -> None:
        got = self.listener.recv()
        if got is None:
            return
        nid, tid, nr, _arch, args = got
        n = Notification(self.listener, nid, tid, nr, args)
        self.served += 1
        try:
            if nr == NR_IOCTL:
                self.on_ioctl(n)
            elif nr in (NR_OPENAT, NR_OPEN, NR_OPENAT2):
                self.on_open(n)
            elif nr in (NR_FTRUNCATE, NR_FALLOCATE):
                self.on_resize(n)
            else:
                n.proceed()
        except LuoError as e:
            if not n.answered:
                log.debug("tid %d: %s", tid, e)
            n.fail(e.errno)
        except Exception as e:  # a bug: the caller gets EIO, the supervisor goes on
            log.exception("tid %d: serving syscall %d failed: %r", tid, nr, e)
            n.fail(errno.EIO)
        finally:
            n.target.close()
            if not n.answered:
                n.proceed()

    def on_open(self, n: Notification) -> None:
        if n.nr == NR_OPEN:
            dirfd, path_ptr, flags = -100, n.args[0], n.args[1]
        else:
            dirfd, path_ptr = _s32(n.args[0]), n.args[1]
            flags = n.args[2]
        if not n.attach():
            return n.proceed()
        path = n.target.read_path(path_ptr)
        if path is None or b"liveupdate" not in path:
            return n.proceed()
        if n.nr == NR_OPENAT2:
            try:
                flags = int.from_bytes(n.target.read(n.args[2], 8), "little")
            except LuoError:
                return n.proceed()
        if n.target.resolve(dirfd, path) != abi.DEVICE_PATH:
            return n.proceed()
        device = DeviceFile.open(self.runtime_dir, self._program(n.tid))
        self.install(n, device, cloexec=bool(flags & os.O_CLOEXEC), send=True)

    def on_ioctl(self, n: Notification) -> None:
        fd, cmd, argp = _s32(n.args[0]), n.args[1] & _U32, n.args[2]
        ph = self.by_identity.get(n.target.fd_identity(fd) or (0, 0)) if fd >= 0 else None
        if ph is None:
            return n.proceed()  # an fd that is not ours: the kernel answers (ENOTTY, or its driver)
        if not n.attach():
            return n.proceed()
        call = ioctls.decode(ph.file.kind, cmd, argp, n.target)  # type: ignore[arg-type]
        ph.file.serve(call, CallerView(self, n))
        n.succeed(0)

    def on_resize(self, n: Notification) -> None:
        """ftruncate/fallocate: EPERM on a memfd luod holds preserved (memfd-v1's size freeze)."""
        fd = _s32(n.args[0])
        link = n.target.fd_link(fd) if fd >= 0 else None
        if link is None or not link.startswith("/memfd:"):
            return n.proceed()
        identity = n.target.fd_identity(fd)
        if identity is None or not n.listener.id_valid(n.nid):
            return n.proceed()
        if self._preserved(identity):
            what = "ftruncate" if n.nr == NR_FTRUNCATE else "fallocate"
            log.info("tid %d: %s on preserved %s refused (EPERM)", n.tid, what, link)
            n.fail(errno.EPERM)
        else:
            n.proceed()

    def _preserved(self, identity: tuple[int, int]) -> bool:
        for attempt in (0, 1):
            if self._query is None:
                self._query = Connection(self.runtime_dir)
            try:
                reply, _ = self._query.call({"op": "preserved_size", "dev": identity[0], "ino": identity[1]})
                return bool(reply.get("preserved"))
            except LuoError as e:
                self._query.close()
                self._query = None
                if e.errno in (errno.ECONNREFUSED, errno.ENOTTY) or attempt:
                    return False  # no host (or one without the op): nothing is preserved by it
        return False

    def _program(self, tid: int) -> str:
        try:
            with open(f"/proc/{tid}/status") as f:
                tgid = next((line.split()[1] for line in f if line.startswith("Tgid:")), str(tid))
            with open(f"/proc/{tgid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            return f"{self.program} (tid {tid})"
        return f"{comm} pid {tgid} (luo run {self.program})"[:200]
