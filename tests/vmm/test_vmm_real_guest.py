"""The project's test guest (guest/build/luo-guest.elf, `make -C guest`): boots, heartbeats, survives restore."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from luo.vmm.devices.console_sink import MemoryConsoleSink
from luo.vmm.vm import Vm

REAL_GUEST = Path(__file__).resolve().parents[2] / "guest" / "build" / "luo-guest.elf"
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not REAL_GUEST.exists(), reason="guest/build/luo-guest.elf not built")]


def test_real_guest_heartbeats_across_restore() -> None:
    sink = MemoryConsoleSink()
    old = Vm.create("real", 256 << 20, 2, console=sink)
    new = Vm.create("real2", 256 << 20, 2, memfd=old.memfd, console=sink)
    try:
        old.boot(str(REAL_GUEST), "")
        old.start()
        assert sink.wait_for(r"heartbeat", 30), sink.lines[-5:]
        old.pause()
        rec = old.save()
        n = len(sink.lines)
        old.stop()
        new.restore(rec)
        new.start()
        assert sink.wait_for(r"heartbeat", 30, start=n), sink.lines[-5:]
        assert new.stop_reason is None
    finally:
        old.stop()
        new.stop()


def test_kvmclock_advances_by_the_blackout() -> None:
    """KVM_SET_CLOCK with KVM_CLOCK_REALTIME: guest time after restore includes the time spent saved."""
    sink = MemoryConsoleSink()
    old = Vm.create("clk", 256 << 20, 1, console=sink)
    new = Vm.create("clk2", 256 << 20, 1, memfd=old.memfd, console=sink)
    hb = re.compile(r"heartbeat seq=(\d+) mono_ns=(\d+)")
    try:
        old.boot(str(REAL_GUEST), "")
        old.start()
        assert sink.wait_for(hb.pattern, 30)
        old.pause()
        rec = old.save()
        before = [hb.search(ln) for ln in sink.lines]
        seq0, ns0 = next((int(m[1]), int(m[2])) for m in reversed(before) if m)
        n = len(sink.lines)
        old.stop()
        held = 0.5
        t0 = time.monotonic()
        threading.Event().wait(held)  # the blackout under test, not a synchronisation
        new.restore(rec)
        new.start()
        real = time.monotonic() - t0
        line = sink.wait_for(hb.pattern, 30, start=n)
        assert line is not None
        m = hb.search(line)
        assert m is not None
        seq1, ns1 = int(m[1]), int(m[2])
        assert seq1 == seq0 + 1
        gap = (ns1 - ns0) / 1e9
        print(f"\nguest clock gap across a {real * 1000:.0f} ms saved interval: {gap * 1000:.0f} ms")
        assert gap >= held
    finally:
        old.stop()
        new.stop()
