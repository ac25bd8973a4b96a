"""``luo update`` on the outgoing host: the kexec of this design.

Order, and why:
1. start the successor and let it import everything (~100 ms of Python start-up) while every
   workload still runs;
2. prepare (files, then subsystems: the VMM subsystem warms successor VMMs), then ask the
   successor whether it understands every compatible string in the tree. A "no" cancels:
   nothing was frozen;
3. freeze (implicit when prepared, as a kexec reboot does), build the final tree, hand it and
   every preserved fd over, and wait for the successor to confirm. No confirmation in time, or
   a successor that dies or refuses: cancel and carry on with every fd intact. The kernel cannot
   do this, because its old kernel is gone by the time the new one could object;
4. confirmed: acknowledge, forget the fds and exit after answering the caller.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from luo.core.states import State
from luo.errors import LuoError
from luo.host import faults
from luo.host.spans import span
from luo.host.successor_link import SuccessorLink
from luo.host.tree import host_tree

if TYPE_CHECKING:
    from luo.host.daemon import Host

log = logging.getLogger("luod")


def default_successor_command() -> list[str]:
    return [sys.executable, "-m", "luo"]


def successor_command(to: Any) -> list[str]:
    if to in (None, ""):
        return default_successor_command()
    if isinstance(to, list) and all(isinstance(w, str) for w in to):
        return list(to)
    if isinstance(to, str):
        return shlex.split(to)
    raise LuoError(errno.EINVAL, f"--to must be a command, not {to!r}")


class Timeline:
    """The host's phases, back to back: milliseconds for the reply, and CLOCK_MONOTONIC spans (one
    clock for every process of the machine) for the update record's timeline."""

    def __init__(self) -> None:
        self.t0 = time.monotonic_ns()
        self.last = self.t0
        self.phases: dict[str, float] = {}
        self.spans: list[tuple[str, int, int]] = []

    def mark(self, name: str) -> None:
        now = time.monotonic_ns()
        self.phases[name] = round((now - self.last) / 1e6, 3)
        self.spans.append((name, self.last, now))
        self.last = now

    def entries(self, lane: str = "host") -> list[dict[str, Any]]:
        return [span(lane, os.getpid(), p, a, b) for p, a, b in self.spans]

    @property
    def total_ms(self) -> float:
        return round((time.monotonic_ns() - self.t0) / 1e6, 3)


def corrupt(blob: bytes) -> bytes:
    """Damage the tree's structure: point the structure block past the end of the blob."""
    b = bytearray(blob)
    b[8:12] = (len(blob) + 64).to_bytes(4, "big")  # off_dt_struct
    return bytes(b)


def _abandon_handover(host: Host, link: SuccessorLink, e: BaseException) -> None:
    """The successor failed after the freeze: cancel, keep every fd, and say so (raises)."""
    link.kill()
    host.orch.cancel()
    host.settle()
    log.warning("handover failed, update cancelled, every fd kept: %s", e)
    host.last_update = {"failed": str(e), "stage": "handover", "successor_pid": link.pid, "time": time.time()}
    if isinstance(e, LuoError):
        raise LuoError(e.errno, f"handover failed; update cancelled and every fd kept: {e.message}") from None


def run_update(host: Host, msg: dict[str, Any]) -> dict[str, Any]:
    """Check every field of the request, then update.

    The checks come before anything changes, the successor's start included: a bad value found
    later is found inside the update (a NaN handover timeout used to be noticed only once frozen,
    after waiting for nothing, and then rolled back)."""
    from luo.host import fields

    timeout = fields.finite(msg, "handover_timeout", 0.0, 3600.0, 10.0)
    start_timeout = fields.finite(msg, "start_timeout", 0.0, 3600.0, 120.0)
    to = msg.get("to")
    if isinstance(to, list):
        to = fields.str_list(msg, "to", 256, 4096)
    elif to is not None:
        to = fields.text(msg, "to", 4096)
    try:
        cmd = successor_command(to)
    except ValueError as e:  # shlex: an unbalanced quote
        raise fields.refuse("to", f"is not a command line: {e}") from None
    if not cmd:
        raise fields.refuse("to", "names no command")
    asked = fields.str_list(msg, "faults", 64, 256, [])
    qemu = fields.text(msg, "qemu", 4096, None)
    if qemu is not None and not os.access(qemu, os.X_OK):
        raise fields.refuse("qemu", f"is not an executable file: {qemu!r}")
    orch = host.orch
    if orch.state not in (State.NORMAL, State.PREPARED):
        hint = "; run `luo finish` first" if orch.state == State.UPDATED else ""
        raise LuoError(errno.EINVAL, f"cannot update from state {orch.state.label}{hint}")
    faults.set_for_update(asked)
    if host.vms is not None:
        host.vms.set_successor_options({"qemu": qemu} if qemu else {})
    try:
        return _update(host, {**msg, "start_timeout": start_timeout}, cmd, timeout)
    finally:
        faults.set_for_update([])
        if host.vms is not None:
            host.vms.switch_after_handover = False
        if not host.exit_after_step:
            gc.enable()


