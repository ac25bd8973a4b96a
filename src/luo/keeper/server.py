"""``luo keeper``: the process that holds luod's preserved fds while luod may crash.

It listens on ``<runtime>/keeper`` (SOCK_SEQPACKET, mode 0600; only root or the keeper's own user
is served, by SO_PEERCRED) and holds, per key, one fd, plus the metadata in a sealed memfd. One
thread, one selector: each request is validated, handled and answered in one step, and nothing a
client sends can make it drop an fd it holds (a bad request gets an error reply and changes
nothing) or exit.

It exits only when killed. It is the last holder of preserved memory: when luod has crashed and
the clients that preserved fds have exited, these are the only references left to a guest's RAM.
Exiting when idle, when the last client disconnects, or on any error, would free precisely what it
exists to keep, at the moment it is needed.

One keeper per runtime dir: it takes an exclusive flock on ``<runtime>/keeper.lock`` for its
lifetime before touching the socket path, so two keepers started at once never both bind (a stale
socket file must be unlinked before binding, and without the lock the second starter could unlink
the first one's fresh socket). A keeper that finds the lock taken, or the socket answering, exits
0: one already runs.

Sockets are non-blocking: a reply the client's socket has no room for waits in that connection's
queue (holding dups of its fds) and the connection is not read until it drains, so a client that
stops reading stalls only itself, never the keeper.

Protocol (one JSON object per datagram as in luo.host.wire, at most 64 KiB, see luo.keeper.proto;
every reply has ``errno``, 0 for success):

- ``{"op": "put", "key": K}`` + 1 fd, or ``{"op": "put", "keys": [K...]}`` + as many fds (<= 253):
  store, replacing. All or nothing.
- ``{"op": "drop", "keys": [K...]}``: forget (unknown keys are ignored) -> ``dropped``.
- ``{"op": "meta", "size": N}`` + 1 sealed memfd of N bytes: replace the metadata. The keeper keeps
  that memfd itself: sealed against writes and resizing, it is immutable, so no copy is needed.
- ``{"op": "load"}`` -> ``{"count", "meta_size", "batches"}`` (+ the meta memfd when there is one),
  then ``batches`` messages ``{"op": "fds", "index", "keys"}`` each with up to 253 fds. The keys
  travel with their batch: all 2000 of them in one datagram could exceed the socket buffer.
- ``{"op": "ping"}`` -> ``{"pid", "instance", "protocol", "count", "meta_size"}``. ``instance``
  differs for every keeper process, so a client that reconnects can tell that a keeper died (and
  took everything with it).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import resource
import selectors
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luo.abi import KEEPER_PROTOCOL
from luo.errors import LuoError
from luo.host.wire import close_fds, error_reply, send_msg
from luo.keeper.proto import LOCK_NAME, MAX_SOCKET_PATH, SOCKET_NAME, recv
from luo.keeper.store import BATCH, MAX_META, validate_key

log = logging.getLogger("luo-keeper")

F_GET_SEALS = 1034
F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 2, 4, 8
META_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE

Reply = tuple[dict[str, Any], list[int]]


@dataclass
class Conn:
    sock: socket.socket
    uid: int
    pid: int
    # replies the socket had no room for yet, each owning (dups of) its fds; while any wait, the
    # connection is not read, so one slow reader costs at most one reply's worth of memory
    outq: collections.deque[Reply] = field(default_factory=collections.deque)
    dead: bool = False


def peer_of(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connecting process, as the kernel recorded it at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid



def _keys(msg: dict[str, Any], name: str = "keys") -> list[str]:
    keys = msg.get(name)
    if not isinstance(keys, list):
        raise LuoError(errno.EINVAL, f"{name!r} must be a list of keys")
    return [validate_key(k) for k in keys]


class Keeper:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.fds: dict[str, int] = {}
        self.meta_fd: int | None = None
        self.meta_size = 0
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self.uid = os.geteuid()
        self.sel = selectors.DefaultSelector()
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, None)

    # -- the loop ------------------------------------------------------------------------
    def serve_forever(self) -> None:
        while True:
            try:
                self.step_once(None)
            except Exception:  # a bug in one step must not end the process that holds everything
                log.exception("keeper step failed; serving on")
                time.sleep(0.01)  # no hot loop if the failure repeats

    def step_once(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            conn: Conn | None = key.data
            if conn is None:
                self.accept()
            elif conn.dead:
                continue  # dropped earlier in this batch of events
            elif conn.outq:  # registered for writing only while replies wait
                self.flush(conn)
            else:
                self.serve(conn)

    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError as e:  # EAGAIN, or a connection reset before we got to it
            if e.errno in (errno.EMFILE, errno.ENFILE):
                log.warning("cannot accept a connection: %s", e.strerror)
                time.sleep(0.05)  # the listener stays readable: do not spin until an fd is free
            return
        sock.setblocking(False)
        try:
            pid, uid, _ = peer_of(sock)
        except OSError:
            sock.close()
            return
        conn = Conn(sock, uid, pid)
        self.sel.register(sock, selectors.EVENT_READ, conn)

    def drop_conn(self, conn: Conn) -> None:
        if conn.dead:
            return
        conn.dead = True
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        while conn.outq:
            close_fds(conn.outq.popleft()[1])

    def serve(self, conn: Conn) -> None:
        try:
            got = recv(conn.sock)
        except (BlockingIOError, InterruptedError):
            return
        except LuoError as e:  # malformed or truncated: recv_msg closed its fds
            log.warning("pid %d: %s", conn.pid, e)
            self.send(conn, error_reply(e), [])
            return
        except OSError:
            got = None
        if got is None:
            self.drop_conn(conn)
            return
        msg, fds = got
        try:
            replies = self.handle(conn, msg, fds)
        except LuoError as e:
            log.warning("pid %d: %s refused: %s", conn.pid, str(msg.get("op"))[:40], e)
            replies = [(error_reply(e), [])]
        except Exception as e:  # a bug must never take the held fds down with it
            log.exception("pid %d: request %r failed", conn.pid, str(msg.get("op"))[:40])
            replies = [(error_reply(LuoError(errno.EIO, f"internal error: {e}")), [])]
        finally:
            close_fds(fds)  # handlers remove from ``fds`` what they keep
        for reply, out in replies:
            self.send(conn, reply, out)

    # -- replies -------------------------------------------------------------------------
    def send(self, conn: Conn, reply: dict[str, Any], fds: list[int]) -> None:
        """Send now, or queue (with dups of ``fds``: a held fd may be replaced before the queued
        reply goes out) when the socket is full. ``fds`` stay the caller's."""
        if conn.dead:
            return
        if not conn.outq:
            try:
                send_msg(conn.sock, reply, fds)
                return
            except (BlockingIOError, InterruptedError):
                self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            except OSError:
                self.drop_conn(conn)
                return
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except OSError as e:  # out of fds: this client loses its connection, nobody loses an fd
            log.warning("pid %d: cannot queue a reply (%s); closing its connection", conn.pid, e.strerror)
            close_fds(dups)
            self.drop_conn(conn)
            return
        conn.outq.append((reply, dups))

    def flush(self, conn: Conn) -> None:
        while conn.outq:
            reply, fds = conn.outq[0]
            try:
                send_msg(conn.sock, reply, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drop_conn(conn)
                return
            conn.outq.popleft()
            close_fds(fds)
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)

    # -- requests ------------------------------------------------------------------------
    def handle(self, conn: Conn, msg: dict[str, Any], fds: list[int]) -> list[Reply]:
        if conn.uid != 0 and conn.uid != self.uid:
            raise LuoError(errno.EPERM, f"uid {conn.uid} may not use the fd keeper: only root or uid {self.uid}")
        op = msg.get("op")
        if op == "put":
            return [self.put(msg, fds)]
        if op == "load":
            self.no_fds("load", fds)
            return self.load()
        if op == "drop":
            self.no_fds("drop", fds)
            return [self.drop(msg)]
        if op == "meta":
            return [self.meta(msg, fds)]
        if op == "ping":
            self.no_fds("ping", fds)
            return [({"errno": 0, "pid": os.getpid(), "instance": self.instance, "protocol": KEEPER_PROTOCOL,
                      "count": len(self.fds), "meta_size": self.meta_size if self.meta_fd is not None else None},
                     [])]
        raise LuoError(errno.ENOTTY, f"unknown operation {str(op)[:40]!r}")

    @staticmethod
    def no_fds(op: str, fds: list[int]) -> None:
        if fds:
            raise LuoError(errno.EINVAL, f"{op} takes no fds, got {len(fds)}")

    def put(self, msg: dict[str, Any], fds: list[int]) -> Reply:
        if "key" in msg and "keys" not in msg:
            keys = [validate_key(msg["key"])]
        elif "keys" in msg and "key" not in msg:
            keys = _keys(msg)
        else:
            raise LuoError(errno.EINVAL, "put needs either 'key' or 'keys'")
        if len(keys) != len(fds):
            raise LuoError(errno.EINVAL, f"put of {len(keys)} keys carries {len(fds)} fds")
        if len(set(keys)) != len(keys):
            raise LuoError(errno.EINVAL, "put names a key twice")
        for key, fd in zip(keys, fds, strict=True):
            old = self.fds.pop(key, None)
            if old is not None:
                close_fds([old])  # never raises: the loop must not stop between keeping and clearing
            self.fds[key] = fd
        fds.clear()  # kept
        return {"errno": 0, "count": len(self.fds)}, []

    def drop(self, msg: dict[str, Any]) -> Reply:
        keys = _keys(msg)
        dropped = 0
        for key in keys:
            fd = self.fds.pop(key, None)
            if fd is not None:
                close_fds([fd])
                dropped += 1
        return {"errno": 0, "dropped": dropped, "count": len(self.fds)}, []

    def meta(self, msg: dict[str, Any], fds: list[int]) -> Reply:
        size = msg.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_META:
            raise LuoError(errno.EINVAL, f"meta size must be an integer from 0 to {MAX_META}")
        if len(fds) != 1:
            raise LuoError(errno.EINVAL, f"meta carries exactly one memfd, got {len(fds)} fds")
        fd = fds[0]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LuoError(errno.EINVAL, "meta fd is not a memfd")
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            raise LuoError(errno.EINVAL, "meta fd is not a sealable memfd") from None
        if seals & META_SEALS != META_SEALS:
            raise LuoError(errno.EINVAL, "meta memfd must be sealed against write, shrink and grow")
        if st.st_size != size:
            raise LuoError(errno.EINVAL, f"meta memfd holds {st.st_size} bytes, the message says {size}")
        if self.meta_fd is not None:
            close_fds([self.meta_fd])
        self.meta_fd, self.meta_size = fd, size
        fds.clear()  # kept
        return {"errno": 0}, []

    def load(self) -> list[Reply]:
        items = list(self.fds.items())
        batches = (len(items) + BATCH - 1) // BATCH
        head: dict[str, Any] = {"errno": 0, "count": len(items), "batches": batches,
                                "meta_size": self.meta_size if self.meta_fd is not None else None}
        out: list[Reply] = [(head, [self.meta_fd] if self.meta_fd is not None else [])]
        for i in range(0, len(items), BATCH):
            chunk = items[i : i + BATCH]
            out.append(({"errno": 0, "op": "fds", "index": i, "keys": [k for k, _ in chunk]},
                        [fd for _, fd in chunk]))
        return out


