"""The project's test guest (guest/build/luo-guest.elf, `make -C guest`): boots, heartbeats, survives restore."""

from __future__ import annotations

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
