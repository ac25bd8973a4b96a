"""The notification loop of ``luo run``: one thread, one epoll, one notification at a time.

Watched fds: the seccomp listener (a call to serve, or EPOLLHUP when no supervised process is
left), the supervisor's control socket (``luo.uapi.control``) and, while it runs, the main
program's pidfd.

The program's /dev/liveupdate and session fds are luod's own sockets (see ``luo.uapi.device``),
recognised in any process of the program, whatever their fd number, by the identity
(st_dev, st_ino) behind ``/proc/TID/fd/N``. Every call is answered exactly once: served, refused
with an errno, or continued (the kernel runs it itself) when it is not ours: another path,
another fd.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
from pathlib import Path

from luo.client.connection import Connection
from luo.errors import LuoError
from luo.uapi import abi, ioctls
from luo.uapi.control import ControlSocket, holders
from luo.uapi.device import FileInfo, Link, open_device, peer_pid, serve_device, serve_session
from luo.uapi.procmem import Target
from luo.uapi.seccomp import (
    NR_CREAT,
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

_U32 = 0xFFFFFFFF
SWEEP_AT = 1024  # remembered files before the first sweep for ones no process holds any more


def _tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Tgid:")))


def _s32(v: int) -> int:
    v &= _U32
    return v - (1 << 32) if v & 0x80000000 else v


class Notification:
    """One intercepted call; ``answered`` guards the exactly-once rule."""

    def __init__(self, listener: Listener, nid: int, tid: int, nr: int, args: tuple[int, ...]) -> None:
        self.listener, self.nid, self.tid, self.nr, self.args = listener, nid, tid, nr, args
        self.answered = False
        self.target = Target(tid, lambda: listener.id_valid(nid))

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
        """Is the call still pending (so its pid still names the caller)? Asked after reading
        the caller's memory and before acting on what was read."""
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
            if not self.n.attach():  # the pidfd must be the caller's, not a reuse of its tid
                raise LuoError(errno.ESRCH, "the caller is gone")
            return pidfd_getfd(pidfd, fd)
        except LuoError as e:
            if e.errno == errno.EBADF:
                raise LuoError(errno.EBADF, f"fd {fd} is not open in the caller") from None
            raise
        finally:
            os.close(pidfd)

    def give_fd(self, fd: int) -> int:
        return self.sup.listener.add_fd(self.n.nid, fd, cloexec=True)

    def give_session(self, sock: int, info: FileInfo) -> int:
        return self.sup.install(self.n, sock, info, cloexec=True, send=False)

    def check_fd_room(self) -> None:
        try:
            tgid = _tgid(self.n.tid)
            soft, _hard = resource.prlimit(tgid, resource.RLIMIT_NOFILE)
            used = sum(1 for _ in os.scandir(f"/proc/{self.n.tid}/fd"))
        except (OSError, ValueError):
            return  # cannot tell: the ADDFD itself will say EMFILE
        if soft != resource.RLIM_INFINITY and used >= soft:
            raise LuoError(errno.EMFILE, f"the caller has {used} fds open, its limit is {soft}")


