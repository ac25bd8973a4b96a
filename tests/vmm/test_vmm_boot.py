"""Real KVM: boot the counter guest, see its output, stop on a guest fault, pause/save/restore in-process."""

from __future__ import annotations

import errno
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from luo.errors import LuoError
from luo.vmm.devices.console_sink import MemoryConsoleSink
from luo.vmm.vm import Vm

pytestmark = pytest.mark.kvm
COUNT = re.compile(r"^count ([0-9a-f]{16})$")


def count_of(line: str | None) -> int:
    assert line is not None, "no count line in time"
    m = COUNT.match(line)
    assert m, line
    return int(m.group(1), 16)


def booted(elf: Path, ncpus: int = 2, mem: int = 64 << 20, on_stop: list[str] | None = None) -> tuple[Vm, MemoryConsoleSink]:
    sink = MemoryConsoleSink()
    vm = Vm.create("t", mem, ncpus, console=sink)
    if on_stop is not None:
        vm.on_guest_stop = on_stop.append
    vm.boot(str(elf), "hello")
    vm.start()
    return vm, sink


def test_boot_shows_uart_and_mmio_output(counter_elf: Path) -> None:
    vm, sink = booted(counter_elf)
    try:
        assert count_of(sink.wait_for(r"^count 0+3$", 10)) == 3
        assert sink.wait_for(r"^ap1 [0-9a-f]{16}$", 10)
        assert not any("BAD" in ln for ln in sink.lines)
        assert vm.mem.read(0x1000, 8) == b"LUOBOOT1"
    finally:
        vm.stop()


def test_guest_fault_stops_vm_not_process(dying_elf: Path) -> None:
    seen: list[str] = []
    vm, sink = booted(dying_elf, on_stop=seen)
    try:
        assert vm.stopped.wait(10)
        assert vm.stop_reason is not None and "shutdown" in vm.stop_reason
        assert sink.wait_for(r"^count 0+3$", 1)
        vm.pause()  # returns at once: every vCPU thread is gone or parked
        assert vm.paused
        with pytest.raises(LuoError) as ei:
            vm.start()
        assert ei.value.errno == errno.ESRCH
    finally:
        vm.stop()
    assert seen == [vm.stop_reason]


def test_pause_is_idempotent_and_freezes_vcpus(counter_elf: Path) -> None:
    vm, sink = booted(counter_elf)
    try:
        sink.wait_for(r"^count 0+2$", 10)
        with pytest.raises(LuoError) as ei:
            vm.save()
        assert ei.value.errno == errno.EBUSY
        vm.pause()
        vm.pause()
        r1 = vm.vcpus[0].state.regs()
        a = vm.save()
        n = len(sink.lines)
        r2 = vm.vcpus[0].state.regs()
        assert (r1.rip, r1.rbx) == (r2.rip, r2.rbx) and len(vm.save()) == len(a)
        vm.start()
        assert sink.wait_for(COUNT.pattern, 10, start=n)
    finally:
        vm.stop()


def test_restore_into_second_vm_same_process(counter_elf: Path) -> None:
    old, sink = booted(counter_elf)
    new = Vm.create("t2", old.mem_bytes, old.ncpus, memfd=old.memfd, console=sink)
    try:
        sink.wait_for(r"^count 0+4$", 10)
        old.pause()
        regs = old.vcpus[0].state.regs()
        rec = old.save()
        n = len(sink.lines)
        last = max(count_of(ln) for ln in sink.lines if ln.startswith("count"))
        with pytest.raises(LuoError) as ei:
            Vm.create("t3", old.mem_bytes, 1, memfd=old.memfd, console=sink).restore(rec)
        assert ei.value.errno == errno.EINVAL
        new.restore(rec)
        r = new.vcpus[0].state.regs()
        assert (r.rip, r.rbx, r.r12, r.rsp) == (regs.rip, regs.rbx, regs.r12, regs.rsp)
        old.stop()
        new.start()
        assert count_of(sink.wait_for(COUNT.pattern, 10, start=n)) == last + 1
        assert sink.wait_for(r"^ap1 ", 10, start=n)
        with pytest.raises(LuoError):
            new.restore(rec)  # only into a fresh VM
    finally:
        old.stop()
        new.stop()


def test_pause_latency(counter_elf: Path) -> None:
    vm, sink = booted(counter_elf)
    try:
        sink.wait_for(r"^count 0+2$", 10)
        pauses, saves = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            vm.pause()
            pauses.append((time.perf_counter() - t0) * 1000)
            vm.save()
            saves.append(vm.timings["save"])
            vm.start()
        med = statistics.median(pauses)
        print(f"\npause ms: median {med:.3f} min {min(pauses):.3f} max {max(pauses):.3f}; "
              f"save ms median {statistics.median(saves):.3f}")
        assert med < 50
    finally:
        vm.stop()


def test_stop_from_guest_stop_callback(dying_elf: Path) -> None:
    sink = MemoryConsoleSink()
    vm = Vm.create("t", 64 << 20, 2, console=sink)
    done = threading.Event()
    threads = [v.thread for v in vm.vcpus]

    def on_stop(reason: str) -> None:
        vm.stop()
        done.set()

    vm.on_guest_stop = on_stop
    vm.boot(str(dying_elf), "")
    vm.start()
    assert done.wait(10)
    assert sink.wait_for(r"^count 0+3$", 1)
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert vm.fd == -1 and vm.vcpus == [] and vm.stopped.is_set()


def test_kick_handler_needs_main_thread() -> None:
    """Off the main thread, Vm.create refuses (EPERM) rather than leave vCPUs unpausable."""
    code = (
        "import threading, errno\n"
        "from luo.errors import LuoError\n"
        "from luo.vmm.vm import Vm\n"
        "out = []\n"
        "def f():\n"
        "    try:\n"
        "        Vm.create('x', 4 << 20, 1)\n"
        "    except LuoError as e:\n"
        "        out.append(e.errno)\n"
        "t = threading.Thread(target=f); t.start(); t.join()\n"
        "assert out == [errno.EPERM], out\n"
        "from luo.vmm.vcpu import install_kick_handler\n"
        "install_kick_handler()\n"
        "t = threading.Thread(target=lambda: Vm.create('y', 4 << 20, 1).stop()); t.start(); t.join()\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr
