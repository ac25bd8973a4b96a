"""VM supervision: which VMs the host runs, on which VMM driver, and their control-socket ops.

A VM's VMM registers on a control connection of its own (``vm_register``); the host then talks
to it through the host↔VMM protocol (``luo.protocol.host_vmm``: each entry's ``link`` is the
host's end of that table). A VMM may be another installation than its host (it outlives the host
that started it): registration negotiates the VMM-host protocol (``luo.abi.VMM_HOST_PROTOCOL``)
and refuses a VMM that speaks none this host does. How a VM and its successor VMM are started is
the driver's business (``luo.host.vms.driver``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from luo import abi
from luo.abi import VM_SESSION_PREFIX
from luo.errors import LuoError
from luo.host import faults, fields
from luo.host.runtime import RuntimeDir, write_atomic
from luo.host.vms.driver import VmmDriver, VmSpec
from luo.host.vms.entry import VM_NAME, VM_NAME_RULE, VmEntry, session_name
from luo.host.vms.luo_vmm import LuoVmmDriver
from luo.host.vms.qemu_driver import QemuVmmDriver
from luo.host.vms.requests import Requests
from luo.host.wire import ok
from luo.protocol import host_vmm as hv
from luo.vmm.live.guest_state import read_guest_state

if TYPE_CHECKING:
    from luo.host.daemon import Conn, Host, Reply

log = logging.getLogger("luod")

DRIVERS: tuple[type[VmmDriver], ...] = (LuoVmmDriver, QemuVmmDriver)  # `luo vm start --vmm KIND`; the first is the default


def _name(msg: dict[str, Any]) -> str:
    return fields.text(msg, "name", 48, pattern=VM_NAME, rule=VM_NAME_RULE)


class VmSupervisor:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.runtime: RuntimeDir = host.runtime
        self.vms: dict[str, VmEntry] = {}
        self.successor_cmd: list[str] = [sys.executable, "-m", "luo"]
        self.request_timeout = faults.participant_timeout(120.0)
        self.requests = Requests(lambda c: host.drop_conn(c))
        self.drivers: dict[str, VmmDriver] = {d.kind: d(self.runtime, self.requests)  # type: ignore[call-arg]
                                              for d in DRIVERS}
        # Set by `luo update` around its freeze: the VMs do not pause with the host; each switches
        # to its successor VMM when told the host handed over (docs/design.md), so that the host's
        # freeze and handover are outside every VM's blackout. A plain `luo freeze` pauses them.
        self.switch_after_handover = False
        incoming = [s for s in _incoming_session_names(host) if s.startswith(VM_SESSION_PREFIX)]
        self.expected = {s[len(VM_SESSION_PREFIX):] for s in incoming}

    # -- the VMs, by driver ---------------------------------------------------------------
    def driver(self, v: VmEntry) -> VmmDriver:
        return self.drivers[v.kind]

    def by_driver(self, vms: Sequence[VmEntry]) -> Iterator[tuple[VmmDriver, list[VmEntry]]]:
        for kind, driver in self.drivers.items():
            group = [v for v in vms if v.kind == kind]
            if group:
                yield driver, group

    def running(self) -> list[VmEntry]:
        """The VMs an update carries: registered and answering, not already in an update."""
        return [v for v in self.vms.values() if v.conn is not None and v.link.state == hv.RUNNING]

    def kill_successors(self) -> None:
        for driver, group in self.by_driver(list(self.vms.values())):
            driver.kill_successors(group)

    def set_successor_options(self, options: dict[str, Any]) -> None:
        """What this update asks of every successor VMM (``luo update --qemu PATH``)."""
        for d in self.drivers.values():
            d.successor_options = dict(options)

    def handed_over(self) -> None:
        """The new host confirmed it holds every session: each VM switches (luo.host.update)."""
        for driver, group in self.by_driver([v for v in self.vms.values() if v.serving]):
            driver.hand_over(group)

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"vms": [self.describe(v) for v in self.vms.values()]}

    def describe(self, v: VmEntry) -> dict[str, Any]:
        d: dict[str, Any] = {"name": v.name, "vmm": v.kind, "pid": v.pid, "state": v.state, "link": v.link.state,
                             "session": session_name(v.name), "protocol": v.protocol}
        guest = read_guest_state(self.runtime.vm_dir(v.name))
        if guest is not None:
            d["guest"] = guest
            if v.link.state not in (hv.STARTING, hv.STOPPING, hv.STOPPED):
                # the VMM's own word: paused during a freeze, or lost with its VMM, is never "running"
                d["state"] = guest["state"]
        for k in ("mem", "cpus", "image", "cmdline"):
            if k in v.info:
                d[k] = v.info[k]
        d["console"] = str(self.runtime.vm_dir(v.name) / "console.log")
        d.update(self.driver(v).describe(v))
        return d

    # -- ops --------------------------------------------------------------------------------
    def op_register(self, c: Conn, msg: dict, fds: list[int]) -> Reply:
        """A VMM joins as a participant. ``info`` and ``report`` are kept and shown in the status,
        so they are bounded; the pid in the request is only checked, the socket's credentials say
        who registers."""
        fields.no_fds(fds, "vm_register")
        name = _name(msg)
        fields.integer(msg, "pid", 1, fields.PID_MAX, None)
        info = fields.mapping(msg, "info", 16 << 10, {})
        report = fields.mapping(msg, "report", 64 << 10, None)
        protocol = abi.negotiate("VMM-host protocol", (abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST),
                                 abi.announced(msg), f"the VMM pid {c.peer.pid} of VM {name!r}", "this host")
        old = self.vms.get(name)
        if old is not None and old.conn is not None and old.conn is not c:
            raise LuoError(errno.EEXIST, f"VM {name!r} is already registered by pid {old.pid}")
        if old is not None and old.link.state == hv.STOPPED:
            old = None  # a stopped VM's name is free again
        v = old or VmEntry(name, c.peer.pid, kind=fields.text(info, "vmm", 16, "luo"))
        if v.kind not in self.drivers:
            raise LuoError(errno.EINVAL, f"VM {name!r}: no VMM driver {v.kind!r} here "
                           f"(this host has {', '.join(self.drivers)})")
        pool_ram = info.get("pool")
        if pool_ram is not None:  # guest RAM in the pool: claimed for this VM (restore-once after an update)
            if self.host.pool is None:
                raise LuoError(errno.EINVAL, f"VM {name!r} has its RAM in a memory pool, and this host has none")
            from luo.vmm.live.incoming import pool_extents

            self.host.pool.adopt_vm(name, pool_extents(info) or [])
            self.host.pool_changed()
        v.pid = c.peer.pid
        v.conn = c
        if v.successor is not None and v.successor.pid == v.pid:
            v.successor = None  # the successor VMM took the guest over: it is the VM's VMM now
        v.info = info
        v.report = report
        v.protocol = protocol
        v.link.feed(hv.REGISTERED)
        self.vms[name] = v
        c.on_close = lambda: self._gone(v, c)
        log.info("vm %s registered by VMM pid %d (VMM-host protocol %d)", name, v.pid, protocol)
        return ok(**abi.announce(abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST)), []

    def _gone(self, v: VmEntry, c: Conn) -> None:
        if v.conn is c:
            v.conn = None
            v.exit_code = v.proc.poll() if v.proc else None
            v.link.feed(hv.EOF)
            log.info("vm %s: VMM pid %d is gone", v.name, v.pid)

    def op_start(self, c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Every field is checked before the VM's directory or process exists."""
        fields.no_fds(fds, "vm_start")
        name = _name(msg)
        kind = fields.text(msg, "vmm", 16, DRIVERS[0].kind)  # its options are checked by the driver
        driver = self.drivers.get(kind)
        if driver is None:
            raise fields.refuse("vmm", f"names no VMM driver of this host: {kind!r} (known: {', '.join(self.drivers)})")
        spec = VmSpec(name, fields.size(msg, "mem", 1 << 20, 1 << 40, 256 << 20), fields.integer(msg, "cpus", 1, 64, 2),
                      driver.options(msg))
        timeout = fields.finite(msg, "timeout", 0, 3600, 60.0)
        no_pool = fields.boolean(msg, "no_pool", False)
        if name in self.vms and self.vms[name].conn is not None:
            raise LuoError(errno.EEXIST, f"VM {name!r} is already running (pid {self.vms[name].pid})")
        if name in self.expected and name not in self.vms:
            raise LuoError(errno.EEXIST, f"VM {name!r} crossed the last update and its VMM has not registered yet")
        pool = self.host.pool
        owner = VM_SESSION_PREFIX + name
        if pool is not None and pool.alloc.extents_of(owner):
            raise LuoError(errno.EEXIST, f"VM {name!r} still has RAM in the pool (its VMM may register again after "
                           f"a crash or an update); `luo vm stop {name}`, or `luo pool free {owner} --force` once "
                           "it is surely gone")
        if pool is not None and not no_pool and driver.pool_ok(spec):  # guest RAM from the host's pool
            extents = pool.allocate(owner, spec.mem)  # ENOMEM says what is free
            if len(extents) > driver.pool_extents_max:
                pool.free(owner)
                raise LuoError(errno.ENOMEM, f"a {kind} VM's RAM must be at most {driver.pool_extents_max} "
                               f"extent(s) of the pool, and no such run of {spec.mem >> 20} MiB is free (largest "
                               f"free extent {pool.alloc.stats().largest_free >> 20} MiB); use --no-pool")
            spec.options.update(pool_fd=pool.memory.fd, pool_extents=[(e.offset, e.length) for e in extents])
            self.host.pool_changed()
        vdir = self.runtime.vm_dir(name)
        try:
            vdir.mkdir(parents=True, exist_ok=True)
            proc = driver.start(spec, vdir)
        except BaseException:
            self._release_ram(name)
            raise
        v = VmEntry(name, proc.pid, kind=kind, proc=proc)
        self.vms[name] = v

        def poll() -> Reply | None:
            if v.link.state != hv.STARTING:
                return ok(vm=self.describe(v)), []
            if proc.poll() is not None:
                self._release_ram(name)  # its VMM never ran the guest
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
        name = _name(msg)
        v = self.vms.get(name)
        if v is not None and v.conn is None and v.proc is not None and v.proc.poll() is not None:
            self._release_ram(name)  # its VMM (started by this host) is dead: nothing runs the guest
            return ok(), []
        if v is None or v.conn is None:
            raise LuoError(errno.ENOENT, f"no running VM {name!r}")
        if v.link.state in hv.HOST_IN_UPDATE:
            raise LuoError(errno.EBUSY, f"VM {name!r} is {v.link.state} for a live update; "
                           "stop it after the update (or `luo cancel`)")
        self.driver(v).stop(v, 30.0)
        self._release_ram(name)
        return ok(), []

    def _release_ram(self, name: str) -> None:
        """The VM's pool extents, if any, back to the pool (scrubbed before anyone else gets them):
        only once its VMM is gone, never while a guest may run on them."""
        pool = self.host.pool
        if pool is not None and pool.alloc.extents_of(VM_SESSION_PREFIX + name):
            try:
                pool.free(VM_SESSION_PREFIX + name)
            except LuoError as e:  # (EBUSY: an update is under way) the extents stay, said so
                log.error("vm %s: its pool memory is not released (%s); `luo pool free vm:%s --force` after "
                          "the update", name, e, name)
            self.host.pool_changed()

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
        """The last update's record with every VM's blackout report and timeline, written once
        to ``updates/NNNNNN.json`` when the VMs have reported."""
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
                write_atomic(path, json.dumps(rec, indent=1) + "\n")
        return rec


def _incoming_session_names(host: Host) -> list[str]:
    from luo.host.ops import sessions_of

    return [s["name"] for s in sessions_of(host) if s.get("direction") == "in"]


def _tail(path: os.PathLike[str] | str, n: int = 400) -> str:
    """The last line of a VMM's log, for the error of a VMM that exited before registering."""
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
