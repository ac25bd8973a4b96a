"""What the guest is for: it notices when the VM stops running, when its memory changes under it,
and it carries on unbroken across a save/restore into a new VM around the same memory.

These drive luo.vmm.vm.Vm in-process, so the test can pause the VM, poke its RAM, or hand it to a
successor VM, and wait on console lines as they arrive.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from guest_console import (
    READY,
    MemorySink,
    bad_lines,
    boots,
    heartbeats,
    integrity_failures,
    integrity_passes,
    integrity_start,
    mono_gaps,
    stalls,
)

if TYPE_CHECKING:
    from luo.vmm.vm import Vm

pytestmark = pytest.mark.kvm

MiB = 1 << 20


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    made: list[Vm] = []
    yield made
    for vm in reversed(made):
        try:
            vm.stop()
        except Exception:  # noqa: BLE001 - best-effort teardown of a VM a test may already have stopped
            pass


def boot(guest_elf: Path, vms: list[Vm], cmdline: str, cpus: int = 2) -> tuple[Vm, MemorySink]:
    from luo.vmm.vm import Vm  # here, not at the top: the guest_elf fixture skips when the VMM is missing

    sink = MemorySink()
    vm = Vm.create(f"guest-test-{len(vms)}", 256 * MiB, cpus, console=sink)
    vms.append(vm)
    vm.boot(str(guest_elf), cmdline)
    vm.start()
    sink.wait_until(lambda ls: READY in ls and len(heartbeats(ls)) >= 2, 30)
    return vm, sink


def test_a_pause_longer_than_stall_ms_is_reported_on_every_vcpu(guest_elf: Path, vms: list[Vm]) -> None:
    vm, sink = boot(guest_elf, vms, "hb_ms=100 stall_ms=50 integrity_mb=8")
    before = len(sink.snapshot())
    vm.pause()
    stopped_for = 0.25
    time.sleep(stopped_for)  # the stimulus itself: the guest must not run for this long
    vm.start()
    lines = sink.wait_until(
        lambda ls: {c for _g, c in stalls(ls)} == {0, 1} and len(heartbeats(ls[before:])) >= 2, 20
    )
    for gap_ns, _cpu in stalls(lines):
        assert stopped_for * 1e9 <= gap_ns < 10e9
    hbs = heartbeats(lines)
    assert [h.seq for h in hbs] == list(range(len(hbs)))  # no seq gap, no burst to catch up
    jumps = mono_gaps(hbs)
    assert max(jumps) >= stopped_for * 1e9  # kvmclock kept going while we were stopped
    assert not integrity_failures(lines)


def test_memory_changed_under_the_guest_is_reported(guest_elf: Path, vms: list[Vm]) -> None:
    vm, sink = boot(guest_elf, vms, "hb_ms=50 integrity_mb=4 integrity_pct=100")
    lines = sink.wait_until(lambda ls: len(integrity_passes(ls)) >= 1, 20)
    start = integrity_start(lines)
    assert start is not None
    gpa, size = start
    victim = gpa + size // 2 + 8 * 123
    word = struct.unpack("<Q", vm.mem.read(victim, 8))[0]
    vm.mem.write(victim, struct.pack("<Q", word ^ 0xFF00))
    lines = sink.wait_until(lambda ls: any(not h.integrity_ok for h in heartbeats(ls)), 20)
    fails = integrity_failures(lines)
    assert fails, lines[-20:]
    addr, expected, got = fails[0]
    assert addr == victim and expected ^ got == 0xFF00
    assert any(
        ln.startswith("integrity FAIL pass=")
        for ln in sink.wait_until(lambda ls: any(ln.startswith("integrity FAIL pass=") for ln in ls), 20)
    )


def test_save_restore_into_a_new_vm_is_seamless(guest_elf: Path, vms: list[Vm]) -> None:
    old, sink = boot(guest_elf, vms, "hb_ms=100 stall_ms=50 integrity_mb=16")
    sink.wait_until(lambda ls: len(integrity_passes(ls)) >= 1, 20)
    from luo.vmm.vm import Vm

    new = Vm.create("guest-test-successor", old.mem_bytes, old.ncpus, memfd=old.memfd, console=sink)
    vms.append(new)
    old.pause()
    record = old.save()
    new.restore(record)
    new.start()
    old.mem.owned = False  # the successor owns the memfd now
    new.mem.owned = True
    old.stop()
    mark = len(sink.snapshot())
    passes_before = len(integrity_passes(sink.snapshot()))
    lines = sink.wait_until(
        lambda ls: len(heartbeats(ls[mark:])) >= 3 and len(integrity_passes(ls)) >= passes_before + 2, 30
    )
    (b,) = boots(lines)  # no second boot: the same guest goes on
    hbs = heartbeats(lines)
    assert [h.seq for h in hbs] == list(range(len(hbs)))
    assert {h.boot_id for h in hbs} == {b.boot_id}
    gaps = mono_gaps(hbs)
    assert max(gaps) < 0.2e9, gaps
    assert bad_lines(lines) == []
