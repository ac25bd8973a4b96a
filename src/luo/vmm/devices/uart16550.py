"""COM1: a 16550A at port 0x3F8 on IRQ 4, enough for a polled or an interrupt-driven driver.

Transmission is instant (LSR always shows THRE|TEMT), so the only interrupts are "THR empty"
and "data received". Output bytes become lines in a ConsoleSink; the unfinished line is part of
the saved state so a line the guest is half-way through writing survives a live update whole.

State version 2 is binary (``_V2``: the registers, then the RX queue and the partial line);
version 1 (JSON, ~5 µs each way inside the blackout) is still read, and written by ``save_v1``.
"""

from __future__ import annotations

import errno
import json
import struct
import threading
from collections.abc import Callable

from luo.errors import LuoError
from luo.vmm.devices.console_sink import ConsoleSink
from luo.vmm.devices.line_buffer import feed
from luo.vmm.state import check_version

COM1_PORT = 0x3F8
COM1_IRQ = 4
VERSION = 2
VERSION_V1 = 1
_V2 = struct.Struct("<7B??3xII")  # ier lcr mcr scr dll dlm fcr, thre_pending, irq_level, len(rx), len(line)

IER_ERBFI, IER_ETBEI = 0x01, 0x02
IIR_NONE, IIR_THRE, IIR_RDA, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
LCR_DLAB = 0x80
MCR_LOOP = 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_DEFAULT = 0xB0  # DCD | DSR | CTS: a terminal is attached and ready


class Uart16550:
    def __init__(self, sink: ConsoleSink, set_irq: Callable[[int], None]) -> None:
        self.sink = sink
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.dll = 0x0C
        self.dlm = 0
        self.fcr = 0
        self.thre_pending = False
        self.irq_level = 0
        self.rx = bytearray()
        self.line = bytearray()

    # --- bus side ---

    def read(self, offset: int, size: int, cpu: int) -> bytes:
        with self._lock:
            v = self._read(offset)
            self._update_irq()
        return bytes([v]) * size if size == 1 else v.to_bytes(size, "little")

    def write(self, offset: int, data: bytes, cpu: int) -> None:
        with self._lock:
            self._write(offset, data[0])
            self._update_irq()

    def feed_input(self, data: bytes) -> None:
        """Host-side input: bytes the guest reads from RBR."""
        with self._lock:
            self.rx += data
            self._update_irq()

    # --- registers ---

    def _read(self, off: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if off == 0:
            if dlab:
                return self.dll
            if self.rx:
                v = self.rx[0]
                del self.rx[0]
                return v
            return 0
        if off == 1:
            return self.dlm if dlab else self.ier
        if off == 2:
            iir = self._iir()
            if iir == IIR_THRE:
                self.thre_pending = False  # reading IIR acknowledges "THR empty"
            return iir | (IIR_FIFO if self.fcr & 1 else 0)
        if off == 3:
            return self.lcr
        if off == 4:
            return self.mcr
        if off == 5:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if off == 6:
            if self.mcr & MCR_LOOP:  # loopback: outputs wired back to the modem inputs
                m = self.mcr
                return ((m & 2) << 3) | ((m & 1) << 5) | ((m & 4) << 4) | ((m & 8) << 4)
            return MSR_DEFAULT
        return self.scr

    def _write(self, off: int, v: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if off == 0:
            if dlab:
                self.dll = v
            elif self.mcr & MCR_LOOP:
                self.rx.append(v)
                self.thre_pending = True
            else:
                feed(self.line, bytes([v]), self.sink)
                self.thre_pending = True
        elif off == 1:
            if dlab:
                self.dlm = v
            else:
                if v & IER_ETBEI and not self.ier & IER_ETBEI:
                    self.thre_pending = True  # enabling it with THR already empty interrupts at once
                self.ier = v & 0x0F
        elif off == 2:
            self.fcr = v & 0xC9
            if v & 2:
                self.rx.clear()
        elif off == 3:
            self.lcr = v
        elif off == 4:
            self.mcr = v & 0x1F
        elif off == 7:
            self.scr = v

    def _iir(self) -> int:
        if self.ier & IER_ERBFI and self.rx:
            return IIR_RDA
        if self.ier & IER_ETBEI and self.thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _update_irq(self) -> None:
        level = 0 if self._iir() == IIR_NONE else 1
        if level != self.irq_level:
            self.irq_level = level
            self._set_irq(level)

    # --- save / restore ---

    _FIELDS = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "fcr", "thre_pending", "irq_level")

    def save(self) -> tuple[int, bytes]:
        with self._lock:
            head = _V2.pack(self.ier, self.lcr, self.mcr, self.scr, self.dll, self.dlm, self.fcr, self.thre_pending,
                            bool(self.irq_level), len(self.rx), len(self.line))
            return VERSION, b"".join((head, self.rx, self.line))

    def save_v1(self) -> tuple[int, bytes]:
        with self._lock:
            d: dict[str, object] = {f: getattr(self, f) for f in self._FIELDS}
            d["rx"] = self.rx.decode("latin-1")
            d["line"] = self.line.decode("latin-1")
        return VERSION_V1, json.dumps(d).encode()

    def restore(self, version: int, payload: bytes) -> None:
        """The irqchip's own state carries the line level KVM saw; only our copy of it is set here."""
        if version != VERSION:
            check_version("uart16550", version, (VERSION, VERSION_V1))
            self._restore_v1(payload)
            return
        if len(payload) < _V2.size:
            raise LuoError(errno.EINVAL, "the uart16550 state is truncated")
        *regs, thre, irq, nrx, nline = _V2.unpack_from(payload)
        if _V2.size + nrx + nline != len(payload):
            raise LuoError(errno.EINVAL, "the uart16550 state has the wrong length")
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr, self.dll, self.dlm, self.fcr = regs
            self.thre_pending, self.irq_level = thre, int(irq)
            self.rx = bytearray(payload[_V2.size : _V2.size + nrx])
            self.line = bytearray(payload[_V2.size + nrx :])

    def _restore_v1(self, payload: bytes) -> None:
        d = json.loads(payload)
        with self._lock:
            for f in self._FIELDS:
                setattr(self, f, type(getattr(self, f))(d[f]))
            self.rx = bytearray(d["rx"].encode("latin-1"))
            self.line = bytearray(d["line"].encode("latin-1"))
