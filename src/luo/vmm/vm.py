"""A VM: KVM VM fd, guest RAM memfd, in-kernel irqchip/PIT, vCPUs, the two consoles.

Built for live update: ``Vm.create`` does everything expensive (VM fd, memslots, vCPUs with
CPUID, MSR probing, the prepared save and restore batches of luo.vmm.saveplan) and may be called
around an existing RAM memfd by a successor *before* the predecessor pauses; the blackout is then
just pause → save → restore → start.
"""

from __future__ import annotations

import ctypes as C
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from luo.errors import LuoError
from luo.vmm import loader
from luo.vmm.bus import Bus
from luo.vmm.devices.clock import KvmClock
from luo.vmm.devices.console_sink import ConsoleSink, StreamConsoleSink
from luo.vmm.devices.irqchip import IrqChip, Pit
from luo.vmm.devices.mmio_console import MMIO_CONSOLE_GPA, MMIO_CONSOLE_SIZE, MmioConsole
from luo.vmm.devices.uart16550 import COM1_IRQ, COM1_PORT, Uart16550
from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.sys import ioctl
from luo.vmm.kvm.system import KvmSystem
from luo.vmm.memory import GuestMemory
from luo.vmm.saveplan import RestorePlan, SavePlan, restore_v2
from luo.vmm.state import RECORD_VERSION, build_record, parse_record, record_version
from luo.vmm.vcpu import Vcpu, install_kick_handler

log = logging.getLogger("luo.vmm")

TSS_ADDR = 0xFFFBD000  # 3 pages below the identity-map page, in the MMIO hole (as Firecracker)
IDENTITY_MAP_ADDR = 0xFFFBC000
PAUSE_TIMEOUT = 5.0


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class Vm:
    """One guest. Public: name, ncpus, memfd, mem_bytes, extents, timings, stopped, stop_reason, on_guest_stop.

    ``on_guest_stop(reason)`` runs on the vCPU thread that saw the guest stop (shutdown, internal
    error, failed entry): keep it short; calling stop() from it is allowed.
    """

    mem: GuestMemory
    console: ConsoleSink
    irqchip: IrqChip
    pit: Pit
    clock: KvmClock
    uart: Uart16550
    mmio_console: MmioConsole
    ports: Bus
    mmio: Bus
    _save_plan: SavePlan
    _restore_plan: RestorePlan

    def __init__(self) -> None:  # use Vm.create
        self.name = ""
        self.ncpus = 0
        self.fd = -1
        self.vcpus: list[Vcpu] = []
        self.timings: dict[str, float] = {}
        self.stopped = threading.Event()
        self.stop_reason: str | None = None
        self.on_guest_stop: Callable[[str], None] | None = None
        self._running = False
        self._booted_or_restored = False
        self._lock = threading.Lock()

    # --- construction ---

    @classmethod
    def create(
        cls,
        name: str,
        mem_bytes: int,
        ncpus: int,
        memfd: int | None = None,
        console: ConsoleSink | None = None,
        extents: Sequence[tuple[int, int]] | None = None,
    ) -> Vm:
        """A VM with RAM (new memfd, or ``memfd`` untouched), devices and vCPUs, not yet running.

        ``extents``: RAM is these ``(offset, length)`` pieces of ``memfd`` in this order (a memory
        pool's allocation), not the memfd from offset 0; a successor passes the same ones."""
        if not 1 <= ncpus <= 255:
            raise LuoError(errno.EINVAL, f"a VM needs 1 to 255 vCPUs, not {ncpus}")
        install_kick_handler()
        t0 = time.perf_counter()
        kvm = KvmSystem.get()
        vm = cls()
        vm.name, vm.ncpus = name, ncpus
        vm.console = console or StreamConsoleSink()
        vm.mem = GuestMemory(name, mem_bytes, memfd, extents)
        try:
            vm.fd = ioctl(kvm.fd, K.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            ioctl(vm.fd, K.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
            ioctl(vm.fd, K.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(IDENTITY_MAP_ADDR), "KVM_SET_IDENTITY_MAP_ADDR")
            vm.irqchip = IrqChip(vm.fd)
            vm.pit = Pit(vm.fd)
            vm.clock = KvmClock(vm.fd)
            for s in vm.mem.slots:
                region = S.KvmUserspaceMemoryRegion(s.slot, 0, s.gpa, s.size, vm.mem.addr + s.file_offset)
                ioctl(vm.fd, K.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
            vm.uart = Uart16550(vm.console, lambda level: vm.irqchip.set_irq(COM1_IRQ, level))
            vm.mmio_console = MmioConsole(ncpus, vm.console)
            vm.ports, vm.mmio = Bus(), Bus()
            vm.ports.add(COM1_PORT, 8, vm.uart)
            vm.mmio.add(MMIO_CONSOLE_GPA, MMIO_CONSOLE_SIZE, vm.mmio_console)
            for i in range(ncpus):
                vm.vcpus.append(Vcpu(vm.fd, i, ncpus, vm.ports, vm.mmio, vm._vcpu_stopped))
            vm._save_plan = SavePlan(vm)
            vm._restore_plan = RestorePlan(vm, vm._save_plan.layout)  # a predecessor like us writes this layout
            vm._restore_plan.expect_own_shape(vm._save_plan)
        except BaseException:
            vm._close_fds()
            raise
        vm.timings["create"] = _ms(t0)
        return vm

    @property
    def memfd(self) -> int:
        return self.mem.memfd

    @property
    def mem_bytes(self) -> int:
        return self.mem.mem_bytes

    @property
    def extents(self) -> tuple[tuple[int, int], ...]:
        """The (offset, length) pieces of the memfd that are guest RAM, in guest-physical order."""
        return self.mem.extents

    # --- fresh boot ---

    def boot(self, image: str, cmdline: str) -> None:
        """Load the ELF and boot data into RAM and set every vCPU at the entry (fresh VM only)."""
        if self._booted_or_restored:
            raise LuoError(errno.EBUSY, f"VM {self.name} was already booted or restored")
        with open(image, "rb") as f:
            img = loader.load_elf(self.mem, f.read())
        loader.write_boot_data(self.mem, cmdline, self.ncpus)
        for v in self.vcpus:
            v.state.setup_boot(img.entry)
        self._booted_or_restored = True

    # --- run control ---

    def start(self) -> None:
        """Start the vCPU threads, or resume them after pause()."""
        if self.stopped.is_set():
            raise LuoError(errno.ESRCH, f"VM {self.name} has stopped: {self.stop_reason}")
        if not self._booted_or_restored:
            raise LuoError(errno.EINVAL, f"VM {self.name} has neither been booted nor restored")
        t0 = time.perf_counter()
        for v in self.vcpus:
            v.start()
        self._running = True
        self.timings["resume"] = _ms(t0)

    def entered(self, timeout: float = 1.0) -> list[int]:
        """When each vCPU thread went on into KVM_RUN after the last start() (CLOCK_MONOTONIC ns;
        0 for one that has not by ``timeout``): the end of a blackout as the guest lives it, for
        the accounting after a resume (never on its path)."""
        deadline = time.monotonic() + timeout
        return [v.entered_ns if v.entered.wait(max(0.0, deadline - time.monotonic())) else 0 for v in self.vcpus]

    def pause(self) -> None:
        """Return once every vCPU thread is parked outside KVM_RUN (or gone). Idempotent."""
        t0 = time.perf_counter()
        for v in self.vcpus:
            v.request_pause()
        for v in self.vcpus:
            if not v.parked.wait(PAUSE_TIMEOUT):
                raise LuoError(errno.ETIMEDOUT, f"vcpu{v.index} of VM {self.name} did not park within {PAUSE_TIMEOUT} s")
        self._running = False
        self.timings["pause"] = _ms(t0)

    @property
    def paused(self) -> bool:
        return all(v.parked.is_set() for v in self.vcpus)

    # --- save / restore ---

    def save(self, version: int = RECORD_VERSION) -> bytes:
        """The device + vCPU state record (not RAM). Only while paused.

        ``version=1`` writes the previous format (for a successor that reads only that one, and
        for bench/save_restore.py's before/after); it is the previous code, not prepared."""
        if not self.paused:
            raise LuoError(errno.EBUSY, f"VM {self.name} must be paused before save")
        if self.fd < 0:
            raise LuoError(errno.ESRCH, f"VM {self.name} was stopped; nothing to save")
        t0 = time.perf_counter()
        if version == RECORD_VERSION:
            rec = self._save_plan.save()
        elif version == 1:
            rec = self._save_v1()
        else:
            raise LuoError(errno.EINVAL, f"this VMM writes VM state record versions 1 and {RECORD_VERSION}, not {version}")
        self.timings["save"] = _ms(t0)
        return rec

    def _save_v1(self) -> bytes:
        comps: dict[str, tuple[int, bytes]] = {}
        for v in self.vcpus:
            comps[f"vcpu{v.index}"] = v.state.save_v1()
        comps["irqchip"] = self.irqchip.save_v1()
        comps["pit"] = self.pit.save_v1()
        comps["uart"] = self.uart.save_v1()
        comps["mmio-console"] = self.mmio_console.save_v1()
        comps["clock"] = self.clock.save()  # last: the clock keeps going while the rest is read
        meta = {"name": self.name, "mem_bytes": self.mem_bytes, "ncpus": self.ncpus}
        return build_record(meta, comps)

    def restore(self, record: bytes) -> None:
        """Load a record from save() into this freshly created VM (same memfd); then call start().

        Reads record versions 1 and 2; refuses any other with LuoError(EPROTO)."""
        if self._booted_or_restored:
            raise LuoError(errno.EBUSY, f"VM {self.name} was already booted or restored")
        if self.fd < 0:
            raise LuoError(errno.ESRCH, f"VM {self.name} was stopped")
        t0 = time.perf_counter()
        cpuids = [v.state.cpuid for v in self.vcpus]
        if record_version(record) == 1:
            self._restore_v1(record)
        else:
            restore_v2(self, record, self._restore_plan)
        if any(v.state.cpuid is not c for v, c in zip(self.vcpus, cpuids, strict=True)):
            # the guest keeps the CPUID it was saved with, which this VM did not compute (another
            # kernel, another VMM): the next save must carry that one, at its length
            self._save_plan = SavePlan(self)
        self._booted_or_restored = True
        self.timings["restore"] = _ms(t0)

    def check_record_shape(self, meta: dict[str, object]) -> None:
        """EINVAL unless a record's meta is of a VM like this one (vCPUs, RAM size)."""
        if meta["ncpus"] != self.ncpus or meta["mem_bytes"] != self.mem_bytes:
            raise LuoError(
                errno.EINVAL,
                f"the record is of a VM with {meta['ncpus']} vCPUs and {meta['mem_bytes']} bytes of RAM; "
                f"this one has {self.ncpus} and {self.mem_bytes}",
            )

    def _restore_v1(self, record: bytes) -> None:
        meta, comps = parse_record(record)
        self.check_record_shape(meta)
        for name in [f"vcpu{i}" for i in range(self.ncpus)] + ["irqchip", "pit", "uart", "mmio-console", "clock"]:
            if name not in comps:
                raise LuoError(errno.EINVAL, f"the VM state record has no {name} section")
        for v in self.vcpus:
            v.state.restore_v1(*comps[f"vcpu{v.index}"])
        self.irqchip.restore_v1(*comps["irqchip"])
        self.pit.restore_v1(*comps["pit"])
        self.uart.restore(*comps["uart"])
        self.mmio_console.restore(*comps["mmio-console"])
        self.clock.restore(*comps["clock"])

    # --- teardown ---

    def stop(self) -> None:
        """Stop the vCPU threads and close the KVM fds and the mapping (the memfd only if ours)."""
        for v in self.vcpus:
            v.request_stop()
        for v in self.vcpus:
            if not v.join(PAUSE_TIMEOUT):
                raise LuoError(errno.ETIMEDOUT, f"vcpu{v.index} of VM {self.name} did not stop")
        self._running = False
        self._close_fds()

    def _close_fds(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if hasattr(self, "mem"):
            self.mem.close()

    def _vcpu_stopped(self, index: int, reason: str) -> None:
        """A vCPU met a guest stop (shutdown, internal error...): stop the whole VM, once."""
        with self._lock:
            if self.stopped.is_set():
                return
            self.stop_reason = f"vcpu{index}: {reason}"
            for v in self.vcpus:
                if v.index != index:
                    v.request_stop()
            self.stopped.set()
        cb = self.on_guest_stop
        if cb is not None:
            cb(self.stop_reason)
