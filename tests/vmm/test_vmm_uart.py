"""The 16550 model alone: registers a polled and an interrupt-driven driver use, and its state."""

from __future__ import annotations

import errno

import pytest

from luo.errors import LuoError
from luo.vmm.devices.console_sink import MemoryConsoleSink
from luo.vmm.devices.mmio_console import MmioConsole
from luo.vmm.devices.uart16550 import Uart16550


def make() -> tuple[Uart16550, MemoryConsoleSink, list[int]]:
    sink, irqs = MemoryConsoleSink(), []
    return Uart16550(sink, irqs.append), sink, irqs


def out(u: Uart16550, s: bytes) -> None:
    for b in s:
        u.write(0, bytes([b]), 0)


def test_polled_output_lines() -> None:
    u, sink, irqs = make()
    assert u.read(5, 1, 0)[0] & 0x60 == 0x60  # THRE|TEMT always
    out(u, b"hello\r\nwor")
    assert sink.lines == ["hello"]
    out(u, b"ld\n")
    assert sink.lines == ["hello", "world"]
    assert irqs == []  # no interrupt enabled, no IRQ line activity


def test_divisor_latch_does_not_print() -> None:
    u, sink, _ = make()
    u.write(3, b"\x83", 0)  # DLAB
    u.write(0, b"\x01", 0)
    u.write(1, b"\x00", 0)
    assert (u.read(0, 1, 0), u.read(1, 1, 0)) == (b"\x01", b"\x00")
    u.write(3, b"\x03", 0)
    assert u.read(1, 1, 0) == b"\x00"  # IER again
    assert sink.lines == []


def test_thre_interrupt() -> None:
    u, _, irqs = make()
    assert u.read(2, 1, 0)[0] & 0x0F == 0x01  # nothing pending
    u.write(1, b"\x02", 0)  # ETBEI: THR is empty, so interrupt at once
    assert irqs == [1]
    assert u.read(2, 1, 0)[0] & 0x0F == 0x02  # reading IIR acknowledges THRE
    assert irqs == [1, 0]
    assert u.read(2, 1, 0)[0] & 0x0F == 0x01
    out(u, b"x")
    assert irqs == [1, 0, 1]


def test_rx_and_scratch() -> None:
    u, _, irqs = make()
    u.write(7, b"\x5a", 0)
    assert u.read(7, 1, 0) == b"\x5a"
    u.write(1, b"\x01", 0)
    u.feed_input(b"ab")
    assert irqs == [1] and u.read(5, 1, 0)[0] & 1
    assert u.read(2, 1, 0)[0] & 0x0F == 0x04
    assert u.read(0, 1, 0) + u.read(0, 1, 0) == b"ab"
    assert irqs == [1, 0]


def test_partial_line_survives_save_restore() -> None:
    u, sink, _ = make()
    u.write(1, b"\x02", 0)
    out(u, b"half a li")
    ver, blob = u.save()
    u2, sink2, irqs2 = make()
    u2.restore(ver, blob)
    out(u2, b"ne\n")
    assert sink.lines == [] and sink2.lines == ["half a line"]
    assert u2.ier == 2 and irqs2 == []  # the irqchip's own state carries the line level
    with pytest.raises(LuoError) as ei:
        u2.restore(ver + 1, blob)
    assert ei.value.errno == errno.EPROTO


def test_mmio_console_lines_per_vcpu() -> None:
    sink = MemoryConsoleSink()
    c = MmioConsole(2, sink)
    for a, b in zip(b"cpu0\n", b"cpu1\n", strict=True):
        c.write(0, bytes([a]), 0)
        c.write(0, bytes([b]), 1)
    c.write(0, b"p", 1)
    ver, blob = c.save()
    c2 = MmioConsole(2, sink)
    c2.restore(ver, blob)
    c2.write(0, b"\n", 1)
    assert sink.lines == ["cpu0", "cpu1", "p"]
