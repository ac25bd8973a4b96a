"""The successor VMM: warmed at prepare, it takes the guest over after the host's handover.

Timeline inside the blackout (the host's handover is over before it starts): ``saved`` (the old
VMM paused and wrote the record) -> restore the vCPU and device state into the VM built at
prepare -> ``go`` (sent right behind ``saved``: the ownership passes) -> resume. Retrieving the
VM's session from the new host, checking it holds the very memfds we mapped, re-preserving and
registering happen after the guest runs again.

The outgoing VMM may be another installation: ``warm`` carries its VMM channel protocol, checked
(luo.abi) before anything is built, and the reply carries ours, which it checks in turn.

What may come when, and what each message, EOF or failure means (whose the guest is), is the
successor's table in ``luo.protocol.vmm_successor``: this loop only reads, does the long steps and
runs the action of the row each event leads to.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import select
import signal
import socket
import time
from typing import Any

from luo import abi
from luo.errors import LuoError
from luo.host import faults
from luo.host.procname import GUEST_SESSION_NICE, favour_this_thread, leave_background
from luo.host.runtime import RuntimeDir, write_atomic
from luo.host.spans import span, spans_of
from luo.host.watchdog import deadline
from luo.host.wire import recv_msg, send_msg
from luo.protocol import vmm_successor as vs
from luo.protocol.table import Cursor
from luo.vmm.devices.console_sink import FileConsoleSink
from luo.vmm.live.guest_state import write_guest_state
from luo.vmm.live.host_link import HostLink
from luo.vmm.live.outgoing import RunningVmm
from luo.vmm.live.statefile import read_state
from luo.vmm.vm import Vm

log = logging.getLogger("luo.vmm")


def _guest_clock_minus_mono(vm: Vm) -> int | None:
    """The guest's kvmclock minus CLOCK_MONOTONIC, both now: kvmclock runs at the host's rate, so
    this maps any time of the update's timeline to the guest's clock (and its stall lines' at_ns)."""
    try:
        _version, raw = vm.clock.save()
        mono = time.monotonic_ns()
        return int.from_bytes(raw[:8], "little") - mono
    except Exception:  # accounting only
        return None


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _adopt_session(link: HostLink, name: str, ram_fd: int, state_fd: int, report: dict[str, Any]) -> None:
    """Retrieve the VM's session from the new host, check it holds our memfds, and preserve anew.

    This runs after the resume: the new host's confirmation already guarantees the session
    exists, so retrieving it only verifies and re-arms, and stays out of the blackout.
    """
    t0 = time.monotonic_ns()
    try:
        ram2, state2 = link.take_incoming()
    except LuoError as e:
        log.error("vm %s: cannot retrieve the VM's session from the new host: %s", name, e)
        report["session_error"] = str(e)
    else:
        same = (ram2 < 0 or _same_file(ram2, ram_fd)) and _same_file(state2, state_fd)
        if ram2 >= 0:
            os.close(ram2)
        os.close(state2)
        try:
            faults.point("vmm-successor", "finish")
        except LuoError as e:
            report["session_error"] = str(e)
        if not same:
            log.error("vm %s: the new host's session holds other memfds than the ones handed to us", name)
            report["session_error"] = "the session held other memfds"
        link.finish_incoming()
    try:
        link.preserve(ram_fd, state_fd)
    except LuoError as e:  # the guest runs; it is only unprotected until the next host or retry
        log.error("vm %s: cannot preserve the guest's memory with the new host: %s", name, e)
        report["session_error"] = str(e)
    report["after_resume_ms"] = {"retrieve_and_preserve": _ms(time.monotonic_ns() - t0)}


class Predecessor:
    """The VMM we take the guest from, watched through a pidfd (its pid cannot be reused under us).

    It owns the guest until it sends ``go``; the one exception is its death after ``saved``: the
    guest's whole state is then in the preserved state memfd and no process can run it but us.
    """

    def __init__(self, pid: object) -> None:
        self.pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else 0
        self.pidfd: int | None = None
        if self.pid:
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except OSError:
                self.pidfd = None

    def died(self, timeout: float = 2.0) -> bool:
        """True once it is dead. Its channel reaches EOF when its fds close, a moment before it is
        reaped, hence the short wait; a predecessor that is still alive is dropping us."""
        if self.pidfd is None:
            return False
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _cancelled() -> None:
    """The fault point of an abort: whatever happens here, the predecessor keeps the guest."""
    try:
        faults.point("vmm-successor", "cancel")
    except LuoError:
        pass


def _recv(ch: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message from the predecessor; a malformed one or a broken channel count as EOF."""
    try:
        got = recv_msg(ch)
    except (LuoError, OSError):
        return None
    if got is not None:
        for fd in got[1]:
            os.close(fd)
    return got


def _next(end: Cursor, ch: socket.socket, predecessor: Predecessor) -> tuple[str, dict[str, Any]]:
    """Read the predecessor's next message and feed it to ``end``: the row's action, and the message.

    An EOF is its death only when the pidfd says so, and it is asked only where that changes the
    row (``eof_needs_pidfd``): elsewhere an EOF costs no wait."""
    got = _recv(ch)
    if got is None:
        dead = vs.eof_needs_pidfd(end.state) and predecessor.died()
        event = vs.EOF_PREDECESSOR_DEAD if dead else vs.EOF
    else:
        event = vs.successor_event(got[0])
    action, broke = vs.take(end, event)
    if broke is not None:
        log.warning("%s", broke)
    return action, got[0] if got else {}


def _build_machine(runtime: RuntimeDir, name: str, mem: int, cpus: int, ram_fd: int, info: dict[str, Any]) -> Vm:
    """The machine the guest moves into, built while it still runs elsewhere: our KVM VM, or (a VM
    whose ``info`` says ``vmm: qemu``) a QEMU waiting for the device state (luo.qemu.machine). The
    QEMU binary is this installation's (``LUO_QEMU``, set by ``luo vmm successor --qemu``), or the
    one the VM ran on."""
    if info.get("vmm") == "qemu":
        from luo.qemu.machine import QemuConfig, QemuMachine, choose_mode

        config = QemuConfig.from_info(info, os.environ.get("LUO_QEMU") or None)
        mode = choose_mode(info, config.qemu)
        extents = pool_extents(info)
        if extents is not None and len(extents) != 1:
            raise LuoError(errno.EINVAL, "a QEMU VM's RAM in the pool must be one extent")
        vm = QemuMachine.incoming(name, mem, cpus, ram_fd, runtime.vm_dir(name), config, mode,
                                  extents[0][0] if extents else None)
        # what this VMM registers with, after the switch (cpr: whether its QEMU can send cpr-transfer)
        info.update(qemu=config.qemu, qemu_pid=vm.proc.pid, cpr=config.cpr, mode=mode)
        if faults.enabled("qemu-successor-dies"):  # its QEMU gone before the migration: the switch must fall back
            os.kill(vm.proc.pid, signal.SIGKILL)
        return vm  # type: ignore[return-value]
    return Vm.create(name, mem, cpus, memfd=ram_fd, console=FileConsoleSink(str(runtime.vm_dir(name) / "console.log")),
                     extents=pool_extents(info))


def pool_extents(info: dict[str, Any]) -> list[tuple[int, int]] | None:
    """The guest RAM's extents of the host's memory pool, from the VM's info (None: its own memfd).
    Checked here for shape; GuestMemory checks them against the memfd (EINVAL)."""
    raw = info.get("pool")
    if raw is None:
        return None
    if not (isinstance(raw, list) and 0 < len(raw) <= 4096 and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                        for x in p) for p in raw)):
        raise LuoError(errno.EINVAL, "the VM's pool extents must be a list of [offset, length] pairs")
    return [(p[0], p[1]) for p in raw]


def run_successor_vmm(runtime: RuntimeDir, name: str, channel_fd: int) -> int:
    """The successor's end of the channel (``luo.protocol.vmm_successor.SUCCESSOR``): each step
    reads or does one thing, feeds what happened to the table, and runs the row's action."""
    ch = socket.socket(fileno=channel_fd)
    end = Cursor(vs.SUCCESSOR)
    try:
        got = recv_msg(ch)
    except (LuoError, OSError):
        got, event = None, vs.PROTOCOL_ERROR
    else:
        event = vs.EOF if got is None else vs.successor_event(got[0])
    msg, fds = got if got is not None else ({}, [])
    action, broke = vs.take(end, event)
    if action == vs.A_QUIT:  # anything but warm: nothing to build, nobody to answer
        if broke is not None:
            log.error("%s", broke)
        for fd in fds:
            os.close(fd)
        return 1
    if action != vs.A_BUILD:
        raise vs.unhandled(end, action)

    ours = abi.announce(abi.VMM_CHANNEL_PROTOCOL, abi.VMM_CHANNEL_OLDEST)
    refusal: dict[str, Any] | None = None  # the error reply, if the build fails
    vm: Vm | None = None
    ram_fd = state_fd = -1
    info: dict[str, Any] = {}
    predecessor = Predecessor(0)
    t0 = time.perf_counter()
    warm_start = time.monotonic_ns()
    try:
        abi.negotiate("VMM channel protocol", (abi.VMM_CHANNEL_PROTOCOL, abi.VMM_CHANNEL_OLDEST), abi.announced(msg),
                      f"VMM pid {str(msg.get('pid'))[:20]}", "this successor VMM")
    except LuoError as e:  # before anything is built: the update's prepare fails, the guest runs on
        for fd in fds:
            os.close(fd)
        refusal = {"errno": e.errno, "error": e.message, **ours}
    if refusal is None and len(fds) != 2:
        for fd in fds:
            os.close(fd)
        refusal = {"errno": errno.EINVAL, "error": f"warm needs the RAM and state memfds, got {len(fds)} fds"}
    if refusal is None:
        ram_fd, state_fd = fds
        got_info = msg.get("info", {})
        info = got_info if isinstance(got_info, dict) else {}
        predecessor = Predecessor(msg.get("pid"))  # alive: it waits for our reply
        try:
            if faults.enabled("vmm-successor-fail-warm"):
                raise LuoError(errno.ENOMEM, "cannot build the VM (fault injected)")
            mem, cpus = msg.get("mem"), msg.get("cpus")
            if not (isinstance(mem, int) and 0 < mem <= os.fstat(ram_fd).st_size and isinstance(cpus, int)
                    and 1 <= cpus <= 64):
                raise LuoError(errno.EINVAL, f"warm: mem {mem!r} must fit the RAM memfd and cpus {cpus!r} be 1..64")
            vm = _build_machine(runtime, name, mem, cpus, ram_fd, info)
        except LuoError as e:
            refusal = {"errno": e.errno, "error": e.message}
    if vm is not None:
        leave_background(GUEST_SESSION_NICE)  # warm: back to normal, the vCPU threads Vm.create started too
        favour_this_thread()
        try:
            faults.point("vmm-successor", "prepare")
        except LuoError as e:
            refusal = {"errno": e.errno, "error": e.message}
    action = end.feed(vs.BUILD_FAILED if refusal is not None else vs.BUILT)
    if action == vs.A_REPLY_ERROR:
        assert refusal is not None
        send_msg(ch, refusal)
        if vm is not None:
            vm.stop()
        predecessor.close()
        return 1
    if action != vs.A_REPLY_WARM or vm is None:
        raise vs.unhandled(end, action)
    link = HostLink(runtime, name, ram_in_pool=info.get("pool") is not None)
    send_msg(ch, {"op": "warm", "errno": 0, "pid": os.getpid(), **ours,
                  "timings_ms": {"create": round((time.perf_counter() - t0) * 1000, 3)},
                  **({"qemu_mode": info["mode"]} if info.get("vmm") == "qemu" else {})})
    warm_end = time.monotonic_ns()

    gc.collect()
    gc.disable()  # no collection pause until the guest runs again
    action, saved = _next(end, ch, predecessor)
    if action == vs.A_STOP:
        _cancelled()
        vm.stop()  # the guest never left its VMM (or its state died with it): not ours
        return 0
    if action != vs.A_RESTORE:
        raise vs.unhandled(end, action)
    t_saved = time.monotonic_ns()
    try:
        faults.point("vmm-successor", "freeze")  # between the predecessor's save and our restore
        record, paused_at = read_state(state_fd)
        if faults.enabled("vmm-successor-stall-restore"):
            write_atomic(runtime.vm_dir(name) / "successor.stalled", f"{os.getpid()}\n")
            recv_msg(ch)  # until killed
            return 3
        vm.restore(record)
    except LuoError as e:
        action = end.feed(vs.RESTORE_FAILED)
        if action != vs.A_FAIL:
            raise vs.unhandled(end, action) from e
        log.error("vm %s: cannot restore the guest: %s; leaving it to the previous VMM", name, e)
        vm.stop()
        return 1
    end.feed(vs.RESTORE_DONE)
    t_restored = time.monotonic_ns()

    action, _ = _next(end, ch, predecessor)
    if action == vs.A_STOP:
        _cancelled()
        vm.stop()  # aborted, or the predecessor dropped us: the guest stays there
        return 0
    if action not in (vs.A_RESUME, vs.A_TAKE_OVER):
        raise vs.unhandled(end, action)
    orphaned = action == vs.A_TAKE_OVER
    try:
        faults.point("vmm-successor", "handover")
    except LuoError as e:  # the predecessor still waits for "resumed": without it, it resumes the guest
        action = end.feed(vs.RESUME_FAILED)
        if action != vs.A_FAIL:
            raise vs.unhandled(end, action) from e
        log.error("vm %s: cannot resume the guest: %s", name, e)
        vm.stop()
        return 1
    t_go = time.monotonic_ns()
    vm.start()  # "go": the new host confirmed it holds the session; orphaned: nobody else can run it
    t_resumed = time.monotonic_ns()
    action = end.feed(vs.RESUME_DONE)
    if action == vs.A_REPORT_ORPHANED:
        log.warning("vm %s: the previous VMM (pid %d) died after saving the guest; this VMM resumed it",
                    name, predecessor.pid)
    elif action == vs.A_SEND_RESUMED:
        try:
            send_msg(ch, {"op": "resumed"})
        except OSError:
            pass
    else:
        raise vs.unhandled(end, action)
    write_guest_state(runtime, name, "running",
                      "taken over: its VMM died after saving it" if orphaned else "resumed after a live update")
    clock_offset = _guest_clock_minus_mono(vm)  # after the resume: off the blackout's path
    entered = vm.entered(1.0)  # when each vCPU thread really went on into KVM_RUN (0: not within 1 s)
    ch.close()
    predecessor.close()
    gc.enable()

    got_parts = saved.get("parts_ms")
    parts = {str(k): float(v) for k, v in got_parts.items() if isinstance(v, (int, float))} \
        if isinstance(got_parts, dict) and len(got_parts) <= 16 else {}
    # restore overlaps the host handover; "handover" is the part of the gap not spent restoring
    saved_at = saved.get("saved_at")
    if not isinstance(saved_at, int) or isinstance(saved_at, bool) or not 0 < saved_at <= t_saved:
        saved_at = t_saved  # accounting only: a bad value never stops the guest
    parts["handover"] = _ms(t_go - saved_at - (t_restored - t_saved))
    parts["restore"] = _ms(t_restored - t_saved)
    parts["resume"] = _ms(t_resumed - t_go)
    if entered and all(entered):  # after the blackout as the VMM counts it: the threads' own way back
        parts["enter"] = _ms(max(entered) - t_resumed)
    lane = f"vmm-successor:{name}"
    own = [span(lane, os.getpid(), phase, a, b)
           for phase, a, b in (("warm", warm_start, warm_end), ("restore", t_saved, t_restored),
                               ("wait_go", t_restored, t_go), ("resume", t_go, t_resumed),
                               *((f"enter_vcpu{i}", t_resumed, e) for i, e in enumerate(entered) if e >= t_resumed))]
    report = {"blackout_ms": _ms(t_resumed - paused_at), "parts_ms": parts, "blackout_ns": [paused_at, t_resumed],
              "timeline": [*spans_of(saved.get("timeline"), f"vmm:{name}"), *own],
              "pid": os.getpid(), "vm_timings_ms": {k: round(v, 3) for k, v in vm.timings.items()}}
    if clock_offset is not None:  # places the guest's own stall lines (at_ns) on this timeline
        report["guest_clock_minus_mono_ns"] = clock_offset
    report["vcpu_entered_ns"] = entered
    migration = getattr(vm, "last_migration", None)
    if migration:  # a QEMU VM: what moved, and the blackout as QEMU's own STOP and RESUME events date it
        report["migration"] = migration
        resumed_wall = vm.resume_wall_ns()  # type: ignore[attr-defined]
        if isinstance(migration.get("stop_wall_ns"), int) and resumed_wall:
            report["qmp_blackout_ms"] = _ms(resumed_wall - migration["stop_wall_ns"])
    log.info("vm %s resumed by successor VMM %d: blackout %.3f ms %s", name, os.getpid(), report["blackout_ms"], parts)
    if orphaned:  # the host never said who holds the session now: take whatever is left, preserve anew
        report["orphaned"] = True
        return RunningVmm(vm, link, state_fd, info).serve(report, reattach=True)
    try:
        with deadline(3 * faults.participant_timeout(60.0), "taking the VM's session over"):
            _adopt_session(link, name, ram_fd, state_fd, report)
    except LuoError as e:  # the guest runs; serve() preserves it anew if the host lost track of it
        log.error("vm %s: %s", name, e)
        report["session_error"] = str(e)
        return RunningVmm(vm, link, state_fd, info).serve(report, reattach=True)
    return RunningVmm(vm, link, state_fd, info).serve(report)
