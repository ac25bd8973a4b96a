"""The incoming side of an update: a new host process, warmed before the freeze.

It imports everything it will need after the handover while the workloads still run, answers
the compatibility check at prepare, and at the handover parses the tree, adopts every fd, and
confirms. Until the outgoing host acknowledges, nothing is served: the old host still owns
the update and may cancel it.
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
        self.host = make_host(self.runtime, orch, listener, incoming_blob=h.blob)
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
        send_msg(ch, {"op": "hello", "pid": os.getpid(), "compatibles": sorted(known), "protocol": protocol})
        while True:
            try:
                got = recv_msg(ch)
            except LuoError as e:
                send_msg(ch, error_reply(e))
                continue
            if got is None:
                return _orphaned(inc, predecessor)
            msg, fds = got
            op = msg.get("op")
            if op == "abort":
                try:
                    faults.point("successor", "cancel")
                except LuoError:
                    pass
                return 0
            if op == "handover" and msg.get("stage") == "prepare":
                try:
                    inc.prepare(ch, msg, fds)
                except LuoError as e:
                    inc.release()
                    gc.enable()
                    send_msg(ch, error_reply(e))
                else:
                    send_msg(ch, {"op": "checked"})
                continue
            if op == "handover":
                if msg.get("unchanged") and protocol < 3:  # what we announced we would not understand
                    send_msg(ch, error_reply(LuoError(errno.EPROTO, "an unchanged final tree needs protocol 3")))
                    inc.release()
                    return 2
                return _take_over(ch, msg, fds, inc, predecessor)
            for fd in fds:
                os.close(fd)
    except OSError:  # the channel broke under a send: the outgoing host is gone
        return _orphaned(inc, predecessor)


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


def _take_over(ch: socket.socket, msg: dict, fds: list[int], inc: Incoming, predecessor: Watched) -> int:
    t0 = time.perf_counter()
    n0 = time.monotonic_ns()
    try:
        size = msg.get("tree_size")
        if not msg.get("unchanged") and (len(fds) != 1 or not isinstance(size, int) or not 0 < size <= MAX_TREE):
            send_msg(ch, error_reply(LuoError(errno.EINVAL, "the final handover needs one tree memfd and a "
                                              f"tree_size of 1..{MAX_TREE} bytes")))
            inc.release()
            return 2
        blob = None if msg.get("unchanged") else read_blob(fds[0], size)
    finally:
        for fd in fds:
            os.close(fd)
    t_recv = time.perf_counter()
    n_recv = time.monotonic_ns()
    if faults.enabled("successor-stall-handover"):
        write_atomic(inc.runtime.root / "successor.stalled", f"{os.getpid()}\n")
        recv_msg(ch)  # waits until killed or the old host gives up
        return 3
    try:
        faults.point("successor", "handover")
        orch = inc.finalize(blob)
    except LuoError as e:
        log.error("successor %d refuses the handover: %s", os.getpid(), e)
        reply = error_reply(e)
        if blob is not None:  # keep what was refused for the operator (luo kho dump --file)
            kept = inc.runtime.updates / f"refused-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.dtb"
            kept.write_bytes(blob)
            reply["refused_tree"] = str(kept)
        send_msg(ch, reply)
        inc.release()
        return 2
    host = inc.host
    assert host is not None
    t_adopt = time.perf_counter()
    inc.spans += [("receive", n0, n_recv), ("adopt", n_recv, time.monotonic_ns())]
    timings = {"receive": round((t_recv - t0) * 1000, 3), "adopt": round((t_adopt - t_recv) * 1000, 3)}
    try:
        send_msg(ch, ok(op="confirm", liveupdate_number=orch.liveupdate_number, timings_ms=timings))
        got = recv_msg(ch)
    except (OSError, LuoError):
        got = None
    if got is not None and got[0].get("op") == "abort":
        log.warning("successor %d: the outgoing host cancelled after confirmation", os.getpid())
        return 4
    if got is None and not predecessor.died():
        log.error("successor %d: the outgoing host broke the channel but lives on; leaving it everything",
                  os.getpid())
        return 4
    phases = got[0].get("phases_ms", {}) if got is not None else {}
    old_phases = phases if isinstance(phases, dict) else {}
    if faults.enabled("successor-exit-after-confirm"):
        os._exit(9)
    # Become the service's main process before the old host exits (systemd would otherwise see
    # its main process die), then let the old host go.
    notify(f"MAINPID={os.getpid()}", f"STATUS=serving after live update #{orch.liveupdate_number}")
    try:
        send_msg(ch, {"op": "adopted"})
    except OSError:
        pass
    ch.close()
    timeline = [*spans_of(got[0].get("timeline") if got is not None else None, "host"),
                *(span("successor-host", os.getpid(), p, a, b) for p, a, b in inc.spans)]
    last: dict[str, Any] = {"liveupdate_number": orch.liveupdate_number, "successor_ms": timings,
                            "phases_ms": old_phases, "pid": os.getpid(), "time": time.time(), "timeline": timeline}
    if got is None:
        log.warning("successor %d: the outgoing host (pid %d) died after the final handover; taking over",
                    os.getpid(), predecessor.pid)
        last.update(orphaned=True, why=f"the outgoing host pid {predecessor.pid} died after the final handover")
    return _serve(inc, orch, last)


def _serve(inc: Incoming, orch: Orchestrator, last_update: dict[str, Any]) -> int:
    """Serve as the host of the runtime dir, in UPDATED, until the next update hands over."""
    host = inc.host
    assert host is not None
    set_process_name("luod")
    host.last_update = {"format": UPDATE_RECORD_FORMAT, **last_update}  # read by later versions: luo.abi
    host.after_start.append(gc.enable)
    host.after_start.append(lambda: write_atomic(
        inc.runtime.updates / f"{orch.liveupdate_number:06d}-host.json", json.dumps(host.last_update) + "\n"))
    host.serve_forever()
    from luo.host.main import exit_now

    return exit_now()
