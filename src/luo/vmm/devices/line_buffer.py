"""Bytes to lines: what both consoles share (CR dropped, a line ends at LF)."""

from __future__ import annotations

from luo.vmm.devices.console_sink import ConsoleSink

MAX_LINE = 4096  # a guest that never sends LF still gets its output out


def feed(buf: bytearray, data: bytes, sink: ConsoleSink) -> None:
    for b in data:
        if b == 0x0A or len(buf) >= MAX_LINE:
            sink.write_line(buf.decode("utf-8", "replace"))
            buf.clear()
            if b == 0x0A:
                continue
        if b != 0x0D:
            buf.append(b)
