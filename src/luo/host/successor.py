"""The incoming side of an update: a new host process, warmed before the freeze.

It imports everything it will need after the handover while the workloads still run, answers
the compatibility check at prepare, and at the handover parses the tree, adopts every fd, and
confirms. Until the outgoing host acknowledges, nothing is served: the old host still owns
the update and may cancel it.

What arrives when, and what each event does, is ``luo.protocol.host_successor.INCOMING`` (per
announced protocol: ``incoming``); ``SuccessorEnd`` feeds it and runs the action each row names.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from luo.abi import HANDOVER_PROTOCOL, UPDATE_RECORD_FORMAT
from luo.core.handover import LuoRecord
from luo.core.orchestrator import Orchestrator
from luo.errors import LuoError
from luo.host import faults
from luo.host.daemon import Host
from luo.host.handover import MAX_TREE, read_blob, recv_handover
from luo.host.mirror import Mirror
from luo.host.procname import favour_this_thread, leave_background, set_process_name
from luo.host.runtime import RuntimeDir, write_atomic
from luo.host.sdnotify import notify
from luo.host.setup import host_handlers, host_subsystems, known_compatibles, make_host, rebind_host
from luo.host.spans import span, spans_of
from luo.host.tree import tree_for
from luo.host.wire import error_reply, ok, recv_msg, send_msg
from luo.keeper.store import FdStore, open_store
from luo.kho import parse_tree, required_compatibles
from luo.pool.host import HUGEPAGES_FILE, pool_from_handover, take_over
from luo.protocol import host_successor as hs
from luo.protocol.host_successor import incoming
from luo.protocol.table import Cursor, ProtocolError

log = logging.getLogger("luod")


def _handlers() -> list:
    forgotten = set(faults.values("successor-forget"))
    return [h for h in host_handlers() if h.compatible not in forgotten]


def _check(blob: bytes, known: set[str], fd_count: int | None = None) -> Any:
    """Name what this version does not understand (even in a tree it could not parse), then parse."""
    unknown = sorted(required_compatibles(blob) - known)
    if unknown:
        raise LuoError(errno.EOPNOTSUPP,
                       f"this version does not understand {', '.join(unknown)} (knows {', '.join(sorted(known))})")
    record, _memory = parse_tree(blob, fd_count=fd_count)
    return record


def _warm(runtime: RuntimeDir) -> None:
    """Run once, while the workloads still run, every path the handover will take: imports,
    first-call caches, a throwaway host. Python's first call of anything costs milliseconds."""
    import luo.client.update  # noqa: F401
    import luo.host.update  # noqa: F401
    import luo.kho.dts  # noqa: F401
    dummy = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        blob = tree_for(LuoRecord(liveupdate_number=0))
        record = _check(blob, known_compatibles(_handlers()))
        orch = Orchestrator(handlers=_handlers(), incoming=record, incoming_fds=[])
        host = make_host(runtime, orch, dummy)
        host.sel.close()
    finally:
        dummy.close()


def _open_store(runtime: RuntimeDir) -> FdStore | None:
    try:
        return open_store(runtime.root)
    except LuoError as e:
        log.error("successor %d: no fd store (%s): preserved fds will not outlive a crash", os.getpid(), e)
        return None


def _same_shape(a: LuoRecord, b: LuoRecord) -> bool:
    """The final tree must name the same files at the same fd indices as the prepared one."""

    def shape(r: LuoRecord) -> list[tuple[str | None, int, str, int]]:
        files: list[tuple[str | None, int, str, int]] = [(None, f.token, f.compatible, f.fd_index) for f in r.files]
        for s in r.sessions:
            files += [(s.name, f.token, f.compatible, f.fd_index) for f in s.files]
        return files

    return shape(a) == shape(b)


