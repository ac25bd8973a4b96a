"""Save -> restore gives the very same VM state, for every record version and both batch runners.

The state is read back with plain ioctls into fresh structs (not through the save code), from the
saved VM and from the restored one, and compared piece by piece: regs, sregs, XSAVE, XCRs, every
saved MSR, LAPIC, vCPU events, MP state, debug registers, TSC offset, irqchip, PIT, kvmclock.
Then the restored guest must go on exactly (counter guest), or keep its heartbeats (test guest).
"""

from __future__ import annotations

import ctypes as C
import errno
import re
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from luo.errors import LuoError
from luo.testing.console import parse_heartbeats
from luo.vmm import saveplan, vcpu_state
from luo.vmm.devices.console_sink import MemoryConsoleSink
from luo.vmm.kvm import batch as kbatch
from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.sys import ioctl
from luo.vmm.state import RecordWriter, build_record, pack_blobs, parse_record, parse_record_v2, unpack_blobs
from luo.vmm.vm import Vm

pytestmark = pytest.mark.kvm
COUNT = re.compile(r"^count ([0-9a-f]{16})$")
REAL_GUEST = Path(__file__).resolve().parents[2] / "guest" / "build" / "luo-guest.elf"
APIC_TMCCT = 0x390  # the timer's current count: computed from the time of the read
PIT_LOAD_TIME = [24 * ch + 16 for ch in range(3)]  # count_load_time of each channel: reset by KVM_SET_PIT2


@pytest.fixture(params=["c", "py"])
def runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """VMs created in the test run their prepared batches in C, or with the fcntl fallback."""
    if request.param == "c" and kbatch._LIB is None:
        pytest.skip("the C batch runner is not built (scripts/setup.sh)")
    monkeypatch.setenv("LUO_VMM_NO_CEXT", "1" if request.param == "py" else "0")
    yield request.param


def get(fd: int, req: int, struct_type: type[C.Structure]) -> bytes:
    s = struct_type()
    ioctl(fd, req, s, K.NAMES[req])
    return bytes(s)


def read_msrs(fd: int, indices: tuple[int, ...]) -> dict[int, int]:
    m = S.kvm_msrs(len(indices))()
    m.nmsrs = len(indices)
    for i, idx in enumerate(indices):
        m.entries[i].index = idx
    n = ioctl(fd, K.KVM_GET_MSRS, C.addressof(m), "KVM_GET_MSRS")
    assert n == len(indices)
    return {m.entries[i].index: m.entries[i].data for i in range(n)}


def masked(raw: bytes, offsets: list[int], width: int) -> bytes:
    b = bytearray(raw)
    for off in offsets:
        b[off : off + width] = bytes(width)
    return bytes(b)


def snapshot(vm: Vm) -> dict[str, Any]:
    """Every piece of state a save carries, read with plain ioctls (the VM must be paused or fresh)."""
    out: dict[str, Any] = {}
    for v in vm.vcpus:
        fd, p = v.fd, f"vcpu{v.index}."
        out[p + "regs"] = get(fd, K.KVM_GET_REGS, S.KvmRegs)
        out[p + "sregs"] = get(fd, K.KVM_GET_SREGS, S.KvmSregs)
        out[p + "xsave"] = get(fd, K.KVM_GET_XSAVE, S.KvmXsave)
        out[p + "xcrs"] = get(fd, K.KVM_GET_XCRS, S.KvmXcrs)
        out[p + "lapic"] = masked(get(fd, K.KVM_GET_LAPIC, S.KvmLapicState), [APIC_TMCCT], 4)
        out[p + "events"] = get(fd, K.KVM_GET_VCPU_EVENTS, S.KvmVcpuEvents)
        out[p + "mp_state"] = get(fd, K.KVM_GET_MP_STATE, S.KvmMpState)
        out[p + "debugregs"] = get(fd, K.KVM_GET_DEBUGREGS, S.KvmDebugregs)
        deadline = (K.MSR_IA32_TSC_DEADLINE,) if v.state.has_deadline else ()
        out[p + "msrs"] = read_msrs(fd, v.state.msr_indices + deadline)
        val = C.c_uint64()
        attr = S.KvmDeviceAttr(0, K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET, C.addressof(val))
        ioctl(fd, K.KVM_GET_DEVICE_ATTR, attr, "KVM_GET_DEVICE_ATTR")
        out[p + "tsc_offset"] = val.value
    for chip in (K.KVM_IRQCHIP_PIC_MASTER, K.KVM_IRQCHIP_PIC_SLAVE, K.KVM_IRQCHIP_IOAPIC):
        c = S.KvmIrqchip()
        c.chip_id = chip
        ioctl(vm.fd, K.KVM_GET_IRQCHIP, c, "KVM_GET_IRQCHIP")
        out[f"irqchip{chip}"] = bytes(c)
    out["pit"] = masked(get(vm.fd, K.KVM_GET_PIT2, S.KvmPitState2), PIT_LOAD_TIME, 8)
    out["uart"] = vm.uart.save()
    out["mmio-console"] = vm.mmio_console.save()
    return out


