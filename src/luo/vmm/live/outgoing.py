"""The running VMM: answers the host's prepare, freeze, cancel and handed_over.

prepare: hand RAM + state memfds to the successor the host started, and wait until it has built
its VM (everything expensive happens here, while the guest runs). The successor comes from the
update's new installation: both sides check the VMM channel protocol (luo.abi) at this warm-up and
refuse a peer they cannot speak to, so the update's prepare fails before the guest ever stops.
handed_over (the new host holds everything): the VM's own switch, and all of its blackout:
pause every vCPU, save into the preserved state memfd, tell the successor ``saved`` and at once
``go``; stay alive until it says the guest runs again. If it dies or times out instead, resume
the guest here and re-attach to the new host. The host's freeze and handover happened before,
with the guest running: its RAM and state memfds are the same files whatever the guest does.
freeze (a plain ``luo freeze``, not an update): pause and save now, as RFC v2 freezes workloads.

Which request is taken in which state is the VMM's end of ``luo.protocol.host_vmm``; what may be
said to the successor, and who owns the guest meanwhile, is ``luo.protocol.vmm_successor``.
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
from luo.host.faults import participant_timeout
from luo.host.procname import start_in_background
from luo.host.spans import span
from luo.host.watchdog import deadline
from luo.host.wire import recv_msg, send_msg
from luo.protocol import host_vmm as hv
from luo.protocol import vmm_successor as vs
from luo.protocol.table import Cursor, ProtocolError, event_of
from luo.vmm.live.guest_state import write_guest_state
from luo.vmm.live.host_link import HostLink
from luo.vmm.live.statefile import write_state
from luo.vmm.vm import Vm

log = logging.getLogger("luo.vmm")

WARM_TIMEOUT = participant_timeout(120.0)
RESUME_TIMEOUT = participant_timeout(5.0)  # a successor VMM told to go resumes in milliseconds; past this it is hung


def kill_and_reap(pid: int, report_every: float = 10.0) -> None:
    """SIGKILL pid and wait until it is gone (it is not our child: wait on a pidfd). There is no
    timeout: the caller resumes the guest next, and must never while the other may still run it.
    A killed process that does not die at once is stuck in the kernel: say so, and keep waiting."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            return
        while not select.select([pidfd], [], [], report_every)[0]:
            log.error("pid %d was killed %g s ago and is still not gone; waiting before resuming the guest",
                      pid, report_every)
    finally:
        os.close(pidfd)


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _successor_says(ch: socket.socket) -> tuple[str, dict[str, Any], str]:
    """The successor VMM's next message as an event of ``vs.RUNNING``, the message, and what went
    wrong (for the error): a timeout, an EOF (a broken channel too) or a malformed message."""
    try:
        got = recv_msg(ch)
    except TimeoutError:
        return vs.TIMEOUT, {}, "it did not answer in time"
    except OSError:
        return vs.EOF, {}, "it exited or did not answer"
    except LuoError as e:
        return vs.PROTOCOL_ERROR, {}, e.message
    if got is None:
        return vs.EOF, {}, "it exited or did not answer"
    for fd in got[1]:  # the successor sends none
        os.close(fd)
    msg = got[0]
    return vs.running_event(msg), msg, str(msg.get("error"))[:512] if msg.get("errno") else ""