class Incoming:
    """What the successor holds between the prepare-time handover and the final one."""

    def __init__(self, runtime: RuntimeDir, handlers: list, known: set[str]) -> None:
        self.runtime = runtime
        self.handlers = handlers
        self.known = known
        self.record: LuoRecord | None = None
        self.fds: list[int] = []
        self.host: Host | None = None
        self.prepared: tuple[Orchestrator, bytes]
        self.spans: list[tuple[str, int, int]] = []  # this host's phases (CLOCK_MONOTONIC ns)
        self.store = _open_store(runtime)  # connected now: the first write after the handover costs no connect

    def release(self) -> None:
        """Drop our copies; the outgoing host keeps its own, so nothing is released for real."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.host is not None:
            self.host.listener.close()
            pool = self.host.pool
            if pool is not None:  # our dup of the pool's memfd; a pool made here goes entirely
                pool.memory.close(give_back=pool.created_here)
                if pool.created_here:
                    (self.runtime.root / HUGEPAGES_FILE).unlink(missing_ok=True)
            self.host = None

    def prepare(self, ch: socket.socket, msg: dict, fds: list[int]) -> None:
        """Everything but the final tree arrives at prepare: check it and build the host now."""
        started = time.monotonic_ns()
        h = recv_handover(ch, msg, fds)
        self.release()
        try:
            faults.point("successor", "prepare")
        except LuoError:
            for fd in [*h.fds, h.listener]:
                os.close(fd)
            raise
        self.fds = h.fds
        listener = socket.socket(fileno=h.listener)
        try:
            self.record = _check(h.blob, self.known, fd_count=len(h.fds))
            orch = Orchestrator(handlers=self.handlers, incoming=self.record, incoming_fds=h.fds)
        except BaseException:
            listener.close()
            raise
        try:
            pool = pool_from_handover(h.blob, h.fds, self.runtime.root)  # the layout is checked here, before any freeze
        except BaseException:
            listener.close()
            raise
        self.host = make_host(self.runtime, orch, listener, incoming_blob=h.blob, pool=pool)
        if self.store is not None:
            self.host.mirror = Mirror(self.store, stale=h.store_keys)
        self.host.orch.take_released_fds()  # fds the record does not name: ours to drop with release()
        # Built now for the common case in which freeze changes nothing (the final tree then equals
        # this one), and in any case the first run of a Python path costs milliseconds.
        self.prepared = (self._build(h.blob), h.blob)
        gc.collect()
        gc.disable()  # no collection pause between here and serving (re-enabled after the handover)
        self.spans.append(("check", started, time.monotonic_ns()))

    def _build(self, blob: bytes) -> Orchestrator:
        if self.host is None or self.record is None:
            raise LuoError(errno.EPROTO, "final handover without a prepared one")
        record = _check(blob, self.known, fd_count=len(self.fds))
        if not _same_shape(record, self.record):
            raise LuoError(errno.EPROTO, "the final tree names other files than the prepared one")
        return Orchestrator(handlers=self.handlers, subsystems=host_subsystems(self.runtime), incoming=record,
                            incoming_fds=self.fds)

    def finalize(self, blob: bytes | None) -> Orchestrator:
        if blob is None:
            orch, blob = self.prepared
        else:
            orch = self._build(blob)
        assert self.host is not None
        rebind_host(self.host, orch, blob)
        return orch


def run_successor(channel_fd: int, runtime: RuntimeDir) -> int:
    set_process_name("luod-next")
    from luo.host.main import raise_fd_limit

    raise_fd_limit()
    ch = socket.socket(fileno=channel_fd)
    _warm(runtime)
    leave_background()  # after the heavy start-up, which must not starve the guests' vCPUs
    favour_this_thread()
    handlers = _handlers()
    known = known_compatibles(handlers)
    inc = Incoming(runtime, handlers, known)
    announced = faults.values("successor-protocol")
    protocol = int(announced[0]) if announced else HANDOVER_PROTOCOL
    predecessor = Watched(runtime.read_pid() or os.getppid())  # the host that started us
    try:
        return SuccessorEnd(ch, inc, predecessor, protocol).run()
    finally:  # did not serve (serving ends in exit_now): what was built for the update goes
        inc.release()


@dataclass
class Got:
    """An event's payload for the row's action: the message and its fds, or what went wrong."""

    msg: dict[str, Any] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)
    error: LuoError | None = None  # a malformed message, a refused one, or the failed step's error
    blob: bytes | None = None  # the final tree that was refused (kept for the operator)


class SuccessorEnd:
    """The successor's end of the channel: each event goes to ``incoming(protocol)`` and the row's
    action runs (``_ACTIONS``). An action returns the process's exit status, or None to read the
    next message; a long step feeds its own outcome (``ok``/``failed``). A send that fails is the
    ``eof`` event in the state the row led to: the outgoing host is gone."""

    def __init__(self, ch: socket.socket, inc: Incoming, predecessor: Watched, protocol: int) -> None:
        self.ch = ch
        self.inc = inc
        self.predecessor = predecessor
        self.protocol = protocol
        self.cursor = Cursor(incoming(protocol))
        self.orch: Orchestrator | None = None  # the adopted one, from adopting on
        self.timings: dict[str, float] = {}

    def run(self) -> int:
        code = self.feed(hs.WARMED, Got())
        while code is None:
            code = self.feed(*self.receive())
        return code

    def receive(self) -> tuple[str, Got]:
        try:
            got = recv_msg(self.ch)
        except LuoError as e:
            return hs.MALFORMED, Got(error=e)
        except OSError:
            return hs.EOF, Got()
        if got is None:
            return hs.EOF, Got()
        msg, fds = got
        return hs.successor_event(msg), Got(msg, fds)

    def feed(self, event: str, got: Got) -> int | None:
        state = self.cursor.state
        try:
            action = self.cursor.feed(event)
        except ProtocolError:
            if event in hs.LOCAL:
                raise  # a hole in the table, not the peer's doing
            action = hs.on_refused(state, event)
            got.error = hs.refusal(self.cursor.table, state, event)
        try:
            return _ACTIONS[action](self, got)
        except OSError:
            if event == hs.EOF or self.cursor.done:
                raise
            return self.feed(hs.EOF, Got())

    # -- the actions the rows name ---------------------------------------------------------------

    def say_hello(self, got: Got) -> int | None:
        send_msg(self.ch, {"op": hs.HELLO, "pid": os.getpid(), "compatibles": sorted(self.inc.known),
                           "protocol": self.protocol})
        return None

    def check_prepared(self, got: Got) -> int | None:
        try:
            self.inc.prepare(self.ch, got.msg, got.fds)
        except LuoError as e:
            return self.feed(hs.FAILED, Got(error=e))
        return self.feed(hs.OK, Got())

    def send_checked(self, got: Got) -> int | None:
        send_msg(self.ch, {"op": hs.CHECKED})
        return None

    def refuse_prepared(self, got: Got) -> int | None:
        self.inc.release()
        gc.enable()
        assert got.error is not None
        send_msg(self.ch, error_reply(got.error))
        return None

    def reply_error(self, got: Got) -> int | None:
        for fd in got.fds:
            os.close(fd)
        assert got.error is not None
        if isinstance(got.error, ProtocolError):
            log.warning("successor %d: %s", os.getpid(), got.error.message)
        send_msg(self.ch, error_reply(got.error))
        return None

    def ignore(self, got: Got) -> int | None:
        for fd in got.fds:
            os.close(fd)
        if got.error is not None:
            log.warning("successor %d ignores: %s", os.getpid(), got.error.message)
        return None

    def exit_cancelled(self, got: Got) -> int | None:
        try:
            faults.point("successor", "cancel")
        except LuoError:
            pass
        return 0

    def leave(self, got: Got) -> int | None:
        log.info("successor %d: the outgoing host went away before the handover", os.getpid())
        self.inc.release()
        return 1

    def orphaned(self, got: Got) -> int | None:
        return _orphaned(self.inc, self.predecessor)

    def adopt_final(self, got: Got) -> int | None:
        return self._adopt(got, unchanged=False)

    def adopt_prepared(self, got: Got) -> int | None:
        return self._adopt(got, unchanged=True)

    def _adopt(self, got: Got, unchanged: bool) -> int | None:
        """The final handover: the final tree (or, unchanged, the prepared one) replaces the
        orchestrator, every fd adopted; the outcome is fed (``ok``: confirm, ``failed``: refuse)."""
        t0 = time.perf_counter()
        n0 = time.monotonic_ns()
        bad: LuoError | None = None
        blob: bytes | None = None
        try:
            size = got.msg.get("tree_size")
            if not unchanged and (len(got.fds) != 1 or not isinstance(size, int) or not 0 < size <= MAX_TREE):
                bad = LuoError(errno.EINVAL, "the final handover needs one tree memfd and a "
                               f"tree_size of 1..{MAX_TREE} bytes")
            elif not unchanged:
                assert isinstance(size, int)
                blob = read_blob(got.fds[0], size)
        finally:
            for fd in got.fds:
                os.close(fd)
        if bad is not None:
            return self.feed(hs.FAILED, Got(error=bad))
        t_recv = time.perf_counter()
        n_recv = time.monotonic_ns()
        if faults.enabled("successor-stall-handover"):
            write_atomic(self.inc.runtime.root / "successor.stalled", f"{os.getpid()}\n")
            recv_msg(self.ch)  # waits until killed or the old host gives up
            return 3
        try:
            faults.point("successor", "handover")
            self.orch = self.inc.finalize(blob)
        except LuoError as e:
            log.error("successor %d refuses the handover: %s", os.getpid(), e)
            return self.feed(hs.FAILED, Got(error=e, blob=blob))
        t_adopt = time.perf_counter()
        self.inc.spans += [("receive", n0, n_recv), ("adopt", n_recv, time.monotonic_ns())]
        self.timings = {"receive": round((t_recv - t0) * 1000, 3), "adopt": round((t_adopt - t_recv) * 1000, 3)}
        return self.feed(hs.OK, Got())

    def send_confirm(self, got: Got) -> int | None:
        assert self.orch is not None
        send_msg(self.ch, ok(op=hs.CONFIRM, liveupdate_number=self.orch.liveupdate_number, timings_ms=self.timings))
        return None

    def refuse_final(self, got: Got) -> int | None:
        for fd in got.fds:
            os.close(fd)
        assert got.error is not None
        if isinstance(got.error, ProtocolError):
            log.error("successor %d refuses the handover: %s", os.getpid(), got.error.message)
        reply = error_reply(got.error)
        if got.blob is not None:  # keep what was refused for the operator (luo kho dump --file)
            kept = self.inc.runtime.updates / f"refused-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.dtb"
            kept.write_bytes(got.blob)
            reply["refused_tree"] = str(kept)
        send_msg(self.ch, reply)
        self.inc.release()
        return 2

    def exit_cancelled_after_confirm(self, got: Got) -> int | None:
        log.warning("successor %d: the outgoing host cancelled after confirmation", os.getpid())
        return 4

    def orphaned_after_confirm(self, got: Got) -> int | None:
        for fd in got.fds:
            os.close(fd)
        if not self.predecessor.died():
            log.error("successor %d: the outgoing host broke the channel but lives on; leaving it everything",
                      os.getpid())
            return 4
        return self._serve_adopted(None)

    def take_over(self, got: Got) -> int | None:
        for fd in got.fds:
            os.close(fd)
        return self._serve_adopted(got.msg)

    def _serve_adopted(self, ack: dict[str, Any] | None) -> int:
        """Acknowledged (``ack``), or the outgoing host died after our confirm (None): serve."""
        orch = self.orch
        assert orch is not None
        phases = ack.get("phases_ms", {}) if ack is not None else {}
        old_phases = phases if isinstance(phases, dict) else {}
        if faults.enabled("successor-exit-after-confirm"):
            os._exit(9)
        # Become the service's main process before the old host exits (systemd would otherwise see
        # its main process die), then let the old host go.
        notify(f"MAINPID={os.getpid()}", f"STATUS=serving after live update #{orch.liveupdate_number}")
        try:
            send_msg(self.ch, {"op": hs.ADOPTED})
        except OSError:
            pass
        self.ch.close()
        timeline = [*spans_of(ack.get("timeline") if ack is not None else None, "host"),
                    *(span("successor-host", os.getpid(), p, a, b) for p, a, b in self.inc.spans)]
        last: dict[str, Any] = {"liveupdate_number": orch.liveupdate_number, "successor_ms": self.timings,
                                "phases_ms": old_phases, "pid": os.getpid(), "time": time.time(),
                                "timeline": timeline}
        if ack is None:
            log.warning("successor %d: the outgoing host (pid %d) died after the final handover; taking over",
                        os.getpid(), self.predecessor.pid)
            last.update(orphaned=True,
                        why=f"the outgoing host pid {self.predecessor.pid} died after the final handover")
        return _serve(self.inc, orch, last)


_ACTIONS: dict[str, Callable[[SuccessorEnd, Got], int | None]] = {
    hs.A_SAY_HELLO: SuccessorEnd.say_hello,
    hs.A_CHECK_PREPARED: SuccessorEnd.check_prepared,
    hs.A_SEND_CHECKED: SuccessorEnd.send_checked,
    hs.A_REFUSE_PREPARED: SuccessorEnd.refuse_prepared,
    hs.A_REPLY_ERROR: SuccessorEnd.reply_error,
    hs.A_IGNORE: SuccessorEnd.ignore,
    hs.A_EXIT_CANCELLED: SuccessorEnd.exit_cancelled,
    hs.A_LEAVE: SuccessorEnd.leave,
    hs.A_ORPHANED: SuccessorEnd.orphaned,
    hs.A_ADOPT_FINAL: SuccessorEnd.adopt_final,
    hs.A_ADOPT_PREPARED: SuccessorEnd.adopt_prepared,
    hs.A_SEND_CONFIRM: SuccessorEnd.send_confirm,
    hs.A_REFUSE_FINAL: SuccessorEnd.refuse_final,
    hs.A_TAKE_OVER: SuccessorEnd.take_over,
    hs.A_EXIT_CANCELLED_AFTER_CONFIRM: SuccessorEnd.exit_cancelled_after_confirm,
    hs.A_ORPHANED_AFTER_CONFIRM: SuccessorEnd.orphaned_after_confirm,
}
"""Every action of the incoming tables (and of ``on_refused``), as the method that runs it."""


class Watched:
    """A process watched through a pidfd, so that its death is a fact, not a guess from an EOF."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid or 0
        try:
            self.pidfd: int | None = os.pidfd_open(self.pid) if self.pid else None
        except OSError:
            self.pidfd = None  # already gone

    def died(self, timeout: float = 2.0) -> bool:
        """True once it is dead; its sockets reach EOF a moment before it is reaped."""
        if self.pidfd is None:
            return True  # pidfd_open failed: it was gone already
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        return bool(ready)