def clock_ns(vm: Vm) -> int:
    d = S.KvmClockData()
    ioctl(vm.fd, K.KVM_GET_CLOCK, d, "KVM_GET_CLOCK")
    return int(d.clock)


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"state differs after restore in {differ}"


def booted(elf: Path, sink: MemoryConsoleSink, ncpus: int = 2) -> Vm:
    vm = Vm.create("t", 64 << 20, ncpus, console=sink)
    vm.boot(str(elf), "x")
    vm.start()
    return vm


class VmPair:
    """A booted VM and, once a test makes it, its successor: both stopped whatever the test does."""

    def __init__(self, old: Vm) -> None:
        self.old = old
        self.new: Vm | None = None


@contextmanager
def vm_pair(elf: Path, sink: MemoryConsoleSink, ncpus: int = 2) -> Iterator[VmPair]:
    pair = VmPair(booted(elf, sink, ncpus))
    try:
        yield pair
    finally:
        pair.old.stop()
        if pair.new is not None:
            pair.new.stop()


def successor_of(old: Vm, sink: MemoryConsoleSink) -> Vm:
    """A fresh VM around old's RAM (what a successor VMM builds at warm-up)."""
    return Vm.create("t2", old.mem_bytes, old.ncpus, memfd=old.memfd, console=sink)


def last_count(sink: MemoryConsoleSink) -> int:
    return max(int(m[1], 16) for m in map(COUNT.match, sink.lines) if m)


def restore_and_compare(old: Vm, rec: bytes, sink: MemoryConsoleSink) -> Vm:
    """A fresh VM around old's RAM, restored from rec; its state must equal old's (old paused)."""
    before = snapshot(old)
    clock0, t0 = clock_ns(old), time.monotonic_ns()
    new = successor_of(old, sink)
    new.restore(rec)
    after = snapshot(new)
    clock1, t1 = clock_ns(new), time.monotonic_ns()
    assert_same(before, after)
    # kvmclock (KVM_CLOCK_REALTIME): the restored clock went on by the real time since the save
    assert 0 <= clock1 - clock0 <= (t1 - t0) + 50_000_000
    return new


def switch_over(old: Vm, new: Vm, sink: MemoryConsoleSink) -> int:
    """Stop the old VM, start the restored one, and check the guest's counter goes on by exactly one
    (nothing lost, nothing run twice). Returns where the new VM's console lines start."""
    n, last = len(sink.lines), last_count(sink)
    old.stop()
    new.start()
    line = sink.wait_for(COUNT.pattern, 10, start=n)
    assert line is not None and int(line.split()[1], 16) == last + 1
    return n


def test_roundtrip_gives_identical_state(counter_elf: Path, runner: str) -> None:
    sink = MemoryConsoleSink()
    with vm_pair(counter_elf, sink) as pair:
        old = pair.old
        assert sink.wait_for(r"^count 0+3$", 10)
        assert sink.wait_for(r"^ap1 ", 10)
        old.pause()
        rec = old.save()
        assert struct.unpack_from("<I", rec, 8)[0] == 2
        assert old._save_plan.batch.cext == (runner == "c")
        probe = Vm.create("another name", old.mem_bytes, old.ncpus, memfd=old.memfd, console=sink)
        try:
            assert probe._restore_plan.matches(rec) is not None  # another name, same shape: prepared
        finally:
            probe.stop()
        new = pair.new = restore_and_compare(old, rec, sink)
        assert new._restore_plan.batch.cext == (runner == "c")
        n = switch_over(old, new, sink)
        assert sink.wait_for(r"^ap1 ", 10, start=n)
        assert new.stop_reason is None