class RunningVmm:
    def __init__(self, vm: Vm, link: HostLink, state_fd: int, info: dict[str, Any]) -> None:
        self.vm = vm
        self.link = link
        self.state_fd = state_fd
        self.info = info
        self.successor: socket.socket | None = None
        self.successor_pid = 0
        # this VMM's end of the channel to its successor VMM (luo.protocol.vmm_successor): where it
        # is decides what may be sent, what a reply means, and whether the guest is still ours
        self.to_successor = vs.running_end()
        self.paused_at = 0
        self.parts: dict[str, float] = {}
        self.stamps: dict[str, tuple[int, int]] = {}  # phase -> (start, end), CLOCK_MONOTONIC ns
        # A request stuck longer than this fails (ETIMEDOUT raised inside it, luo.host.watchdog) and
        # the loop goes on: longer than any wait of its own (warm-up, resume, kill, re-register).
        self.watchdog_s = 3 * participant_timeout(WARM_TIMEOUT + 30.0)

    def serve(self, report: dict[str, Any] | None = None, *, reattach: bool = False) -> int:
        """Register with the host and answer its requests until the VM leaves this process; which
        request is taken when is the VMM's end of ``luo.protocol.host_vmm``.

        ``reattach``: the guest's session is not known to be ours yet (a successor VMM that took
        over from a dead predecessor): drop what is left of it and preserve anew first."""
        sock = self._reattach(report) if reattach else self.link.register(self.info, report)
        channel = Cursor(hv.VMM)
        while True:
            try:
                got = recv_msg(sock)
            except LuoError as e:  # a malformed request: refuse it, the guest runs on
                self.link.answer_error(e)
                continue
            except OSError:
                got = None
            if got is None:
                channel.feed(hv.EOF)
                self._host_gone()
                sock = self._reattach()
                continue
            msg, fds = got
            self.link.seq = msg.get("seq")
            event = event_of(msg, hv.REQUESTS)
            try:
                action = channel.feed(event)
            except ProtocolError as e:  # a request out of order: refused, nothing changes
                for fd in fds:
                    os.close(fd)
                self.link.answer_error(e)
                continue
            try:
                with deadline(self.watchdog_s, f"VMM request {event!r}"):  # a stuck request fails, the loop goes on
                    outcome = self._run(action, msg, fds)
            except Exception as e:  # whatever a request does, the guest must not die with it
                if not isinstance(e, LuoError):
                    log.exception("vm %s: request %r failed", self.vm.name, event)
                    e = LuoError(errno.EIO, f"VMM request {event!r} failed: {e}")
                if (channel.state, hv.FAILED) in hv.VMM.rows:
                    channel.feed(hv.FAILED)
                self.link.answer_error(e)
                continue
            if outcome:
                channel.feed(outcome)
            if channel.done:
                return 0
            if outcome == hv.KEPT:
                assert self.link.sock is not None  # re-registered with the new host after a fallback
                sock = self.link.sock

    def _run(self, action: str, msg: dict[str, Any], fds: list[int]) -> str:
        """Run one row's action; returns the event that ends a transient state ("" for none)."""
        if action == "prepare":
            self.link.answer(self.prepare(fds))
            return hv.DONE
        if action == "freeze":
            self.link.answer(self.freeze())
            return hv.DONE
        if action == "cancel":
            self.link.answer(self.cancel())
            return ""
        if action == "switch":
            return hv.SWITCHED if self.handed_over() else hv.KEPT
        if action == "stop":
            self._drop_successor()
            self.vm.stop()
            self._report("stopped", "stopped by the operator")
            if self.link.session is not None:
                self.link.session.close()
            self.link.answer({})
            return ""
        for fd in fds:
            os.close(fd)
        raise LuoError(errno.ENOTTY, f"unknown VMM request {str(msg.get('op'))[:64]!r}")  # action "refuse"

    def _host_gone(self) -> None:
        """The host died. Until this VMM sends ``go`` the guest is its own (the ownership rule in
        docs/reliability.md), and no ``handed_over`` came, so no ``go`` was sent: kill the successor
        VMM and wait until it is gone (two VMMs must never run one guest), then resume here."""
        if self.successor is None and not self.successor_pid and not self.vm.paused:
            log.warning("vm %s: the host went away outside an update; the guest runs on", self.vm.name)
            return
        log.warning("vm %s: the host went away during an update; the guest stays with this VMM", self.vm.name)
        self._keep_guest("the host died during an update")

    def _keep_guest(self, why: str) -> None:
        """The guest stays here: make sure no successor VMM runs (killed and gone, never merely
        told), then let the guest run. Every path that keeps the guest goes through this."""
        gc.enable()
        self._drop_successor()
        if self.vm.paused:
            self.vm.start()
            self._report("running", f"resumed by its VMM: {why}")
            log.info("vm %s: guest resumed on this VMM (%s)", self.vm.name, why)

    def _report(self, state: str, why: str = "") -> None:
        write_guest_state(self.link.runtime, self.vm.name, state, why)

    def _reattach(self, report: dict[str, Any] | None = None) -> socket.socket:
        """The guest keeps running here, and is preserved again (its session died with the host)
        as soon as a host serves the runtime dir."""
        log.info("vm %s: waiting for a host to preserve the guest with", self.vm.name)
        while True:
            try:
                self.link.client.close()
                self.link.drop_stale_incoming()
                self.link.preserve(self.vm.memfd, self.state_fd)
                sock = self.link.register(self.info, report)
                log.info("vm %s: preserved again and registered with the new host", self.vm.name)
                return sock
            except LuoError as e:
                log.warning("vm %s: not preserved yet (%s); still trying", self.vm.name, e)
                if e.errno == errno.EPROTONOSUPPORT:  # a host of another protocol: until another one serves
                    time.sleep(5.0)
                elif e.errno != errno.ECONNREFUSED:  # the connect itself waits for a host to appear
                    time.sleep(0.1)

    def prepare(self, fds: list[int]) -> dict[str, Any]:
        if len(fds) != 1:
            raise LuoError(errno.EINVAL, "prepare needs the channel to the successor VMM")
        faults.point("vmm", "prepare")
        t0 = time.perf_counter()
        warm_start = time.monotonic_ns()
        ch = socket.socket(fileno=fds.pop())  # the socket owns the fd from here
        try:
            action = self.to_successor.feed(vs.SEND_WARM)  # one successor at a time
        except LuoError:
            ch.close()
            raise
        if action != vs.A_SEND_WARM:
            raise vs.unhandled(self.to_successor, action)
        try:
            send_msg(ch, {"op": "warm", "pid": os.getpid(), "name": self.vm.name, "mem": self.vm.mem_bytes,
                          "cpus": self.vm.ncpus, "info": self.info,
                          **abi.announce(abi.VMM_CHANNEL_PROTOCOL, abi.VMM_CHANNEL_OLDEST)},
                     (self.vm.memfd, self.state_fd))
            ch.settimeout(WARM_TIMEOUT)
        except (OSError, LuoError) as e:
            event, reply, why = vs.EOF, {}, f"cannot send warm: {e}"
        else:
            event, reply, why = _successor_says(ch)
        action, broke = vs.take(self.to_successor, event)
        if action == vs.A_CLOSE:  # it failed, refused, died or hung: it exits by itself
            ch.close()
            err = reply.get("errno")
            if broke is not None:
                err, why = errno.EPROTO, str(broke)
            elif not (isinstance(err, int) and not isinstance(err, bool) and err > 0):
                err = errno.EIO
            raise LuoError(err, f"successor VMM for {self.vm.name} could not warm up: {why}")
        if action != vs.A_NEGOTIATE:
            raise vs.unhandled(self.to_successor, action)
        self.successor = ch
        pid = reply.get("pid", 0)
        self.successor_pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else 0
        try:  # the successor checked ours before building anything; a protocol-1 one did not
            abi.negotiate("VMM channel protocol", (abi.VMM_CHANNEL_PROTOCOL, abi.VMM_CHANNEL_OLDEST),
                          abi.announced(reply), f"successor VMM pid {self.successor_pid}", "this VMM")
        except LuoError as e:  # the guest never stopped: drop the successor, and the prepare fails
            self._drop_successor()
            raise LuoError(e.errno, f"successor VMM for {self.vm.name} refused: {e.message}") from None
        use_mode = getattr(self.vm, "use_mode", None)
        if use_mode is not None:  # a QEMU VM: migrate the way the successor's QEMU waits for it
            try:
                use_mode(reply.get("qemu_mode", "x-ignore-shared"))  # a successor before modes: that one
            except LuoError as e:  # outside the blackout: drop the successor, the guest runs on
                self._drop_successor()
                raise LuoError(e.errno, f"successor VMM for {self.vm.name}: {e.message}") from None
        ch.settimeout(None)
        gc.disable()  # no collection pause inside the coming blackout (no collect now: it would hold
        # the GIL that the running vCPU threads need for every exit)
        self.stamps["warm"] = (warm_start, time.monotonic_ns())
        return {"warm_ms": round((time.perf_counter() - t0) * 1000, 3), "successor": reply.get("timings_ms", {})}

    def freeze(self) -> dict[str, Any]:
        """A plain ``luo freeze`` (RFC v2: workloads suspended): pause and save now."""
        self._pause_and_save()
        self._report("paused", "frozen for a live update")  # after "saved": not on the blackout's path
        faults.point("vmm", "freeze")  # paused, saved and said so: what the successor can take over
        return {"pause_ms": self.parts["pause"], "save_ms": self.parts["save"]}

    def _pause_and_save(self) -> None:
        """Pause every vCPU, save into the preserved state memfd, tell the successor ``saved``."""
        t0 = time.monotonic_ns()
        self.vm.pause()
        t1 = time.monotonic_ns()
        record = self.vm.save()
        stopped = getattr(self.vm, "stopped_at_ns", None)  # a machine that stopped the guest itself
        if isinstance(stopped, int) and t1 <= stopped <= time.monotonic_ns():
            # QEMU migrated the running guest and stopped it at the switchover: the blackout starts
            # there; what came before (the successor QEMU setting up) ran beside the guest
            self.stamps["migrate_live"] = (t1, stopped)
            t0 = t1 = stopped
        write_state(self.state_fd, record, t0)
        t2 = time.monotonic_ns()
        self.paused_at = t0
        self.parts = {"pause": _ms(t1 - t0), "save": _ms(t2 - t1)}
        self.stamps.update(pause=(t0, t1), save=(t1, t2))
        action = self.to_successor.feed(vs.SEND_SAVED)  # "" without a successor (a plain luo freeze)
        if action == vs.A_SEND_SAVED and self.successor is not None:
            try:  # the successor restores at once; it resumes when it also has "go"
                send_msg(self.successor, {"op": "saved", "paused_at": t0, "saved_at": t2, "parts_ms": self.parts,
                                          "timeline": self._timeline()})
            except OSError:  # it died: no "resumed" will come after "go", and this VMM resumes the guest
                pass
        elif action:
            raise vs.unhandled(self.to_successor, action)

    def _timeline(self) -> list[dict[str, Any]]:
        """This VMM's phases of the update, for the update record (docs/observe.md)."""
        return [span(f"vmm:{self.vm.name}", os.getpid(), k, a, b) for k, (a, b) in self.stamps.items()]

    def _drop_successor(self) -> None:
        """Abort the successor and make sure it is dead: two VMMs must never run one guest.

        The row is looked up first and entered only once its action is done: a drop cut short (its
        request's watchdog, inside the kill) leaves this end where it was, and the next drop kills
        again rather than find the guest ``idle`` (ours) with a successor still alive."""
        action = self.to_successor.table.step(self.to_successor.state, vs.DROP).action
        if action == vs.A_ABORT:
            if self.successor is not None:
                try:
                    send_msg(self.successor, {"op": "abort"})
                except OSError:
                    pass
                self.successor.close()
                self.successor = None
            if self.successor_pid:
                kill_and_reap(self.successor_pid)
                self.successor_pid = 0
        elif action:
            raise vs.unhandled(self.to_successor, action)
        self.to_successor.feed(vs.DROP)

    def cancel(self) -> dict[str, Any]:
        self._keep_guest("update cancelled")
        faults.point("vmm", "cancel")  # after the rollback's own work
        return {}

    def handed_over(self) -> bool:
        """True when the successor runs the guest (this process then exits)."""
        ch = self.successor
        if self.to_successor.state == vs.IDLE or ch is None:
            return self._fallback("no successor VMM was warmed")
        if not self.vm.paused:  # the update's switch: the blackout starts here, not at the host's freeze
            try:
                self._pause_and_save()
                faults.point("vmm", "freeze")  # paused, saved and said so: what the successor can take over
            except Exception as e:  # (a KVM error too): the guest is paused here, so it resumes here
                why = e.message if isinstance(e, LuoError) else repr(e)
                return self._fallback(f"saving the guest failed: {why}")
        try:
            faults.point("vmm", "handover")  # saved: a VMM dying here leaves the guest to its successor
        except LuoError as e:
            return self._fallback(str(e))
        try:  # go only behind saved (a guest paused by another path, say, is not the successor's)
            action = self.to_successor.feed(vs.SEND_GO)
        except LuoError as e:
            return self._fallback(str(e))
        if action != vs.A_SEND_GO:  # (a bug) never leave the guest paused: it resumes here
            return self._fallback(str(vs.unhandled(self.to_successor, action)))
        try:  # from here the guest is the successor's, until it is killed and gone
            send_msg(ch, {"op": "go"})  # right behind "saved": the successor finds it when restored
            ch.settimeout(RESUME_TIMEOUT)
        except OSError:
            event = vs.EOF
        else:
            event, _, _ = _successor_says(ch)
        action, broke = vs.take(self.to_successor, event)
        if action == vs.A_EXIT:
            log.info("vm %s: successor VMM runs the guest; this VMM exits", self.vm.name)
            start_in_background(os.getpid())  # the teardown must not compete with the resumed guest
            self.vm.stop()
            return True
        # fall_back: _fallback drops the successor (kills and reaps it) before it resumes the guest here
        if action != vs.A_FALL_BACK:
            return self._fallback(str(vs.unhandled(self.to_successor, action)))
        if broke is not None:
            return self._fallback(f"the successor VMM broke the protocol: {broke}")
        return self._fallback("the successor VMM died or did not resume the guest in time")

    def _fallback(self, why: str) -> bool:
        log.error("vm %s: %s; resuming the guest on this VMM", self.vm.name, why)
        self._keep_guest(why)
        self.link.client.close()
        self.link.drop_stale_incoming()
        self.link.preserve(self.vm.memfd, self.state_fd)
        self.link.register(self.info, {"fallback": True, "reason": why})
        return False
