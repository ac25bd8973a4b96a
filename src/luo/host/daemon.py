"""luod: the host daemon. Owns the orchestrator and serves the control socket.

One thread, one selector: every request is handled and answered in one step of the loop, and
the host only ever exits between steps (after a confirmed handover). libluo relies on this to
retry a request whose connection broke before any reply.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from luo.core.orchestrator import Orchestrator
from luo.core.states import State
from luo.errors import LuoError
from luo.host import fields
from luo.host.credentials import Peer
from luo.host.runtime import RuntimeDir
from luo.host.wire import error_reply, recv_msg, send_msg
from luo.protocol import client_host
from luo.protocol.table import Cursor

log = logging.getLogger("luod")

SEND_TIMEOUT = 2  # seconds

Reply = tuple[dict[str, Any], list[int]]
DEFERRED: Reply = ({"deferred": True}, [])  # the op answers later, through Host.defer
DROPPED: Reply = ({"dropped": True}, [])  # nothing to answer: a participant's late reply
# What a connection holding /dev/liveupdate may ask: the device's ioctls (v7.3 and RFC v2). Under
# `luo run` that connection is the program's own fd, opened with the supervisor's credentials, and
# the program can write to it: it must not reach an update, the VMs or a KHO dump through it.
DEVICE_OPS = frozenset({"open_device", "close_device", "create_session", "retrieve_session", "preserve_fd",
                        "unpreserve_fd", "restore_fd", "get_state", "prepare", "freeze", "cancel", "finish"})
MAX_OP = 64  # characters of an op name; the longest is a third of that


def _at_eof(sock: socket.socket) -> bool:
    """Has the peer closed (nothing left to read but the end)? One non-blocking peek."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@dataclass
class Waiter:
    """A request answered when ``poll`` returns a reply (or ``on_timeout`` at ``deadline``)."""

    conn: Conn
    poll: Callable[[], Reply | None]
    deadline: float
    on_timeout: Callable[[], Reply]