def test_v1_record_restores(counter_elf: Path, runner: str) -> None:
    """A record of the previous format (version 1), as an older VMM writes it, still restores."""
    sink = MemoryConsoleSink()
    with vm_pair(counter_elf, sink) as pair:
        old = pair.old
        assert sink.wait_for(r"^count 0+2$", 10)
        old.pause()
        rec = old.save(version=1)
        assert struct.unpack_from("<I", rec, 8)[0] == 1 and rec[16:17] == b"{"
        new = pair.new = restore_and_compare(old, rec, sink)
        switch_over(old, new, sink)


def test_saved_twice_and_resumed_between(counter_elf: Path, runner: str) -> None:
    """Saving does not disturb the saver: pause, save, resume, pause, save again, restore the second."""
    sink = MemoryConsoleSink()
    with vm_pair(counter_elf, sink) as pair:
        old = pair.old
        assert sink.wait_for(r"^count 0+2$", 10)
        old.pause()
        first = old.save()
        old.start()
        n = len(sink.lines)
        assert sink.wait_for(COUNT.pattern, 10, start=n)
        old.pause()
        second = old.save()
        assert first != second  # the guest ran between them (the partial console lines may differ in length)
        pair.new = restore_and_compare(old, second, sink)


def reshaped(rec: bytes, drop_msr: int) -> bytes:
    """The record with MSR ``drop_msr`` taken out of vcpu0's payload (a VMM whose KVM saves fewer MSRs)."""
    meta, table, base = parse_record_v2(rec)
    payloads = {name: (version, rec[base + off : base + off + length]) for name, version, off, length in table}
    version, p = payloads["vcpu0"]
    flags, cpuid_len, nmsrs = vcpu_state.v2_shape(p, 0, len(p))
    m = vcpu_state.V2_FIXED + cpuid_len
    entries = [p[m + 8 + 16 * i : m + 24 + 16 * i] for i in range(nmsrs)]
    kept = [e for e in entries if struct.unpack_from("<I", e)[0] != drop_msr]
    assert len(kept) == nmsrs - 1
    head = vcpu_state.V2_HEAD.pack(flags, cpuid_len, len(kept), 0)
    payloads["vcpu0"] = (version, head + p[len(head) : m] + struct.pack("<II", len(kept), 0) + b"".join(kept))
    fixed = [n for n, *_ in table if n not in saveplan.VARIABLE]
    w = RecordWriter(meta, [(n, payloads[n][0], len(payloads[n][1])) for n in fixed], len(saveplan.VARIABLE))
    return w.build(b"".join(payloads[n][1] for n in fixed), [(n, *payloads[n]) for n in saveplan.VARIABLE])


def test_record_of_another_shape_restores(counter_elf: Path, runner: str) -> None:
    """A record whose layout differs from the prepared one (one MSR fewer) gets a plan built on the spot."""
    sink = MemoryConsoleSink()
    with vm_pair(counter_elf, sink) as pair:
        old = pair.old
        assert sink.wait_for(r"^count 0+2$", 10)
        old.pause()
        drop = K.MSR_MTRR_DEF_TYPE
        rec = reshaped(old.save(), drop)
        before = snapshot(old)
        new = pair.new = successor_of(old, sink)
        prepared = new._restore_plan
        built: list[saveplan.RestorePlan] = []
        orig_init = saveplan.RestorePlan.__init__

        def spy(self: saveplan.RestorePlan, *a: Any, **kw: Any) -> None:
            built.append(self)
            orig_init(self, *a, **kw)

        saveplan.RestorePlan.__init__ = spy  # type: ignore[method-assign]
        try:
            new.restore(rec)
        finally:
            saveplan.RestorePlan.__init__ = orig_init  # type: ignore[method-assign]
        assert len(built) == 1 and built[0] is not prepared
        after = snapshot(new)
        # the dropped MSR kept the fresh vCPU's value; everything else is the saved state
        assert after["vcpu0.msrs"].pop(drop) != before["vcpu0.msrs"].pop(drop)
        assert_same(before, after)
        switch_over(old, new, sink)


