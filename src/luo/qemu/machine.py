"""A QEMU process as the machine a luo VMM process runs: the same interface as ``luo.vmm.vm.Vm``
(``pause``, ``save``, ``restore``, ``start``, ``stop``, ``paused``, ``memfd``), so the live-update
protocol of ``luo.vmm.live`` (warm a successor, saved, go, resumed, the fallbacks and the
ownership rule) carries QEMU VMs unchanged.

How QEMU's own mechanism maps onto it (docs/qemu.md):

- The guest's RAM is a memfd luo creates and preserves in the VM's session, given to QEMU as a
  shared file memory backend on an inherited fd. It never moves.
- The successor QEMU is started at warm-up with the same memfd and ``-S`` (it will not run the
  guest until told), listening for the migration stream, in one of two modes (``MODES``, chosen
  by the successor, ``choose_mode``):
  - ``x-ignore-shared`` (any QEMU here, 7.2 up): ``-incoming defer``; QMP answers at warm-up;
    ``migrate`` with the ``x-ignore-shared`` capability moves only device state (a few hundred KB).
  - ``cpr-transfer`` (QEMU >= 10.0 on both sides, the old one started with ``aux-ram-share=on``):
    ``-incoming`` main and cpr channels; the new QEMU blocks reading the cpr state (the memory fds,
    passed over the cpr socket) before it builds the machine, so its QMP answers only after the
    migration started; that is why it connects in ``restore``.
- In an update the old QEMU is *not* stopped first: ``save`` migrates the running guest and QEMU
  stops it at the switchover itself, so the successor's start-up (all of it, in cpr-transfer)
  happens while the guest still runs (docs/qemu.md: stopping first made cpr-transfer's blackout
  22 ms instead of 3.4). ``pause`` is QMP ``stop`` where nobody waits to take the guest (a plain
  freeze). ``restore`` waits until the successor QEMU has loaded the state; ``start`` is ``cont``
  (on the successor: the ``go`` of the protocol; on the old QEMU after a failure: taking it back).
- A QEMU that would have to send the RAM (no ``x-ignore-shared``) is refused when it is started,
  so an update is refused at prepare, before the guest stops.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luo.abi import QEMU_STATE_RECORD_FORMAT
from luo.errors import LuoError
from luo.host import faults
from luo.qemu.console import ConsoleRelay
from luo.qemu.qmp import Qmp

log = logging.getLogger("luo.vmm")

RECORD_FORMAT = QEMU_STATE_RECORD_FORMAT
MIGRATE_TIMEOUT = 30.0
MAX_BANDWIDTH = 16 << 30  # bytes/s: no limit in effect; the stream is a local socket
START_TIMEOUT = 30.0

MODE_SHARED = "x-ignore-shared"
MODE_CPR = "cpr-transfer"
MODES = (MODE_SHARED, MODE_CPR)


@functools.cache
def supports_cpr(qemu: str) -> bool:
    """Whether ``qemu`` can take part in cpr-transfer (QEMU >= 10.0): told by the machine option
    that mode needs, ``aux-ram-share``, which 7.2 lacks. Asked once per binary (about 50 ms)."""
    try:
        out = subprocess.run([qemu, "-machine", "pc,help"], capture_output=True, text=True, timeout=20,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "aux-ram-share" in out.stdout


@functools.cache
def supports_offset(qemu: str) -> bool:
    """Whether ``qemu``'s file memory backend takes an ``offset`` into its file (not 7.2's): what
    guest RAM in an extent of the host's memory pool needs."""
    try:
        out = subprocess.run([qemu, "-object", "memory-backend-file,help"], capture_output=True, text=True,
                             timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "offset=" in out.stdout


def choose_mode(predecessor_info: dict[str, Any], qemu: str) -> str:
    """The successor's choice: cpr-transfer when its QEMU can receive it and the running QEMU can
    send it (it said so when it registered: started with ``aux-ram-share=on``); else
    x-ignore-shared, which every QEMU here does."""
    return MODE_CPR if predecessor_info.get("cpr") is True and supports_cpr(qemu) else MODE_SHARED


@dataclass
class QemuConfig:
    """What a QEMU VM is started with; the successor starts its QEMU the same way (``info``)."""

    qemu: str
    kernel: str
    initrd: str
    append: str
    accel: str = "tcg"
    machine: str = "pc"  # resolved to the versioned type at boot (pc-i440fx-7.2), which migration needs
    cpr: bool = False  # started with aux-ram-share=on: can send cpr-transfer (set at launch)

    def info(self) -> dict[str, Any]:
        return {"vmm": "qemu", "qemu": self.qemu, "kernel": self.kernel, "initrd": self.initrd,
                "append": self.append, "accel": self.accel, "machine": self.machine, "cpr": self.cpr}

    @classmethod
    def from_info(cls, info: dict[str, Any], qemu: str | None = None) -> QemuConfig:
        def text(k: str) -> str:
            v = info.get(k)
            if not isinstance(v, str) or len(v) > 4096:
                raise LuoError(errno.EINVAL, f"the QEMU VM's {k!r} must be a string, not {v!r:.80}")
            return v
        return cls(qemu or text("qemu"), text("kernel"), text("initrd"), text("append"), text("accel"), text("machine"))


def _die_with_parent() -> None:
    """In the child before exec: QEMU dies with the luo VMM process that started it. The two are
    one VMM (as our own VMM's vCPU threads are its process): a successor killed by the rollback
    takes its never-resumed QEMU with it, and no QEMU outlives the process that answers for it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def choose_accel(asked: str) -> str:
    """``auto``: KVM only where it can run a stock guest, i.e. hardware virtualisation (vmx/svm in
    /proc/cpuinfo) behind /dev/kvm; a PVM /dev/kvm (this project's machines) runs no stock kernel
    under QEMU (qemu-notes.md), so TCG."""
    if asked != "auto":
        return asked
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    hw = any(w in ("vmx", "svm") for line in flags.splitlines() if line.startswith("flags")
             for w in line.split())
    return "kvm" if hw and os.path.exists("/dev/kvm") else "tcg"


@dataclass
class QemuMachine:
    name: str
    mem_bytes: int
    ncpus: int
    memfd: int
    config: QemuConfig
    proc: subprocess.Popen[bytes]
    monitor: Qmp | None  # None until a cpr-transfer successor has read its cpr state
    relay: ConsoleRelay | None
    vdir: Path
    tag: str
    running: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    last_migration: dict[str, Any] = field(default_factory=dict)
    mode: str = MODE_SHARED  # the mode of the coming (old QEMU) or the incoming (successor) migration
    ram_offset: int | None = None  # guest RAM at this offset of ``memfd`` (an extent of the host's pool)
    live_switch: bool = False  # a successor waits: save migrates the running guest, QEMU stops it
    set_up_pending: bool = False  # a cpr-transfer successor's migration set-up, done after the resume
    watcher: threading.Thread | None = None  # a cpr-transfer successor: connects as soon as QMP exists
    watch_error: LuoError | None = None
    unwatch: threading.Event = field(default_factory=threading.Event)

    kind = "qemu"

    @property
    def qmp(self) -> Qmp:
        if self.monitor is None:
            raise LuoError(errno.EIO, f"QEMU pid {self.proc.pid} of {self.name} has no QMP connection yet")
        return self.monitor

    @property
    def console(self) -> ConsoleRelay:
        if self.relay is None:
            raise LuoError(errno.EIO, f"QEMU pid {self.proc.pid} of {self.name} has no console connection yet")
        return self.relay

    # -- starting -----------------------------------------------------------------------------
    @classmethod
    def _launch(cls, name: str, mem: int, cpus: int, memfd: int, vdir: Path, config: QemuConfig,
                incoming: str | None, ram_offset: int | None = None) -> QemuMachine:
        """``incoming``: None (a new guest), or the mode a successor QEMU receives it in."""
        tag = f"{'next' if incoming else 'run'}-{os.getpid()}"
        qmp_path, con_path = vdir / f"qmp-{tag}.sock", vdir / f"console-{tag}.sock"
        for p in (qmp_path, con_path, vdir / "migrate.sock", vdir / "cpr.sock"):
            p.unlink(missing_ok=True)
        config.cpr = supports_cpr(config.qemu)
        fd = os.dup(memfd)  # inherited by QEMU under its own number
        os.set_inheritable(fd, True)
        argv = [config.qemu, "-name", f"luo-qemu:{name}", "-nodefaults", "-no-user-config", "-display", "none",
                "-accel", choose_accel(config.accel),
                "-machine", f"{config.machine},memory-backend=ram0{',aux-ram-share=on' if config.cpr else ''}",
                "-m", f"{mem >> 20}M", "-smp", str(cpus),
                "-object", f"memory-backend-file,id=ram0,size={mem >> 20}M,mem-path=/proc/self/fd/{fd},share=on"
                + (f",offset={ram_offset}" if ram_offset is not None else ""),
                "-kernel", config.kernel, "-initrd", config.initrd, "-append", config.append,
                "-chardev", f"socket,id=con0,path={con_path},server=on,wait=off", "-serial", "chardev:con0",
                "-qmp", f"unix:{qmp_path},server=on,wait=off", "-S"]
        if incoming == MODE_CPR:
            argv += ["-incoming", json.dumps(_channel("main", vdir / "migrate.sock")),
                     "-incoming", json.dumps(_channel("cpr", vdir / "cpr.sock"))]
        elif incoming:
            argv += ["-incoming", "defer"]
        logf = open(vdir / "qemu.log", "ab")
        try:
            proc = subprocess.Popen(argv, pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as e:
            raise LuoError(errno.ENOEXEC, f"cannot start QEMU {config.qemu!r}: {e.strerror}") from None
        finally:
            logf.close()
            os.close(fd)
        m = cls(name, mem, cpus, memfd, config, proc, None, None, vdir, tag, mode=incoming or MODE_SHARED,
                ram_offset=ram_offset)
        try:
            if incoming == MODE_CPR:  # it blocks on the cpr channel: no QMP until the migration starts
                m._wait_listening(vdir / "cpr.sock")
                m.watcher = threading.Thread(target=m._connect_when_up, name="qmp-watch", daemon=True)
                m.watcher.start()
            else:
                m._connect()
        except LuoError as e:
            m.stop()
            raise LuoError(e.errno, f"QEMU pid {proc.pid} for {name}: {e.message}; see {vdir / 'qemu.log'}") from None
        return m

    def _connect(self, set_up: bool = True) -> None:
        """QMP and the console; then (``set_up``) the migration set-up every QEMU of ours has."""
        gone = lambda: self.proc.poll() is not None  # noqa: E731
        self.monitor = Qmp(str(self.vdir / f"qmp-{self.tag}.sock"), START_TIMEOUT, gone=gone)
        self.relay = ConsoleRelay(str(self.vdir / f"console-{self.tag}.sock"), str(self.vdir / "console.log"),
                                  START_TIMEOUT)
        if set_up:
            self._require_shared_migration()

    def _connect_when_up(self) -> None:
        """A cpr-transfer successor's QMP and console appear once its QEMU has read the cpr state,
        at the start of the migration, while the guest still runs on the old QEMU; connecting then,
        not after the migration, keeps both connects out of the blackout (restore joins this)."""
        qmp = self.vdir / f"qmp-{self.tag}.sock"
        while not qmp.exists():
            if self.unwatch.wait(0.002) or self.proc.poll() is not None:
                self.watch_error = LuoError(errno.ECHILD, f"QEMU pid {self.proc.pid} exited or was stopped "
                                            "before it read the cpr state")
                return
        try:
            self._connect(set_up=False)
        except LuoError as e:
            self.watch_error = e

    def _wait_listening(self, path: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not path.exists():
            if self.proc.poll() is not None:
                raise LuoError(errno.ECHILD, f"QEMU exited with {self.proc.returncode} before it listened")
            if time.monotonic() >= deadline:
                raise LuoError(errno.ETIMEDOUT, f"QEMU did not listen on {path} in {START_TIMEOUT:.0f} s")
            time.sleep(0.005)

    def _require_shared_migration(self) -> None:
        """Refuse a QEMU that would send the guest's RAM through the migration stream."""
        caps = self.qmp.execute("query-migrate-capabilities") or []
        names = {c.get("capability") for c in caps if isinstance(c, dict)}
        if "x-ignore-shared" not in names:
            raise LuoError(errno.EOPNOTSUPP, f"QEMU {self.config.qemu} has no x-ignore-shared migration capability: "
                           "it would copy the guest's RAM; refused")
        self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]})
        # QEMU rate-limits a migration to 32 MiB/s by default: the ~200 KB of device state then
        # takes ~6 ms of the blackout on a stopped guest, for nothing (nothing else shares the link)
        self.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})

    @classmethod
    def boot(cls, name: str, mem: int, cpus: int, vdir: Path, config: QemuConfig,
             pool: tuple[int, int] | None = None) -> QemuMachine:
        """A new VM: the RAM memfd (or ``pool``: (the pool's memfd, the offset of the VM's extent)),
        QEMU on it (not running yet: the caller preserves the memfd first), the versioned machine
        type resolved."""
        if pool is None:
            memfd, offset = os.memfd_create(f"luo-vm:{name}:ram", os.MFD_CLOEXEC), None
            os.ftruncate(memfd, mem)
        else:
            memfd, offset = pool
        m = cls._launch(name, mem, cpus, memfd, vdir, config, incoming=None, ram_offset=offset)
        m.config.machine = m._resolved_machine()
        return m

    def _resolved_machine(self) -> str:
        """The versioned machine type behind the alias: a newer QEMU's ``pc`` is another machine."""
        for mt in self.qmp.execute("query-machines") or []:
            if isinstance(mt, dict) and mt.get("alias") == self.config.machine and isinstance(mt.get("name"), str):
                return mt["name"]
        return self.config.machine

    @classmethod
    def incoming(cls, name: str, mem: int, cpus: int, memfd: int, vdir: Path, config: QemuConfig,
                 mode: str = MODE_SHARED, ram_offset: int | None = None) -> QemuMachine:
        """The successor's QEMU: same memfd, listening for the device state (``mode``), not running."""
        if ram_offset is not None and not supports_offset(config.qemu):
            raise LuoError(errno.EOPNOTSUPP, f"the VM's RAM is an extent of the host's memory pool, and QEMU "
                           f"{config.qemu} cannot map part of a file (no memory-backend-file offset)")
        m = cls._launch(name, mem, cpus, memfd, vdir, config, incoming=mode, ram_offset=ram_offset)
        if mode == MODE_SHARED:
            m.qmp.execute("migrate-incoming", {"uri": m.migrate_uri})
        return m

    def use_mode(self, mode: str) -> None:
        """On the old QEMU, at prepare (outside the blackout): the successor waits in ``mode``."""
        if self.set_up_pending:  # left over from the resume that brought the guest here
            self._require_shared_migration()
            self.set_up_pending = False
        if mode not in MODES or (mode == MODE_CPR and not self.config.cpr):
            raise LuoError(errno.EPROTO, f"the successor asks for migration mode {str(mode)[:40]!r}, which "
                           f"QEMU {self.config.qemu} of {self.name} cannot send")
        if self.config.cpr:
            self.qmp.execute("migrate-set-parameters", {"mode": "cpr-transfer" if mode == MODE_CPR else "normal"})
        self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": mode == MODE_SHARED}]})
        self.mode = mode
        self.live_switch = True

    @property
    def migrate_uri(self) -> str:
        return f"unix:{self.vdir / 'migrate.sock'}"

    # -- the Vm interface ---------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return not self.running

    def start(self) -> None:
        t0 = time.perf_counter()
        self.qmp.execute("cont")
        self.running = True
        self.live_switch = False
        self.timings["resume"] = round((time.perf_counter() - t0) * 1000, 3)
        if self.set_up_pending:  # off the blackout: the guest runs already, so nothing may fail now
            try:
                self._require_shared_migration()
                self.set_up_pending = False
            except LuoError as e:  # tried again at the next update's prepare (use_mode)
                log.warning("vm %s: QEMU's migration set-up failed after the resume (%s); retried at the next "
                            "update", self.name, e)

    def pause(self) -> None:
        """Stop the guest, unless a successor waits for it (then ``save`` migrates it running)."""
        if self.live_switch:
            self.timings["pause"] = 0.0
            return
        t0 = time.perf_counter()
        if self.running:
            self.qmp.execute("stop")
            self.running = False
        self.console.drain()  # everything the guest printed before it stopped, before anyone else prints
        self.timings["pause"] = round((time.perf_counter() - t0) * 1000, 3)

    def save(self) -> bytes:
        """Migrate the device state into the successor QEMU (listening at ``migrate_uri``); the
        record written to the state memfd says what moved."""
        t0 = time.perf_counter()
        since = len(self.qmp.events)
        cancel = faults.enabled("qemu-migration-cancelled")
        if cancel:  # held just before the switchover (the guest stopped, the successor has the stream
            # open and, in cpr-transfer, the memory fds), so the cancel comes half way every time
            self.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "pause-before-switchover", "state": True}]})
        if self.mode == MODE_CPR:
            self.qmp.execute("migrate", {"channels": [_channel("main", self.vdir / "migrate.sock"),
                                                      _channel("cpr", self.vdir / "cpr.sock")]})
        else:
            self.qmp.execute("migrate", {"uri": self.migrate_uri})
        if cancel:
            self._migration_until("pre-switchover", since)
            self.qmp.execute("migrate_cancel")
        status = self._migration_end(since)
        info = self.qmp.execute("query-migrate") or {}
        live = self.live_switch
        if self.live_switch:  # QEMU stopped the guest at the switchover, or (failed) runs it still
            self.running = (self.qmp.execute("query-status") or {}).get("status") == "running"
            self.live_switch = False
            self.console.drain()  # everything it printed before it stopped, before anyone else prints
        if status != "completed":
            raise LuoError(errno.EIO, f"QEMU migration of {self.name} {status}: {info.get('error-desc', '')}")
        ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
        self.last_migration = {"mode": self.mode, "live": live, "bytes": int(ram.get("transferred", 0) or 0),
                               "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime")}
        stop = next((e for e in reversed(self.qmp.events) if e.name == "STOP"), None)
        record = {"format": RECORD_FORMAT, "machine": self.config.machine, **self.last_migration,
                  "stop_wall_ns": stop.wall_ns if stop else None}
        self.timings["save"] = round((time.perf_counter() - t0) * 1000, 3)
        return json.dumps(record).encode()

    def _migration_until(self, wanted: str, since: int) -> None:
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            ev = self.qmp.wait_event("MIGRATION", max(0.0, deadline - time.monotonic()), since)
            since = self.qmp.events.index(ev) + 1
            if ev.data.get("status") == wanted:
                return

    def _migration_end(self, since: int) -> str:
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            ev = self.qmp.wait_event("MIGRATION", max(0.0, deadline - time.monotonic()), since)
            since = self.qmp.events.index(ev) + 1
            status = str(ev.data.get("status"))
            if status in ("completed", "failed", "cancelled"):
                return status

    def restore(self, record: bytes) -> None:
        """Wait until this (incoming) QEMU has loaded the device state the old one sent."""
        t0 = time.perf_counter()
        try:
            rec = json.loads(record)
        except ValueError:
            raise LuoError(errno.EPROTO, "the QEMU VM's state record is not JSON") from None
        if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
            raise LuoError(errno.EPROTO, f"the QEMU VM's state record is not {RECORD_FORMAT}")
        self.last_migration = {k: rec.get(k) for k in ("mode", "bytes", "total_time_ms", "downtime_ms", "stop_wall_ns")}
        late = self.watcher is not None
        if self.watcher is not None:  # cpr-transfer: connected (or connecting) since the migration started
            self.watcher.join(MIGRATE_TIMEOUT)
            self.watcher = None
            if self.watch_error is not None or self.monitor is None:
                raise self.watch_error or LuoError(errno.ETIMEDOUT, f"QEMU pid {self.proc.pid}: no QMP in time")
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            status = (self.qmp.execute("query-status") or {}).get("status")
            if status != "inmigrate":
                break
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise LuoError(errno.ETIMEDOUT, f"QEMU pid {self.proc.pid} did not load {self.name}'s state")
            time.sleep(0.0005)  # QEMU sends no event when the incoming side has loaded (7.2): poll
        if status != "paused":
            raise LuoError(errno.EIO, f"QEMU pid {self.proc.pid} is {status} after loading {self.name}'s state")
        self.set_up_pending = late  # not while a migration comes in; after the resume (start)
        self.timings["restore"] = round((time.perf_counter() - t0) * 1000, 3)

    @property
    def stopped_at_ns(self) -> int | None:
        """When QEMU stopped the guest in the last live switch, on CLOCK_MONOTONIC (QEMU dates its
        events with the wall clock): where the guest's blackout really began."""
        if not self.last_migration or self.last_migration.get("live") is not True:
            return None
        stop = next((e for e in reversed(self.qmp.events) if e.name == "STOP"), None)
        if stop is None:
            return None
        return time.monotonic_ns() - (time.time_ns() - stop.wall_ns)

    def resume_wall_ns(self) -> int | None:
        ev = next((e for e in reversed(self.qmp.events) if e.name == "RESUME"), None)
        return ev.wall_ns if ev else None

    def entered(self, timeout: float = 1.0) -> list[int]:
        return []  # QEMU's vCPU threads are its own

    def stop(self) -> None:
        """Quit QEMU and wait for it (killed if it does not go)."""
        self.unwatch.set()
        if self.watcher is not None:
            self.watcher.join(START_TIMEOUT)
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit", timeout=2.0)
            except LuoError:  # no QMP (yet): a cpr-transfer successor still waiting, or a dead one
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.running = False
        if self.relay is not None:
            self.relay.drain()
            self.relay.close()
        if self.monitor is not None:
            self.monitor.close()

    @property
    def stopped_reason(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"QEMU exited with {code}"


def _channel(kind: str, path: Path) -> dict[str, Any]:
    """A migration channel (QEMU >= 9.1's ``channels`` / JSON ``-incoming``) on a Unix socket."""
    return {"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": str(path)}}