def _update(host: Host, msg: dict[str, Any], cmd: list[str], timeout: float) -> dict[str, Any]:
    orch = host.orch
    tl = Timeline()
    if host.vms is not None:
        host.vms.successor_cmd = cmd
    link = SuccessorLink.spawn(cmd, host.runtime, start_timeout=float(msg.get("start_timeout", 120.0)))
    tl.mark("start")
    try:
        if orch.state == State.NORMAL:
            orch.prepare()
        host.publish_state()
        tl.mark("prepare")
        prepared, fds = orch.outgoing_record()
        link.prepare(host_tree(host, prepared), fds, host.listener.fileno(), float(msg.get("start_timeout", 120.0)),
                     host.mirror.keys if host.mirror is not None else None)
        tl.mark("check")
        faults.hold("prepared", host.runtime.root)
    except BaseException as e:
        link.kill()
        if orch.state == State.PREPARED:
            orch.cancel()
        host.settle()
        if isinstance(e, LuoError):
            raise LuoError(e.errno, f"prepare failed, nothing was frozen: {e.message}") from None
        raise
    gc.disable()  # no collection pause inside the blackout; this process exits after it anyway
    if host.vms is not None:
        host.vms.switch_after_handover = True  # VMs run on through the host's freeze and handover
    try:
        orch.begin_update()  # the implicit freeze of a kexec issued while prepared
    except BaseException:
        link.kill()
        host.settle()
        raise
    host.publish_state()
    tl.mark("freeze")
    faults.hold("frozen", host.runtime.root)
    try:
        record, fds = orch.outgoing_record()
        blob: bytes | None = None  # the successor already holds the tree when freeze changed nothing
        if record != prepared or not link.takes_unchanged or faults.enabled("corrupt-tree"):
            blob = host_tree(host, record)
            if faults.enabled("corrupt-tree"):
                blob = corrupt(blob)
        tl.mark("tree")
        confirm = link.handover(blob, timeout)
        tl.mark("handover")
        faults.hold("confirmed", host.runtime.root)
    except BaseException as e:
        _abandon_handover(host, link, e)
        raise
    # confirmed: the successor owns everything. VMMs may go on at once; the ack only lets the
    # successor host start serving.
    if host.vms is not None:
        host.vms.handed_over()
    try:
        link.acknowledge(tl.phases, tl.entries())
        if not link.wait_adopted():
            raise LuoError(errno.ESRCH, f"successor pid {link.pid} died after confirming")
    except BaseException as e:
        # Rare: the VMs already went on in their successor VMMs, which re-attach to this host.
        _abandon_handover(host, link, e)
        raise
    for fd in orch.handover_complete():  # the successor serves: only now do our copies go
        os.close(fd)
    host.close_released()
    tl.mark("release")
    host.exit_after_step = True
    result = {
        "old_pid": os.getpid(),
        "new_pid": link.pid,
        "liveupdate_number": int(confirm.get("liveupdate_number", orch.liveupdate_number + 1)),
        "phases_ms": tl.phases,
        "total_ms": tl.total_ms,
        "successor": confirm.get("timings_ms", {}),
        "preserved_fds": len(fds),
    }
    log.info("update handed over to pid %d in %.1f ms: %s", link.pid, tl.total_ms, tl.phases)
    return result