# -- start-up --------------------------------------------------------------------------------
def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_keeper_socket(path: Path) -> socket.socket | None:
    """The listening socket (mode 0600), or None when a keeper already answers on ``path``.

    Called with the keeper lock held, so a socket file nobody answers on is stale and safe to
    unlink. The mode is set before listen(), so there is no moment another user could connect.
    """
    if _answers(path):
        return None
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE and _answers(path):
            return None
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(64)
    return s


def raise_fd_limit() -> None:
    """Hold thousands of fds even where the soft RLIMIT_NOFILE is the usual 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass


def run_keeper(runtime_root: Path) -> int:
    """The ``luo keeper`` command. Returns 0 at once when a keeper already serves the dir;
    otherwise it serves until killed (see the module docstring for why it never exits)."""
    from luo.host.procname import set_process_name

    logging.basicConfig(level=os.environ.get("LUO_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s luo-keeper[{os.getpid()}] %(levelname)s %(message)s")
    set_process_name("luo-keeper")
    root = Path(runtime_root).absolute()
    path = root / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LuoError(errno.ENAMETOOLONG, f"{path}: too long for a unix socket (at most {MAX_SOCKET_PATH} bytes)")
    raise_fd_limit()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        log.info("another keeper holds %s; leaving it to serve", root / LOCK_NAME)
        return 0
    listener = bind_keeper_socket(path)
    if listener is None:
        log.info("a keeper already answers on %s", path)
        return 0
    os.chdir("/")  # pin no mount
    log.info("keeper serving %s", path)
    Keeper(listener).serve_forever()
    return 0  # not reached: serve_forever returns only by an exception