def test_unknown_versions_refused(counter_elf: Path) -> None:
    sink = MemoryConsoleSink()
    old = booted(counter_elf, sink)
    try:
        assert sink.wait_for(r"^count 0+1$", 10)
        old.pause()
        rec = old.save()
        for bad, err, words in (
            (rec[:8] + struct.pack("<I", 3) + rec[12:], errno.EPROTO, "record version 3 is unknown"),
            (rec[:-1], errno.EINVAL, "past the end"),
        ):
            new = successor_of(old, sink)
            try:
                with pytest.raises(LuoError) as ei:
                    new.restore(bad)
                assert ei.value.errno == err and words in ei.value.message, ei.value
            finally:
                new.stop()
        # a vCPU component of a version this VMM does not know
        meta, table, base = parse_record_v2(rec)
        i = next(k for k, t in enumerate(table) if t[0] == "vcpu1")
        hdr_off = 16 + 18 + len(meta["name"]) + 28 * i + 16
        bad = rec[:hdr_off] + struct.pack("<I", 9) + rec[hdr_off + 4 :]
        new = successor_of(old, sink)
        try:
            with pytest.raises(LuoError) as ei:
                new.restore(bad)
            assert ei.value.errno == errno.EPROTO and "vcpu1 state version 9" in ei.value.message
        finally:
            new.stop()
        # a CPUID entry count that does not match the CPUID's length (the kernel would read past it)
        _, table, base = parse_record_v2(rec)
        c = base + next(o for n, _, o, _ in table if n == "vcpu0") + vcpu_state.V2_FIXED
        bad = rec[:c] + struct.pack("<I", struct.unpack_from("<I", rec, c)[0] + 50) + rec[c + 4 :]
        new = Vm.create("t", old.mem_bytes, old.ncpus, memfd=old.memfd, console=sink)
        try:
            assert new._restore_plan.matches(bad) is None
            with pytest.raises(LuoError) as ei:
                new.restore(bad)
            assert ei.value.errno == errno.EINVAL and "CPUID entry count" in ei.value.message
        finally:
            new.stop()
        with pytest.raises(LuoError) as ei:
            old.save(version=7)
        assert ei.value.errno == errno.EINVAL
    finally:
        old.stop()
    with pytest.raises(LuoError) as ei:
        old.save()  # stopped: its prepared ops name closed fds
    assert ei.value.errno in (errno.ESRCH, errno.EBUSY)


@pytest.mark.skipif(not REAL_GUEST.exists(), reason="guest/build/luo-guest.elf not built")
def test_real_guest_heartbeats_through_successive_restores(runner: str) -> None:
    """The test guest, 1 GiB and 2 vCPUs, through 4 successor VMs in turn (each built before the
    pause, as at prepare): identical state each time, heartbeats continue, same boot, no FAIL."""
    sink = MemoryConsoleSink()
    ram = Vm.create("real", 1 << 30, 2, console=sink)
    cur = ram
    vms = [ram]
    try:
        cur.boot(str(REAL_GUEST), "hb_ms=20 stall_ms=0")
        cur.start()
        assert sink.wait_for(r"^heartbeat ", 30), sink.lines[-5:]
        for _ in range(4):
            succ = Vm.create("real", 1 << 30, 2, memfd=ram.memfd, console=sink)
            vms.append(succ)
            n = len(sink.lines)
            cur.pause()
            rec = cur.save()
            before = snapshot(cur)
            assert succ._restore_plan.matches(rec) is not None  # same name, same shape: prepared
            succ.restore(rec)
            assert_same(before, snapshot(succ))
            succ.start()
            if cur is not ram:
                cur.stop()  # the first VM owns the memfd: it stays until the end
            cur = succ
            assert sink.wait_for(r"^heartbeat ", 30, start=n), sink.lines[-5:]
        beats = parse_heartbeats(sink.lines)
        assert len({b.boot_id for b in beats}) == 1
        assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))
        assert all(b.integrity_ok for b in beats) and not any("FAIL" in ln for ln in sink.lines)
        assert sum(ln.startswith("luo-guest boot ") for ln in sink.lines) == 1
        assert cur.stop_reason is None
    finally:
        for v in reversed(vms):
            v.stop()


APIC_LVTT = 0x320
LVTT_MASKED, LVTT_TSC_DEADLINE = 1 << 16, 2 << 17