@dataclass
class Conn:
    sock: socket.socket
    peer: Peer
    session: Any = None  # a core SessionHandle when this socket is a session fd
    on_close: Callable[[], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    link: Cursor = field(default_factory=lambda: Cursor(client_host.TABLE))  # what the connection is (control, ...)

    def __post_init__(self) -> None:
        if self.session is not None:  # luod made this connection as a session fd
            self.link.state = client_host.SESSION


class Host:
    def __init__(self, runtime: RuntimeDir, orch: Orchestrator, listener: socket.socket,
                 *, incoming_blob: bytes | None = None) -> None:
        self.runtime = runtime
        self.orch = orch
        self.listener = listener
        self.incoming_blob = incoming_blob
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.deferred_session_closes: list[Any] = []
        self.exit_after_step = False
        self.last_update: dict[str, Any] | None = None
        self.waiters: list[Waiter] = []
        self.extensions: list[Any] = []
        self.vms: Any = None  # the VmSupervisor, once installed
        self.pool: Any = None  # the memory pool (luo.pool.service.PoolService), when the host has one
        self.mirror: Any = None  # the Mirror into the fd store (luo.host.mirror), when there is one
        self.recovered: dict[str, Any] | None = None  # what a restart after a crash took back
        self.device: Conn | None = None  # the connection holding /dev/liveupdate (op open_device)
        self.recovered_sessions: dict[str, Any] = {}  # outgoing sessions held for their owners since
        self.after_start: list[Callable[[], None]] = []  # work that may wait until requests are served  # e.g. the VM supervisor: status() and ops
        self.ops: dict[str, tuple[Callable[[Conn, dict, list[int]], Reply], bool]] = {}
        self.session_ops: dict[str, tuple[Callable[[Conn, dict, list[int]], Reply], bool]] = {}
        from luo.host import ops

        ops.install(self)
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, None)

    # -- bookkeeping -------------------------------------------------------------------
    def pool_changed(self) -> None:
        """The pool's map changed: rewrite ``<runtime>/pool.dtb`` (for dtc, and for a restart
        after a crash). A host whose pool is not in its session yet (the takeover) skips it."""
        if self.pool is None:
            return
        from luo.pool.host import pool_fd_index

        try:
            index = pool_fd_index(self.orch)
        except LuoError:
            index = 0
        try:
            self.pool.save_dtb(self.runtime.root / "pool.dtb", index)
        except (OSError, LuoError) as e:
            log.warning("pool: cannot write %s: %s", self.runtime.root / "pool.dtb", e)

    def publish_state(self) -> None:
        self.runtime.write_state(self.orch.state.label)

    def close_released(self) -> None:
        for fd in self.orch.take_released_fds():
            try:
                os.close(fd)
            except OSError:
                pass

    def add_conn(self, sock: socket.socket, peer: Peer, **kw: Any) -> Conn:
        sock.setblocking(True)
        # a peer that never reads its replies must not block the host in send(): give up on the
        # reply after SEND_TIMEOUT (the request was handled; only its answer is lost)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        c = Conn(sock, peer, **kw)
        self.conns[sock.fileno()] = c
        self.sel.register(sock, selectors.EVENT_READ, c)
        return c

    def drop_conn(self, c: Conn) -> None:
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(c.sock.fileno(), None)
        c.sock.close()
        if not c.link.done:
            c.link.feed(client_host.EOF)
        if self.device is c:  # closing /dev/liveupdate's fd lets the next opener in
            self.device = None
        if c.session is not None:
            self.close_session(c.session)
        if c.on_close:
            c.on_close()

    def close_session(self, handle: Any) -> None:
        """A session fd was closed: unpreserve (outgoing) or finish (incoming), as in 6.19."""
        try:
            self.orch.close_session(handle)
        except LuoError as e:
            if e.errno == errno.EBUSY:
                log.info("session %s closed while %s; unpreserving after the update settles",
                         getattr(handle, "name", "?"), self.orch.state.label)
                self.deferred_session_closes.append(handle)
            elif e.errno not in (errno.ENOENT, errno.EINVAL, errno.EBADF):
                log.warning("closing session %s: %s", getattr(handle, "name", "?"), e)
        self.close_released()

    def settle(self) -> None:
        """Run what had to wait for NORMAL/UPDATED (session closes during an update)."""
        if self.orch.state in (State.NORMAL, State.UPDATED) and self.deferred_session_closes:
            pending, self.deferred_session_closes = self.deferred_session_closes, []
            for h in pending:
                self.close_session(h)
        self.publish_state()

    # -- the loop ----------------------------------------------------------------------
    def serve_forever(self) -> None:
        self.publish_state()
        self.runtime.write_pid(os.getpid())
        log.info("luod %d serving %s in state %s", os.getpid(), self.runtime.socket, self.orch.state.label)
        idle_work = list(self.after_start)
        self.mirror_now()
        while not self.exit_after_step:
            timeout = 0.0 if idle_work else None
            if self.waiters:
                until = max(0.0, min(w.deadline for w in self.waiters) - time.monotonic())
                timeout = until if timeout is None else min(timeout, until)
            for key, _ in self.closes_first(self.sel.select(timeout=timeout)):
                if key.data is None:
                    self.accept()
                else:
                    self.step(key.data)
                if self.exit_after_step:
                    break
            self.run_waiters()
            self.mirror_now()  # a session closed with its connection changes what is preserved
            if idle_work:
                idle_work.pop(0)()

    @staticmethod
    def closes_first(ready: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
        """Connections that ended go before requests that arrived with them.

        A kernel session fd is released when close() returns. Here the client's close reaches
        luod as EOF, and the EOF of a session luod has just handed out becomes ready only when
        luod closes its own copy after sending it, which can be after the client already closed
        it and sent its next request: "close a session, create it again" would then find the old
        one (EEXIST). Handling every EOF of a batch first keeps the kernel's order."""
        if len(ready) < 2:
            return ready
        return sorted(ready, key=lambda kv: 0 if kv[0].data is not None and _at_eof(kv[0].data.sock) else 1)

    def defer(self, conn: Conn, poll: Callable[[], Reply | None], timeout: float,
              on_timeout: Callable[[], Reply]) -> Reply:
        w = Waiter(conn, poll, time.monotonic() + timeout, on_timeout)
        got = poll()
        if got is not None:
            return got
        self.waiters.append(w)
        return DEFERRED

    def run_waiters(self) -> None:
        now = time.monotonic()
        still: list[Waiter] = []
        for w in self.waiters:
            if w.conn.sock.fileno() < 0:
                continue
            got = w.poll()
            if got is None and now >= w.deadline:
                got = w.on_timeout()
            if got is None:
                still.append(w)
            else:
                self.reply(w.conn, *got)
        self.waiters = still

    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE/ENFILE: out of fds. Refuse this one, keep everything else
            log.error("cannot accept a connection: %s", e.strerror)
            return
        self.add_conn(sock, Peer.of(sock))

    def step(self, c: Conn) -> None:
        """Read one request and answer it. Nothing a peer sends may end the loop: the preserved
        state lives in this process, so a malformed request is refused, and a bug that a request
        runs into is answered with EIO."""
        try:
            got = recv_msg(c.sock)
        except LuoError as e:
            self.reply(c, error_reply(e), [])
            return
        except OSError:
            got = None
        except Exception as e:  # recv_msg raises only the two above; if it ever did not, refuse
            log.exception("reading a request failed")
            self.reply(c, error_reply(LuoError(errno.EIO, f"internal error reading the request: {e!r}")), [])
            return
        if got is None:
            self.drop_conn(c)
            return
        msg, fds = got
        try:
            reply, out_fds = self.dispatch(c, msg, fds)
        except LuoError as e:
            reply, out_fds = error_reply(e), []
        except Exception as e:  # a bug must not take the preserved state down with it
            log.exception("request %.80r failed", msg.get("op"))
            reply, out_fds = error_reply(LuoError(errno.EIO, f"internal error: {e!r}")), []
        finally:
            for fd in fds:  # the ops dup what they keep
                try:
                    os.close(fd)
                except OSError:
                    pass
        if reply is DROPPED[0]:
            return
        if reply is not DEFERRED[0]:
            try:
                self.reply(c, reply, out_fds)
            except Exception as e:  # a reply that cannot be encoded: say so rather than stop serving
                log.exception("answering %.80r failed", msg.get("op"))
                self.reply(c, error_reply(LuoError(errno.EIO, f"internal error answering: {e!r}")), [])
        self.close_released()

    def mirror_now(self) -> None:
        """Bring the fd store up to date before anyone is told a change happened."""
        if self.mirror is not None:
            self.mirror.sync(self.orch)

    def reply(self, c: Conn, reply: dict[str, Any], fds: list[int]) -> None:
        self.mirror_now()
        try:
            send_msg(c.sock, reply, fds, large=True)  # a status of thousands of sessions is ~1 MB
        except OSError:
            pass
        finally:
            for fd in fds:
                os.close(fd)

    def dispatch(self, c: Conn, msg: dict[str, Any], fds: list[int]) -> Reply:
        """Find and run the op. Each op checks its own fields (luo.host.fields) and fds."""
        op = msg.get("op")
        event = client_host.event_for(c.link.state, op, msg.get("reply") is True, DEVICE_OPS)
        row = client_host.TABLE.step(c.link.state, event)  # what this connection may ask (EPROTO if nothing)
        if row.action == "drop":  # a late answer to a request the host stopped waiting for
            return DROPPED
        if not isinstance(op, str) or len(op) > MAX_OP:
            raise fields.refuse("op", f"must be the name of an operation (a string of at most {MAX_OP} "
                                f"characters), not {fields.show(op)}")
        if row.action == "deny":
            raise LuoError(errno.EPERM, f"{op!r} is not a /dev/liveupdate operation: a connection that holds the "
                           "device (a program's fd under `luo run`) may only do what its ioctls do")
        table = self.session_ops if c.session is not None else self.ops
        entry = table.get(op)
        if entry is None:
            raise LuoError(errno.ENOTTY, f"unknown operation {op!r}")
        fn, privileged = entry
        if privileged and not c.peer.privileged:
            raise LuoError(errno.EPERM, f"uid {c.peer.uid} may not {op}: only root or the host's user may")
        got = fn(c, msg, fds)
        c.link.feed(event)  # done: the connection is what the row says (a refused op raised, nothing moved)
        return got

