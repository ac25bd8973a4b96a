"""VMs under the host: starting VMM processes, talking to them as LUO participants, and the
``vmm`` subsystem that carries them through prepare, freeze, cancel and the handover.

A VMM registers on a control connection of its own; the host then sends it requests on that
connection (prepare, freeze, cancel, handed_over) and it answers each with ``reply: true``. A VMM
may be another installation than its host (it outlives the host that started it): registration
negotiates the VMM-host protocol (``luo.abi.VMM_HOST_PROTOCOL``) and refuses a VMM that speaks
none this host does. The
host spawns each VMM's successor from the *new* version at prepare, so whatever the successor
can build before the pause (imports, VM, memslots, vCPUs) is built while the guest runs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from luo import abi
from luo.abi import VM_SESSION_PREFIX
from luo.core.participants import Subsystem
from luo.errors import LuoError
from luo.host import faults, fields
from luo.host.procname import start_in_background
from luo.host.runtime import RuntimeDir, write_atomic
from luo.host.wire import ok, recv_msg, send_msg
from luo.vmm.live.guest_state import read_guest_state

if TYPE_CHECKING:
    from luo.host.daemon import Conn, Host, Reply

log = logging.getLogger("luod")

VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


def session_name(vm: str) -> str:
    return VM_SESSION_PREFIX + vm


@dataclass
class VmEntry:
    name: str
    pid: int
    conn: Conn | None = None
    info: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None  # when this host started the VMM itself
    successor: subprocess.Popen[bytes] | None = None
    report: dict[str, Any] | None = None  # blackout accounting sent by a successor VMM
    state: str = "starting"
    protocol: int = abi.UNVERSIONED  # the VMM-host protocol negotiated at registration


class VmSupervisor:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.runtime: RuntimeDir = host.runtime
        self.vms: dict[str, VmEntry] = {}
        self.successor_cmd: list[str] = [sys.executable, "-m", "luo"]
        self.request_timeout = faults.participant_timeout(120.0)
        self.seq = 0  # numbers the requests to VMMs
        # Set by `luo update` around its freeze: the VMs do not pause with the host; each switches
        # to its successor VMM when told the host handed over (docs/design.md), so that the host's
        # freeze and handover are outside every VM's blackout. A plain `luo freeze` pauses them.
        self.switch_after_handover = False
        incoming = [s for s in _incoming_session_names(host) if s.startswith(VM_SESSION_PREFIX)]
        self.expected = {s[len(VM_SESSION_PREFIX):] for s in incoming}

    # -- status & ops ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"vms": [self.describe(v) for v in self.vms.values()]}

    def describe(self, v: VmEntry) -> dict[str, Any]:
        d: dict[str, Any] = {"name": v.name, "pid": v.pid, "state": v.state, "session": session_name(v.name),
                             "protocol": v.protocol}
        guest = read_guest_state(self.runtime.vm_dir(v.name))
        if guest is not None:
            d["guest"] = guest
            if v.state in ("running", "exited", "handed-over") or v.state.startswith("exited"):
                # the VMM's own word: paused during a freeze, or lost with its VMM, is never "running"
                d["state"] = guest["state"]
        for k in ("mem", "cpus", "image", "cmdline"):
            if k in v.info:
                d[k] = v.info[k]
        d["console"] = str(self.runtime.vm_dir(v.name) / "console.log")
        return d

    def op_register(self, c: Conn, msg: dict, fds: list[int]) -> Reply:
        """A VMM joins as a participant. ``info`` and ``report`` are kept and shown in the status,
        so they are bounded; the pid in the request is only checked, the socket's credentials say
        who registers."""
        fields.no_fds(fds, "vm_register")
        name = fields.text(msg, "name", 48, pattern=VM_NAME,
                           rule="letters, digits, '_', '.', '-'; at most 48, the first a letter or digit")
        fields.integer(msg, "pid", 1, fields.PID_MAX, None)
        info = fields.mapping(msg, "info", 16 << 10, {})
        report = fields.mapping(msg, "report", 64 << 10, None)
        protocol = abi.negotiate("VMM-host protocol", (abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST),
                                 abi.announced(msg), f"the VMM pid {c.peer.pid} of VM {name!r}", "this host")
        old = self.vms.get(name)
        if old is not None and old.conn is not None and old.conn is not c:
            raise LuoError(errno.EEXIST, f"VM {name!r} is already registered by pid {old.pid}")
        v = old or VmEntry(name, c.peer.pid)
        v.pid = c.peer.pid
        v.conn = c
        if v.successor is not None and v.successor.pid == v.pid:
            v.successor = None  # the successor VMM took the guest over: it is the VM's VMM now
        v.info = info
        v.report = report
        v.protocol = protocol
        v.state = "running"
        self.vms[name] = v
        c.extra["participant"] = True
        c.on_close = lambda: self._gone(v, c)
        log.info("vm %s registered by VMM pid %d (VMM-host protocol %d)", name, v.pid, protocol)
        return ok(**abi.announce(abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST)), []

    def _gone(self, v: VmEntry, c: Conn) -> None:
        if v.conn is c:
            v.conn = None
            code = v.proc.poll() if v.proc else None
            v.state = "exited" if code is None else f"exited ({code})"
            log.info("vm %s: VMM pid %d is gone", v.name, v.pid)

    def op_start(self, c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Every field is checked before the VM's directory or process exists."""
        fields.no_fds(fds, "vm_start")
        name = fields.text(msg, "name", 48, pattern=VM_NAME,
                           rule="letters, digits, '_', '.', '-'; at most 48, the first a letter or digit")
        mem = fields.size(msg, "mem", 1 << 20, 1 << 40, 256 << 20)
        cpus = fields.integer(msg, "cpus", 1, 64, 2)
        image = fields.text(msg, "image", 4096, None)
        cmdline = fields.text(msg, "cmdline", 4096, None)
        timeout = fields.finite(msg, "timeout", 0, 3600, 60.0)
        if name in self.vms and self.vms[name].conn is not None:
            raise LuoError(errno.EEXIST, f"VM {name!r} is already running (pid {self.vms[name].pid})")
        vdir = self.runtime.vm_dir(name)
        vdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "luo", "--runtime-dir", str(self.runtime.root),
                "vmm", "run", "--name", name, "--mem", str(mem), "--cpus", str(cpus)]
        if image:
            argv += ["--image", image]
        if cmdline is not None:
            argv += ["--cmdline", cmdline]
        logf = open(vdir / "vmm.log", "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True)
        finally:
            logf.close()
        v = VmEntry(name, proc.pid, proc=proc)
        self.vms[name] = v

        def poll() -> Reply | None:
            if v.state == "running":
                return ok(vm=self.describe(v)), []
            if proc.poll() is not None:
                tail = _tail(vdir / "vmm.log")
                return {"errno": errno.EIO, "error": f"VMM for {name!r} exited with {proc.returncode}: {tail}"}, []
            return None

        def on_timeout() -> Reply:
            return {"errno": errno.ETIMEDOUT, "error": f"VMM for {name!r} did not register in time"}, []

        return self.host.defer(c, poll, timeout, on_timeout)

    def op_list(self, c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "vm_list")
        return ok(vms=[self.describe(v) for v in self.vms.values()]), []

    def op_stop(self, c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "vm_stop")
        name = fields.text(msg, "name", 48, pattern=VM_NAME,
                           rule="letters, digits, '_', '.', '-'; at most 48, the first a letter or digit")
        v = self.vms.get(name)
        if v is None or v.conn is None:
            raise LuoError(errno.ENOENT, f"no running VM {name!r}")
        self._ask([v], {"op": "stop"}, 30.0)
        v.state = "stopped"
        return ok(), []

    def op_wait_update(self, c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Answer once every VM that crossed the update has reported its blackout."""
        fields.no_fds(fds, "wait_update")
        wait = fields.finite(msg, "wait", 0, 3600, 30.0)

        def poll() -> Reply | None:
            if all(n in self.vms and self.vms[n].report for n in self.expected):
                return ok(update=self.update_record()), []
            return None

        def timeout() -> Reply:
            missing = sorted(n for n in self.expected if not (n in self.vms and self.vms[n].report))
            rec = self.update_record()
            rec["missing_vms"] = missing
            return ok(update=rec), []

        return self.host.defer(c, poll, wait, timeout)

    def update_record(self) -> dict[str, Any]:
        rec = dict(self.host.last_update or {})
        reports = {n: self.vms[n].report for n in sorted(self.expected) if n in self.vms and self.vms[n].report}
        timeline = list(rec.get("timeline") or [])
        for r in reports.values():  # each VM's two VMMs, as their successor reported them
            timeline += [e for e in (r or {}).get("timeline") or [] if isinstance(e, dict)]
        rec["vms"] = {n: {k: v for k, v in (r or {}).items() if k != "timeline"} for n, r in reports.items()}
        if timeline:
            rec["timeline"] = sorted(timeline, key=lambda e: (e.get("start_ns", 0), str(e.get("lane"))))
        if rec.get("liveupdate_number") is not None and rec["vms"]:
            path = self.runtime.updates / f"{int(rec['liveupdate_number']):06d}.json"
            if not path.exists():
                import json

                write_atomic(path, json.dumps(rec, indent=1) + "\n")
        return rec

    # -- participant requests ----------------------------------------------------------
    def running(self) -> list[VmEntry]:
        return [v for v in self.vms.values() if v.conn is not None and v.state == "running"]

    def _ask(self, vms: list[VmEntry], msg: dict, timeout: float,
             fds_for: dict[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
        """Send one request to each VMM, then collect every answer (they work in parallel)."""
        sent: list[VmEntry] = []
        errors: list[str] = []
        self.seq += 1
        msg = {**msg, "seq": self.seq}  # a late answer to an earlier request is not this one's answer
        for v in vms:
            try:
                assert v.conn is not None
                send_msg(v.conn.sock, msg, (fds_for or {}).get(v.name, []))
                sent.append(v)
            except OSError as e:
                errors.append(f"{v.name}: {e.strerror}")
        answers: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        for v in sent:
            conn = v.conn
            assert conn is not None
            got, gone = None, False
            try:
                while got is None:
                    conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                    got = recv_msg(conn.sock)
                    if got is None:
                        gone = True  # EOF: the VMM is dead
                        break
                    if got[0].get("seq") != msg["seq"]:
                        for fd in got[1]:
                            os.close(fd)
                        got = None  # a late answer to an earlier request
            except (TimeoutError, OSError, LuoError):
                got = None
            finally:
                if conn.sock.fileno() >= 0:
                    conn.sock.settimeout(None)
            if gone:
                # say so now, not at the next turn of the loop: its successor VMM may own the guest
                # already (a VMM that dies after saving hands it on), and must not be killed for it
                self.host.drop_conn(conn)
            if got is None:
                errors.append(f"{v.name}: VMM pid {v.pid} did not answer {msg['op']}")
                continue
            reply, rfds = got
            for fd in rfds:
                os.close(fd)
            answers[v.name] = reply
            if reply.get("errno"):
                errors.append(f"{v.name}: {reply.get('error', os.strerror(int(reply['errno'])))}")
        if errors:
            raise _Partial(answers, errors)
        return answers

    def spawn_successor(self, v: VmEntry) -> int:
        """Start v's successor VMM from the new version; returns the old VMM's end of their channel."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        vdir = self.runtime.vm_dir(v.name)
        vdir.mkdir(parents=True, exist_ok=True)
        argv = [*self.successor_cmd, "--runtime-dir", str(self.runtime.root), "vmm", "successor",
                "--name", v.name, "--channel", str(theirs.fileno())]
        logf = open(vdir / "vmm.log", "ab")
        try:
            v.successor = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                           stdout=logf, stderr=logf, start_new_session=True,
                                           env=faults.child_env())
        finally:
            logf.close()
            theirs.close()
        start_in_background(v.successor.pid)
        return mine.detach()

    def kill_successors(self) -> None:
        """A backstop for successors whose old VMM did not get the cancel. Not when the old VMM is
        gone: its successor may hold the guest by then (a VMM that dies after saving hands the
        guest to its successor), and only it can tell; it exits by itself otherwise."""
        for v in self.vms.values():
            if v.successor is not None and v.conn is None:
                v.successor = None
            if v.successor is not None:
                if v.successor.poll() is None:
                    v.successor.kill()
                v.successor.wait()
                v.successor = None

    def handed_over(self) -> None:
        for v in self.running():
            try:
                assert v.conn is not None
                send_msg(v.conn.sock, {"op": "handed_over"})
            except OSError:
                pass
            v.successor = None  # it belongs to the next host now
            v.state = "handed-over"  # its VMM answers nothing more: the guest moves on


class _Partial(LuoError):
    """Some VMMs failed a request: the errno of the first one that gave one (else EIO), every reason."""

    def __init__(self, answers: dict[str, dict[str, Any]], errors: list[str]) -> None:
        errnos = [int(a["errno"]) for a in answers.values() if a.get("errno")]
        super().__init__(errnos[0] if errnos else errno.EIO, "; ".join(errors))
        self.answers = answers


class VmmSubsystem(Subsystem):
    """The ``vmm`` subsystem: VMs are the workloads that freeze suspends.

    Its u64 is the number of VMs that crossed. When it fails it undoes its own partial work,
    because LUO does not cancel the participant that failed.
    """

    name = abi.VMM_SUBSYSTEM

    def __init__(self, sup: VmSupervisor) -> None:
        self.sup = sup
        self.prepared: list[VmEntry] = []
        self.frozen: list[VmEntry] = []
        self.timings: dict[str, dict[str, Any]] = {}

    def prepare(self) -> int:
        vms = self.sup.running()
        channels: dict[str, list[int]] = {}
        try:
            for v in vms:
                channels[v.name] = [self.sup.spawn_successor(v)]
            answers = self.sup._ask(vms, {"op": "prepare"}, self.sup.request_timeout, channels)
        except LuoError as e:
            ok_ones = [v for v in vms if v.name in getattr(e, "answers", {})]
            self._cancel(ok_ones)
            self.sup.kill_successors()
            raise
        finally:
            for fds in channels.values():
                for fd in fds:
                    os.close(fd)
        self.prepared = vms
        self.timings = {n: dict(a) for n, a in answers.items()}
        return len(vms)

    def freeze(self, data: int) -> int:
        """Pause and save every VM; in an update (``switch_after_handover``) only the VMMs that may
        not pause by themselves on ``handed_over`` (VMM-host protocol 1, luo.abi): the others run
        on, each switching after the host's handover."""
        vms = self.prepared
        if self.sup.switch_after_handover:
            vms = [v for v in vms if v.protocol < abi.VMM_HOST_SWITCHES_AFTER_HANDOVER]
        if vms:
            try:
                answers = self.sup._ask(vms, {"op": "freeze"}, faults.participant_timeout(10.0))
            except LuoError as e:
                self._cancel(self.prepared)
                self.sup.kill_successors()
                raise LuoError(e.errno, f"freezing VMs failed: {e.message}") from None
            for n, a in answers.items():
                self.timings.setdefault(n, {}).update(a)
        self.frozen = list(self.prepared)
        return len(self.frozen)

    def _cancel(self, vms: list[VmEntry]) -> None:
        try:
            self.sup._ask(vms, {"op": "cancel"}, faults.participant_timeout(30.0))
        except LuoError as e:
            log.error("cancel: %s", e)

    def cancel(self, data: int) -> None:
        self._cancel([v for v in self.prepared if v.state == "running"])  # not those already handed over
        self.sup.kill_successors()
        self.prepared, self.frozen = [], []

    def finish(self, data: int) -> None:
        faults.point("vmm", "finish")


def _incoming_session_names(host: Host) -> list[str]:
    from luo.host.ops import sessions_of

    return [s["name"] for s in sessions_of(host) if s.get("direction") == "in"]


def _tail(path: os.PathLike[str] | str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip().splitlines()[-1:][0] if n else ""
    except (OSError, IndexError):
        return ""


def install(host: Host) -> VmSupervisor:
    sup = VmSupervisor(host)
    host.extensions.append(sup)
    host.ops.update({
        "vm_register": (sup.op_register, True),
        "vm_start": (sup.op_start, True),
        "vm_list": (sup.op_list, False),
        "vm_stop": (sup.op_stop, True),
        "wait_update": (sup.op_wait_update, False),
    })
    return sup