def _orphaned(inc: Incoming, predecessor: Watched) -> int:
    """The outgoing host died in the middle of the update (no abort came: it never cancelled).

    Before the prepare-time handover we hold nothing and leave: a restarted host recovers from
    the fd store. After it we hold the prepared tree, every fd and the listening socket, and
    preserving was refused since: take over in UPDATED from the prepared tree, as if the freeze
    had changed nothing. VMMs whose guest was paused resume it themselves (they never got
    ``handed_over``) and preserve it again with us.
    """
    if inc.host is None or not predecessor.died():
        log.info("successor %d: the outgoing host went away before the handover", os.getpid())
        inc.release()
        return 1
    log.warning("successor %d: the outgoing host (pid %d) died during the update; taking over from the "
                "prepared tree", os.getpid(), predecessor.pid)
    orch = inc.finalize(None)
    notify(f"MAINPID={os.getpid()}", f"STATUS=serving after an interrupted live update #{orch.liveupdate_number}")
    return _serve(inc, orch, {"liveupdate_number": orch.liveupdate_number, "orphaned": True,
                              "why": f"the outgoing host pid {predecessor.pid} died during the update",
                              "pid": os.getpid(), "time": time.time()})


def _serve(inc: Incoming, orch: Orchestrator, last_update: dict[str, Any]) -> int:
    """Serve as the host of the runtime dir, in UPDATED, until the next update hands over."""
    host = inc.host
    assert host is not None
    set_process_name("luod")
    host.last_update = {"format": UPDATE_RECORD_FORMAT, **last_update}  # read by later versions: luo.abi
    if host.pool is not None:
        try:
            take_over(orch, host.pool)
        except LuoError as e:  # the pool is ours and in use; only its next handover is at stake
            log.error("pool: cannot preserve the pool's memfd anew: %s", e)
        host.pool_changed()
    host.after_start.append(gc.enable)
    host.after_start.append(lambda: write_atomic(
        inc.runtime.updates / f"{orch.liveupdate_number:06d}-host.json", json.dumps(host.last_update) + "\n"))
    try:
        host.serve_forever()
    finally:
        if host.pool is not None and not host.orch.handed_over:
            from luo.pool.host import stop_pool

            stop_pool(inc.runtime.root, host.pool)
    from luo.host.main import exit_now

    return exit_now()