class Supervisor:
    def __init__(self, listener_fd: int, runtime_dir: str, program: str) -> None:
        self.listener = Listener(listener_fd)
        self.listener.enable_sync_wakeup()
        self.runtime_dir = Path(runtime_dir)
        self.program = program
        self.ep = select.epoll()
        self.ep.register(listener_fd, select.EPOLLIN)
        self.files: dict[tuple[int, int], FileInfo] = {}  # (st_dev, st_ino) of a socket we gave out
        self.sweep_at = SWEEP_AT
        self.extra: dict[int, object] = {}  # other fds in the epoll (the main program's pidfd)
        self.listener_gone = False
        self._query: Connection | None = None
        self.served = 0
        self.control: ControlSocket | None = None

    def listen(self) -> None:
        """Open ``<runtime>/run/PID.sock`` (status, reboot); a dir we may not write only costs that."""
        try:
            self.control = ControlSocket(str(self.runtime_dir))
        except OSError as e:
            log.warning("luo run: no control socket in %s/run: %s", self.runtime_dir, e.strerror)
            return
        self.ep.register(self.control.fileno(), select.EPOLLIN)

    def relisten(self) -> None:
        """The background continuation answers under its own pid (the old name's pid is free)."""
        if self.control is not None:
            self.ep.unregister(self.control.fileno())
            self.control.close()
            self.control = None
        self.listen()

    def own_fds(self) -> set[int]:
        """The fds the supervisor needs (everything else may be closed in the background)."""
        fds = {self.listener.fd, self.ep.fileno(), *self.extra}
        if self.control is not None:
            fds.add(self.control.fileno())
        if self._query is not None and self._query._sock is not None:
            fds.add(self._query._sock.fileno())
        return fds

    def describe(self) -> dict[str, object]:
        self.sweep()
        files = [{"kind": i.kind, "name": i.name, "incoming": i.incoming, "host_pid": i.host_pid}
                 for i in self.files.values()]
        return {"program": self.program, "files": files, "served": self.served}

    # -- the loop ------------------------------------------------------------------------------
    def poll_once(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Handle what is ready; returns the (fd, events) of fds in ``extra`` for the caller."""
        other: list[tuple[int, int]] = []
        for fd, ev in self.ep.poll(-1 if timeout is None else timeout):
            try:
                if fd == self.listener.fd:
                    if ev & select.EPOLLIN:
                        self.on_notification()
                    elif ev & (select.EPOLLHUP | select.EPOLLERR):
                        self.listener_gone = True
                        self.ep.unregister(fd)
                elif self.control is not None and fd == self.control.fileno():
                    self.control.serve_one(self)
                elif fd in self.extra:
                    other.append((fd, ev))
            except Exception:  # the loop must outlive any bug: a dead supervisor fails every open
                log.exception("luo run: handling fd %d (events %#x) failed", fd, ev)
        return other

    def serve_until_idle(self) -> None:
        """Serve until no supervised process is left (the listener hangs up)."""
        while not self.listener_gone:
            self.poll_once()
        self.close_all()

    def close_all(self) -> None:
        """No supervised process is left: close everything (the listener last)."""
        self.files.clear()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self._query is not None:
            self._query.close()
            self._query = None
        self.ep.close()
        os.close(self.listener.fd)

    # -- the files we gave out -----------------------------------------------------------------
    def install(self, n: Notification, sock: int, info: FileInfo, cloexec: bool, send: bool) -> int:
        """Put ``sock`` into the caller; returns its number there. The caller's copy is the only
        one once ours is closed, so its close is the file's close, as with a kernel fd."""
        st = os.fstat(sock)
        number = self.listener.add_fd(n.nid, sock, cloexec=cloexec, send=send)
        if send:
            n.answered = True
        self.files[(st.st_dev, st.st_ino)] = info
        log.info("%s %s -> fd %d in tid %d", info.kind, info.name, number, n.tid)
        if len(self.files) >= self.sweep_at:
            self.sweep()
        return number

    def sweep(self) -> None:
        """Forget files no process holds any more (they were closed: nothing to serve)."""
        held = holders({ino for _dev, ino in self.files})
        inodes = set().union(*held.values()) if held else set()
        self.files = {k: v for k, v in self.files.items() if k[1] in inodes}
        self.sweep_at = max(SWEEP_AT, 2 * len(self.files))

    def take(self, n: Notification, fd: int, identity: tuple[int, int], info: FileInfo) -> socket.socket | None:
        """The caller's ``fd`` as our socket, if it is still the one we gave out (inode and peer)."""
        try:
            mine = CallerView(self, n).take_fd(fd)
        except LuoError:
            return None
        try:
            st = os.fstat(mine)
            if (st.st_dev, st.st_ino) == identity:  # (another thread may have dup2'd anything over it)
                sock = socket.socket(fileno=mine)
                if peer_pid(sock) == info.peer_pid:
                    return sock
                sock.detach()
        except OSError:
            pass
        os.close(mine)
        return None

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
            elif nr in (NR_OPENAT, NR_OPEN, NR_OPENAT2, NR_CREAT):
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
            if not n.answered:
                n.proceed()

    def on_open(self, n: Notification) -> None:
        if n.nr == NR_OPEN:
            dirfd, path_ptr, flags = -100, n.args[0], n.args[1]
        elif n.nr == NR_CREAT:
            dirfd, path_ptr, flags = -100, n.args[0], os.O_CREAT | os.O_WRONLY | os.O_TRUNC
        else:
            dirfd, path_ptr = _s32(n.args[0]), n.args[1]
            flags = n.args[2]
        path = n.target.read_path(path_ptr)
        if path is None or b"liveupdate" not in path:
            return n.proceed()
        if n.nr == NR_OPENAT2:
            try:
                flags = int.from_bytes(n.target.read(n.args[2], 8), "little")
            except LuoError:
                return n.proceed()
        if n.target.resolve(dirfd, path) != abi.DEVICE_PATH or not n.attach():
            return n.proceed()
        # what the kernel says before a character device's open runs
        if flags & os.O_PATH:
            return n.proceed()  # an O_PATH fd needs a node; there is none (ENOENT, docs/uapi.md)
        if flags & os.O_DIRECTORY:
            raise LuoError(errno.ENOTDIR, f"{abi.DEVICE_PATH} is not a directory")
        if flags & (os.O_CREAT | os.O_EXCL) == os.O_CREAT | os.O_EXCL:
            raise LuoError(errno.EEXIST, f"{abi.DEVICE_PATH} exists")
        sock, info = open_device(self.runtime_dir, self._program(n.tid))
        with sock:
            self.install(n, sock.fileno(), info, cloexec=bool(flags & os.O_CLOEXEC), send=True)

    def on_ioctl(self, n: Notification) -> None:
        fd, cmd, argp = _s32(n.args[0]), n.args[1] & _U32, n.args[2]
        identity = n.target.fd_identity(fd) if fd >= 0 else None
        info = self.files.get(identity) if identity is not None else None
        if info is None:
            return n.proceed()  # an fd that is not ours: the kernel answers (ENOTTY, or its driver)
        call = ioctls.decode(info.kind, cmd, argp, n.target)
        if not n.attach():  # what was read must be the caller's
            return n.proceed()
        link = Link(info, lambda: self.take(n, fd, identity, info))
        try:
            (serve_device if info.kind == "device" else serve_session)(link, call, CallerView(self, n))
        finally:
            link.close()
        n.succeed(0)

    def on_resize(self, n: Notification) -> None:
        """ftruncate/fallocate: EPERM on a memfd luod holds preserved (memfd-v1's size freeze)."""
        fd = _s32(n.args[0])
        link = n.target.fd_link(fd) if fd >= 0 else None
        if link is None or not link.startswith("/memfd:"):
            return n.proceed()
        identity = n.target.fd_identity(fd)
        if identity is None or not n.attach():
            return n.proceed()
        if self._preserved(identity):
            what = "ftruncate" if n.nr == NR_FTRUNCATE else "fallocate"
            log.info("tid %d: %s on preserved %s refused (EPERM)", n.tid, what, link)
            n.fail(errno.EPERM)
        else:
            n.proceed()

    def _preserved(self, identity: tuple[int, int]) -> bool:
        """Does luod hold this inode preserved? No host (or one too old to say): nothing is, and the
        truncate goes on (docs/uapi.md: the size is then only checked at prepare and freeze)."""
        if self._query is None:
            self._query = Connection(str(self.runtime_dir))  # (it reconnects once by itself)
        try:
            reply, _ = self._query.call({"op": "preserved_size", "dev": identity[0], "ino": identity[1]})
        except LuoError:
            self._query.close()
            return False
        return bool(reply.get("preserved"))

    def _program(self, tid: int) -> str:
        """What the opener is, for `luo status`: "selftest pid 123 (luo run ./selftest --stage 1)"."""
        try:
            tgid = _tgid(tid)
            with open(f"/proc/{tgid}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError, StopIteration):
            return f"{self.program} (tid {tid})"[:200]
        return f"{comm} pid {tgid} (luo run {self.program})"[:200]
