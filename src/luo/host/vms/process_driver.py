"""A VMM that is a process of its own, registered with the host on a connection of its own and
answering the host↔VMM protocol (``luo.protocol.host_vmm``) there.

The VMM outlives the host that started it, holds its VM's session itself (libluo), and is
replaced at each update by a successor VMM process that the host starts from the new
installation at prepare, handing both a channel to each other. Subclasses say which program runs
the VM (``vmm_argv``, ``successor_argv``) and what ``luo vm start`` options it takes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from luo.errors import LuoError
from luo.host import faults
from luo.host.procname import start_in_background
from luo.host.runtime import RuntimeDir
from luo.host.vms.driver import VmmDriver, VmSpec
from luo.host.vms.entry import VmEntry
from luo.host.vms.requests import PartialFailure, Requests
from luo.host.wire import send_msg
from luo.protocol import host_vmm as hv

log = logging.getLogger("luod")

_TRANSIENT = frozenset({hv.PREPARING, hv.FREEZING, hv.CANCELLING, hv.STOPPING})


class ProcessVmmDriver(VmmDriver):
    def __init__(self, runtime: RuntimeDir, requests: Requests) -> None:
        self.runtime = runtime
        self.requests = requests

    # -- what a subclass says ----------------------------------------------------------------
    def vmm_argv(self, spec: VmSpec) -> list[str]:
        raise NotImplementedError

    def successor_argv(self, vm: VmEntry, successor_cmd: list[str], channel_fd: int) -> list[str]:
        raise NotImplementedError

    # -- the requests, with the host's table of each VMM's link ---------------------------------
    def _request(self, vms: Sequence[VmEntry], op: str, timeout: float,
                 fds_for: dict[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
        """Send ``op`` to every VMM, moving each one's link through the host table (``op``, then
        ``ok`` or ``failed``); a VMM whose link does not allow ``op`` is refused before any send."""
        for v in vms:
            hv.HOST.step(v.link.state, op)  # raises EPROTO, and nothing was sent to anyone
        for v in vms:
            v.link.feed(op)
        try:
            answers = self.requests.ask(vms, {"op": op}, timeout, fds_for)
        except PartialFailure as e:
            for v in vms:
                good = v.name in e.answers and not e.answers[v.name].get("errno")
                self._outcome(v, good)
            raise
        for v in vms:
            self._outcome(v, True)
        return answers

    @staticmethod
    def _outcome(v: VmEntry, good: bool) -> None:
        if v.link.state in _TRANSIENT:  # not when the VMM's connection ended meanwhile (eof: exited)
            v.link.feed(hv.OK if good else hv.FAILED)

    # -- VmmDriver ---------------------------------------------------------------------------
    def start(self, spec: VmSpec, vdir: Path) -> subprocess.Popen[bytes]:
        logf = open(vdir / "vmm.log", "ab")
        try:
            pool_fd = spec.options.get("pool_fd")  # the host's memory pool, inherited under its own number
            return subprocess.Popen(self.vmm_argv(spec), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, pass_fds=[pool_fd] if pool_fd is not None else [])
        finally:
            logf.close()

    def warm(self, vms: Sequence[VmEntry], successor_cmd: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        channels: dict[str, list[int]] = {}
        try:
            for v in vms:
                channels[v.name] = [self._spawn_successor(v, successor_cmd)]
            return self._request(vms, hv.PREPARE, timeout, channels)
        except LuoError as e:
            if not isinstance(e, PartialFailure):  # a successor that could not be started: nobody was asked
                e = PartialFailure({}, [e.message])
            raise e from None
        finally:
            for fds in channels.values():
                for fd in fds:
                    os.close(fd)

    def _spawn_successor(self, v: VmEntry, successor_cmd: list[str]) -> int:
        """Start v's successor VMM from the new installation; returns the old VMM's end of their channel."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        vdir = self.runtime.vm_dir(v.name)
        vdir.mkdir(parents=True, exist_ok=True)
        logf = open(vdir / "vmm.log", "ab")
        try:
            v.successor = subprocess.Popen(self.successor_argv(v, successor_cmd, theirs.fileno()),
                                           pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=logf,
                                           stderr=logf, start_new_session=True, env=faults.child_env())
        except OSError as e:
            mine.close()
            raise LuoError(errno.ENOEXEC, f"cannot start the successor VMM of {v.name}: {e.strerror}") from None
        finally:
            logf.close()
            theirs.close()
        start_in_background(v.successor.pid)
        return mine.detach()

    def freeze(self, vms: Sequence[VmEntry], timeout: float) -> dict[str, dict[str, Any]]:
        return self._request(vms, hv.FREEZE, timeout)

    def hand_over(self, vms: Sequence[VmEntry]) -> None:
        for v in vms:
            v.link.feed(hv.HANDED_OVER)
            try:
                assert v.conn is not None
                send_msg(v.conn.sock, {"op": hv.HANDED_OVER})
            except OSError:
                pass  # a dead VMM: its successor takes the guest over if it saved it, or nobody had it
            v.successor = None  # it belongs to the next host now

    def cancel(self, vms: Sequence[VmEntry], timeout: float) -> None:
        self._request(vms, hv.CANCEL, timeout)

    def kill_successors(self, vms: Sequence[VmEntry]) -> None:
        """Not when the old VMM is gone: its successor may hold the guest by then (a VMM that dies
        after saving hands the guest to its successor), and only it can tell; it exits by itself
        otherwise."""
        for v in vms:
            if v.successor is not None and v.conn is None:
                v.successor = None
            if v.successor is not None:
                if v.successor.poll() is None:
                    v.successor.kill()
                v.successor.wait()
                v.successor = None

    def stop(self, vm: VmEntry, timeout: float) -> None:
        self._request([vm], hv.STOP, timeout)

    def describe(self, vm: VmEntry) -> dict[str, Any]:
        return {}
