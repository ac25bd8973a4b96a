"""A QEMU process as the machine a luo VMM process runs: the same interface as ``luo.vmm.vm.Vm``
(``pause``, ``save``, ``restore``, ``start``, ``stop``, ``paused``, ``memfd``), so the live-update
protocol of ``luo.vmm.live`` (warm a successor, saved, go, resumed, the fallbacks and the
ownership rule) carries QEMU VMs unchanged.

How QEMU's own mechanism maps onto it (docs/qemu.md):

- The guest's RAM is a memfd luo creates and preserves in the VM's session, given to QEMU as a
  shared file memory backend on an inherited fd. It never moves.
- The successor QEMU is started at warm-up with the same memfd, ``-incoming defer`` and ``-S``
  (it will not run the guest until told), and listens for the migration stream.
- ``pause`` is QMP ``stop``; ``save`` is ``migrate`` with ``x-ignore-shared``: only device state
  moves (a few hundred KB), the RAM is the shared memfd; ``restore`` waits until the successor
  QEMU has loaded it; ``start`` is ``cont`` (on the successor: the ``go`` of the protocol; on the
  old QEMU after a failure: taking the guest back).
- A QEMU that would have to send the RAM (no ``x-ignore-shared``) is refused when it is started,
  so an update is refused at prepare, before the guest stops.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
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


@dataclass
class QemuConfig:
    """What a QEMU VM is started with; the successor starts its QEMU the same way (``info``)."""

    qemu: str
    kernel: str
    initrd: str
    append: str
    accel: str = "tcg"
    machine: str = "pc"  # resolved to the versioned type at boot (pc-i440fx-7.2), which migration needs

    def info(self) -> dict[str, Any]:
        return {"vmm": "qemu", "qemu": self.qemu, "kernel": self.kernel, "initrd": self.initrd,
                "append": self.append, "accel": self.accel, "machine": self.machine}

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
    qmp: Qmp
    console: ConsoleRelay
    vdir: Path
    running: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    last_migration: dict[str, Any] = field(default_factory=dict)

    kind = "qemu"

    # -- starting -----------------------------------------------------------------------------
    @classmethod
    def _launch(cls, name: str, mem: int, cpus: int, memfd: int, vdir: Path, config: QemuConfig,
                incoming: bool) -> QemuMachine:
        tag = "next" if incoming else "run"
        qmp_path = vdir / f"qmp-{tag}-{os.getpid()}.sock"
        con_path = vdir / f"console-{tag}-{os.getpid()}.sock"
        for p in (qmp_path, con_path):
            p.unlink(missing_ok=True)
        fd = os.dup(memfd)  # inherited by QEMU under its own number
        os.set_inheritable(fd, True)
        argv = [config.qemu, "-name", f"luo-qemu:{name}", "-nodefaults", "-no-user-config", "-display", "none",
                "-accel", choose_accel(config.accel), "-machine", f"{config.machine},memory-backend=ram0",
                "-m", f"{mem >> 20}M", "-smp", str(cpus),
                "-object", f"memory-backend-file,id=ram0,size={mem >> 20}M,mem-path=/proc/self/fd/{fd},share=on",
                "-kernel", config.kernel, "-initrd", config.initrd, "-append", config.append,
                "-chardev", f"socket,id=con0,path={con_path},server=on,wait=off", "-serial", "chardev:con0",
                "-qmp", f"unix:{qmp_path},server=on,wait=off", "-S"]
        if incoming:
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
        try:
            qmp = Qmp(str(qmp_path), START_TIMEOUT, gone=lambda: proc.poll() is not None)
            console = ConsoleRelay(str(con_path), str(vdir / "console.log"), START_TIMEOUT)
        except LuoError as e:
            proc.kill()
            proc.wait()
            raise LuoError(e.errno, f"QEMU pid {proc.pid} for {name}: {e.message}; see {vdir / 'qemu.log'}") from None
        m = cls(name, mem, cpus, memfd, config, proc, qmp, console, vdir)
        try:
            m._require_shared_migration()
        except LuoError:
            m.stop()
            raise
        return m

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
    def boot(cls, name: str, mem: int, cpus: int, vdir: Path, config: QemuConfig) -> QemuMachine:
        """A new VM: the RAM memfd, QEMU on it (not running yet: the caller preserves the memfd
        first), the versioned machine type resolved."""
        memfd = os.memfd_create(f"luo-vm:{name}:ram", os.MFD_CLOEXEC)
        os.ftruncate(memfd, mem)
        m = cls._launch(name, mem, cpus, memfd, vdir, config, incoming=False)
        m.config.machine = m._resolved_machine()
        return m

    def _resolved_machine(self) -> str:
        """The versioned machine type behind the alias: a newer QEMU's ``pc`` is another machine."""
        for mt in self.qmp.execute("query-machines") or []:
            if isinstance(mt, dict) and mt.get("alias") == self.config.machine and isinstance(mt.get("name"), str):
                return mt["name"]
        return self.config.machine

    @classmethod
    def incoming(cls, name: str, mem: int, cpus: int, memfd: int, vdir: Path, config: QemuConfig) -> QemuMachine:
        """The successor's QEMU: same memfd, listening for the device state, not running."""
        m = cls._launch(name, mem, cpus, memfd, vdir, config, incoming=True)
        uri = m.migrate_uri
        Path(uri.removeprefix("unix:")).unlink(missing_ok=True)
        m.qmp.execute("migrate-incoming", {"uri": uri})
        return m

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
        self.timings["resume"] = round((time.perf_counter() - t0) * 1000, 3)

    def pause(self) -> None:
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
        if cancel:  # slow enough to be caught half way, every time
            self.qmp.execute("migrate-set-parameters", {"max-bandwidth": 4096})
        self.qmp.execute("migrate", {"uri": self.migrate_uri})
        if cancel:
            self._migration_until("active", since)
            self.qmp.execute("migrate_cancel")
        status = self._migration_end(since)
        info = self.qmp.execute("query-migrate") or {}
        if status != "completed":
            raise LuoError(errno.EIO, f"QEMU migration of {self.name} {status}: {info.get('error-desc', '')}")
        ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
        self.last_migration = {"bytes": int(ram.get("transferred", 0) or 0),
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
        self.last_migration = {k: rec.get(k) for k in ("bytes", "total_time_ms", "downtime_ms", "stop_wall_ns")}
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
        self.timings["restore"] = round((time.perf_counter() - t0) * 1000, 3)

    def resume_wall_ns(self) -> int | None:
        ev = next((e for e in reversed(self.qmp.events) if e.name == "RESUME"), None)
        return ev.wall_ns if ev else None

    def entered(self, timeout: float = 1.0) -> list[int]:
        return []  # QEMU's vCPU threads are its own

    def stop(self) -> None:
        """Quit QEMU and wait for it (killed if it does not go)."""
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit", timeout=2.0)
            except LuoError:
                pass
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.running = False
        self.console.drain()
        self.console.close()
        self.qmp.close()

    @property
    def stopped_reason(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"QEMU exited with {code}"
