"""The successor VMM: warmed at prepare, it takes the guest over after the host's handover.

Timeline inside the blackout: ``saved`` (the old VMM paused and wrote the record) -> restore the
vCPU and device state into the VM built at prepare, while the host hands over -> ``go`` ->
retrieve the VM's session from the new host and check it holds the very memfd we mapped ->
resume. Re-preserving and registering happen after the guest runs again.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import time
from typing import Any

from luo.errors import LuoError
from luo.host import faults
from luo.host.procname import favour_this_thread, normal_weight_for_other_threads
from luo.host.runtime import RuntimeDir, write_atomic
from luo.host.wire import recv_msg, send_msg
from luo.vmm.devices.console_sink import FileConsoleSink
from luo.vmm.live.host_link import HostLink
from luo.vmm.live.outgoing import RunningVmm
from luo.vmm.live.statefile import read_state
from luo.vmm.vm import Vm

log = logging.getLogger("luo.vmm")


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
        same = _same_file(ram2, ram_fd) and _same_file(state2, state_fd)
        os.close(ram2)
        os.close(state2)
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


def run_successor_vmm(runtime: RuntimeDir, name: str, channel_fd: int) -> int:
    ch = socket.socket(fileno=channel_fd)
    got = recv_msg(ch)
    if got is None or got[0].get("op") != "warm":
        return 1
    msg, fds = got
    ram_fd, state_fd = fds
    info: dict[str, Any] = msg.get("info", {})
    t0 = time.perf_counter()
    try:
        if faults.enabled("vmm-successor-fail-warm"):
            raise LuoError(errno.ENOMEM, "cannot build the VM (fault injected)")
        console = FileConsoleSink(str(runtime.vm_dir(name) / "console.log"))
        vm = Vm.create(name, int(msg["mem"]), int(msg["cpus"]), memfd=ram_fd, console=console)
    except LuoError as e:
        send_msg(ch, {"errno": e.errno, "error": e.message})
        return 1
    normal_weight_for_other_threads()  # the vCPU threads Vm.create started while we warmed up
    favour_this_thread()
    link = HostLink(runtime, name)
    send_msg(ch, {"op": "warm", "errno": 0, "pid": os.getpid(),
                  "timings_ms": {"create": round((time.perf_counter() - t0) * 1000, 3)}})

    gc.collect()
    gc.disable()  # no collection pause until the guest runs again
    got = recv_msg(ch)
    if got is None or got[0].get("op") != "saved":
        vm.stop()
        return 0
    saved = got[0]
    t_saved = time.monotonic_ns()
    record, paused_at = read_state(state_fd)
    if faults.enabled("vmm-successor-stall-restore"):
        write_atomic(runtime.vm_dir(name) / "successor.stalled", f"{os.getpid()}\n")
        recv_msg(ch)  # until killed
        return 3
    vm.restore(record)
    t_restored = time.monotonic_ns()

    got = recv_msg(ch)
    if got is None or got[0].get("op") != "go":
        vm.stop()
        return 0
    t_go = time.monotonic_ns()
    vm.start()  # the new host confirmed it holds the session: the guest's memory is safe
    t_resumed = time.monotonic_ns()
    send_msg(ch, {"op": "resumed"})
    ch.close()
    gc.enable()

    parts = dict(saved.get("parts_ms", {}))
    # restore overlaps the host handover; "handover" is the part of the gap not spent restoring
    saved_at = int(saved.get("saved_at", t_saved))
    parts["handover"] = _ms(t_go - saved_at - (t_restored - t_saved))
    parts["restore"] = _ms(t_restored - t_saved)
    parts["resume"] = _ms(t_resumed - t_go)
    report = {"blackout_ms": _ms(t_resumed - paused_at), "parts_ms": parts,
              "pid": os.getpid(), "vm_timings_ms": {k: round(v, 3) for k, v in vm.timings.items()}}
    log.info("vm %s resumed by successor VMM %d: blackout %.3f ms %s", name, os.getpid(), report["blackout_ms"], parts)
    _adopt_session(link, name, ram_fd, state_fd, report)
    return RunningVmm(vm, link, state_fd, info).serve(report)