def test_armed_deadline_and_moved_tsc_offset_restored(counter_elf: Path, runner: str) -> None:
    """The optional ops run when needed: a TSC-deadline timer armed (masked, far ahead) and a TSC
    offset other than the fresh vCPU's are both carried over (they are skipped only when 0 /
    equal, which is what the fast path relies on)."""
    sink = MemoryConsoleSink()
    with vm_pair(counter_elf, sink) as pair:
        old = pair.old
        assert sink.wait_for(r"^count 0+2$", 10)
        old.pause()
        v = old.vcpus[1]
        lapic = S.KvmLapicState()
        ioctl(v.fd, K.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        raw = bytearray(bytes(lapic))
        struct.pack_into("<I", raw, APIC_LVTT, LVTT_MASKED | LVTT_TSC_DEADLINE | 0xEF)
        ioctl(v.fd, K.KVM_SET_LAPIC, S.KvmLapicState.from_buffer_copy(bytes(raw)), "KVM_SET_LAPIC")
        deadline = read_msrs(v.fd, (K.MSR_IA32_TSC,))[K.MSR_IA32_TSC] + (3600 << 32)
        m = S.kvm_msrs(1)()
        m.nmsrs, m.entries[0].index, m.entries[0].data = 1, K.MSR_IA32_TSC_DEADLINE, deadline
        assert ioctl(v.fd, K.KVM_SET_MSRS, C.addressof(m), "KVM_SET_MSRS") == 1
        if v.state.has_tsc_offset:  # PVM accepts this and keeps the offset at 0 (kvm-notes)
            val = C.c_uint64(v.state.tsc_offset_at_create + 12345)
            attr = S.KvmDeviceAttr(0, K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET, C.addressof(val))
            ioctl_ok(v.fd, K.KVM_SET_DEVICE_ATTR, attr)
        before = snapshot(old)
        assert before["vcpu1.msrs"][K.MSR_IA32_TSC_DEADLINE] != 0
        moved = before["vcpu1.tsc_offset"] != old.vcpus[1].state.tsc_offset_at_create
        new = pair.new = restore_and_compare(old, old.save(), sink)
        b = new._restore_plan.batch
        assert b.ran(new._restore_plan.vcpu_ops[1].deadline_op)
        assert not b.ran(new._restore_plan.vcpu_ops[0].deadline_op)  # vcpu0's is 0: nothing to set
        tsc_ran = [b.ran(i) for i, o in enumerate(b.ops) if o.name == "vcpu1 KVM_SET_DEVICE_ATTR(TSC_OFFSET)"]
        assert tsc_ran in ([moved], [])
        assert not any(b.ran(r.cpuid_op) for r in new._restore_plan.vcpu_ops)  # equal to the one set at creation


def ioctl_ok(fd: int, req: int, arg: C.Structure) -> bool:
    try:
        ioctl(fd, req, arg, K.NAMES[req])
    except LuoError:
        return False
    return True


def with_cpuid_changed(rec: bytes, vcpu: int, function: int, clear_eax: int) -> bytes:
    """The record with bits of EAX of CPUID leaf ``function`` of one vCPU cleared (same layout)."""
    _, table, base = parse_record_v2(rec)
    off = next(o for n, _, o, _ in table if n == f"vcpu{vcpu}")
    c = base + off + vcpu_state.V2_FIXED
    out = bytearray(rec)
    for i in range(struct.unpack_from("<I", rec, c)[0]):
        e = c + 8 + 40 * i
        if struct.unpack_from("<I", rec, e)[0] == function:
            eax = struct.unpack_from("<I", rec, e + 12)[0]
            assert eax & clear_eax, f"leaf {function:#x} eax {eax:#x} has none of {clear_eax:#x}"
            struct.pack_into("<I", out, e + 12, eax & ~clear_eax)
            return bytes(out)
    raise AssertionError(f"no CPUID leaf {function:#x}")


def test_record_cpuid_differing_from_the_successors_is_set(counter_elf: Path, runner: str) -> None:
    """The guest keeps the CPUID it was saved with even if the successor computed another one,
    and the successor's next save carries it on (prepared path: same layout, other bytes)."""
    sink = MemoryConsoleSink()
    with vm_pair(counter_elf, sink) as pair:
        old = pair.old
        assert sink.wait_for(r"^count 0+2$", 10)
        old.pause()
        kvm_features = 0x40000001
        rec = with_cpuid_changed(old.save(), 1, kvm_features, 1)  # KVM_FEATURE_CLOCKSOURCE off on vCPU 1
        new = pair.new = successor_of(old, sink)
        assert new._restore_plan.matches(rec) is not None
        new.restore(rec)
        ops = new._restore_plan.vcpu_ops
        assert not new._restore_plan.batch.ran(ops[0].cpuid_op) and new._restore_plan.batch.ran(ops[1].cpuid_op)
        _, table, base = parse_record_v2(rec)
        off, length = next((o, ln) for n, _, o, ln in table if n == "vcpu1")
        c = base + off + vcpu_state.V2_FIXED
        want = rec[c : c + len(new.vcpus[1].state.cpuid)]
        assert new.vcpus[1].state.cpuid == want != old.vcpus[1].state.cpuid
        switch_over(old, new, sink)
        new.pause()
        again = new.save()
        _, table, base = parse_record_v2(again)
        off = next(o for n_, _, o, _ in table if n_ == "vcpu1")
        c2 = base + off + vcpu_state.V2_FIXED
        assert again[c2 : c2 + len(want)] == want


def test_kvmclock_restored_on_a_kernel_that_wants_only_realtime(counter_elf: Path) -> None:
    """Without passthrough (a kernel that refuses KVM_GET_CLOCK's other flags on SET) the clock is
    set from a scratch struct with only KVM_CLOCK_REALTIME, as version 1 did; same result."""
    sink = MemoryConsoleSink()
    with vm_pair(counter_elf, sink) as pair:
        old = pair.old
        assert sink.wait_for(r"^count 0+1$", 10)
        assert old.clock.passthrough  # this machine's kernel (6.x) takes them
        old.pause()
        rec = old.save()
        new = pair.new = successor_of(old, sink)
        new.clock.passthrough = False
        new._restore_plan = saveplan.RestorePlan(new, new._save_plan.layout)
        new._restore_plan.expect_own_shape(new._save_plan)
        b = new._restore_plan.batch
        clock_op = b.ops[-1]
        assert clock_op.name == "KVM_SET_CLOCK" and clock_op.off == new._restore_plan.clock_scratch
        clock0, t0 = clock_ns(old), time.monotonic_ns()
        new.restore(rec)
        clock1, t1 = clock_ns(new), time.monotonic_ns()
        assert 0 <= clock1 - clock0 <= (t1 - t0) + 50_000_000
        flags = struct.unpack_from("<I", b.view, clock_op.off + 8)[0]
        assert flags == K.KVM_CLOCK_REALTIME


def test_msr_refused_by_kvm_is_skipped_and_the_rest_set(counter_elf: Path, runner: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """KVM_SET_MSRS stops at an MSR it refuses: the batch logs it, sets the MSRs after it, and
    goes on with the rest of the restore (as version 1 did)."""
    sink = MemoryConsoleSink()
    with vm_pair(counter_elf, sink) as pair:
        old = pair.old
        assert sink.wait_for(r"^count 0+2$", 10)
        old.pause()
        msr = 0x200  # MTRRphysBase0, in the middle of the saved MSRs: given a value a fresh vCPU has not
        w = S.kvm_msrs(1)()
        w.nmsrs, w.entries[0].index, w.entries[0].data = 1, msr, 0x6
        assert ioctl(old.vcpus[0].fd, K.KVM_SET_MSRS, C.addressof(w), "KVM_SET_MSRS") == 1
        rec = bytearray(old.save())
        _, table, base = parse_record_v2(bytes(rec))
        off, length = next((o, ln) for n, _, o, ln in table if n == "vcpu0")
        _, cpuid_len, nmsrs = vcpu_state.v2_shape(bytes(rec), base + off, length)
        m = base + off + vcpu_state.V2_FIXED + cpuid_len + 8
        entries = [struct.unpack_from("<I", rec, m + 16 * i)[0] for i in range(nmsrs)]
        before = snapshot(old)
        new = pair.new = successor_of(old, sink)
        fresh = snapshot(new)["vcpu0.msrs"]
        bad = entries.index(msr)
        assert 0 < bad < nmsrs - 1 and before["vcpu0.msrs"][msr] == 0x6 != fresh[msr]
        struct.pack_into("<I", rec, m + 16 * bad, 0x4B564DFF)  # no such MSR (KVM's range, unassigned)
        with caplog.at_level("WARNING", logger="luo.vmm"):
            new.restore(bytes(rec))
        assert any("refused MSR 0x4b564dff" in r.getMessage() for r in caplog.records), caplog.text
        after = snapshot(new)
        assert after["vcpu0.msrs"].pop(msr) == fresh[msr] != before["vcpu0.msrs"].pop(msr)
        assert_same(before, after)  # everything after the refused MSR was set, and the rest restored


def rebuilt(rec: bytes, vcpu: int, payload: bytes) -> bytes:
    """The version-2 record with vCPU ``vcpu``'s payload replaced."""
    meta, table, base = parse_record_v2(rec)
    payloads = {name: (version, rec[base + off : base + off + length]) for name, version, off, length in table}
    payloads[f"vcpu{vcpu}"] = (payloads[f"vcpu{vcpu}"][0], payload)
    fixed = [n for n, *_ in table if n not in saveplan.VARIABLE]
    w = RecordWriter(meta, [(n, payloads[n][0], len(payloads[n][1])) for n in fixed], len(saveplan.VARIABLE))
    return w.build(b"".join(payloads[n][1] for n in fixed), [(n, *payloads[n]) for n in saveplan.VARIABLE])


def vcpu_cpuid(rec: bytes, vcpu: int) -> bytes:
    _, table, base = parse_record_v2(rec)
    off, length = next((o, ln) for n, _, o, ln in table if n == f"vcpu{vcpu}")
    _, cpuid_len, _ = vcpu_state.v2_shape(rec, base + off, length)
    c = base + off + vcpu_state.V2_FIXED
    return rec[c : c + cpuid_len]


@pytest.mark.parametrize("kind", ["v1", "shorter"])
def test_foreign_cpuid_is_kept_by_the_next_save(counter_elf: Path, runner: str, kind: str) -> None:
    """A record whose CPUID this VM did not compute (a v1 record with other bits; a v2 record with
    one entry fewer, so another layout): the guest keeps it, and the successor's next save carries
    it, at its length."""
    sink = MemoryConsoleSink()
    old = booted(counter_elf, sink)
    new: Vm | None = None
    third: Vm | None = None
    try:
        assert sink.wait_for(r"^count 0+2$", 10)
        old.pause()
        if kind == "v1":
            meta, comps = parse_record(old.save(version=1))
            blobs = unpack_blobs(comps["vcpu1"][1])
            cp = bytearray(blobs["cpuid"])
            struct.pack_into("<I", cp, 8 + 40 * 3 + 12, struct.unpack_from("<I", cp, 8 + 40 * 3 + 12)[0] ^ 1)
            blobs["cpuid"] = want = bytes(cp)
            comps["vcpu1"] = (comps["vcpu1"][0], pack_blobs(blobs))
            rec = build_record(meta, comps)
        else:
            rec = old.save()
            _, table, base = parse_record_v2(rec)
            off, length = next((o, ln) for n, _, o, ln in table if n == "vcpu1")
            p = rec[base + off : base + off + length]
            flags, cpuid_len, nmsrs = vcpu_state.v2_shape(p, 0, length)
            f = vcpu_state.V2_FIXED
            nent = (cpuid_len - 8) // 40
            want = struct.pack("<II", nent - 1, 0) + p[f + 8 : f + cpuid_len - 40]
            head = vcpu_state.V2_HEAD.pack(flags, len(want), nmsrs, 0)
            rec = rebuilt(rec, 1, head + p[len(head) : f] + want + p[f + cpuid_len :])
        new = successor_of(old, sink)
        third = Vm.create("t3", old.mem_bytes, old.ncpus, memfd=old.memfd, console=sink)  # before old closes it
        new.restore(rec)
        cpuid0 = old.vcpus[0].state.cpuid
        assert new.vcpus[1].state.cpuid == want and new.vcpus[0].state.cpuid == cpuid0
        switch_over(old, new, sink)
        new.pause()
        again = new.save()
        assert vcpu_cpuid(again, 1) == want and vcpu_cpuid(again, 0) == cpuid0
        third.restore(again)
        assert third.vcpus[1].state.cpuid == want
    finally:
        old.stop()
        for v in (new, third):
            if v is not None:
                v.stop()
