"""Port and MMIO buses: an exit's address picks a device, which sees an offset into its range.

The writing vCPU's index travels with each access because the MMIO console keeps one line per vCPU.
"""

from __future__ import annotations

from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int, cpu: int) -> bytes: ...

    def write(self, offset: int, data: bytes, cpu: int) -> None: ...


class Bus:
    """A short list of (base, length, device); unknown reads see 0xff, unknown writes vanish."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, BusDevice]] = []

    def add(self, base: int, length: int, dev: BusDevice) -> None:
        self._ranges.append((base, length, dev))

    def _find(self, addr: int) -> tuple[int, BusDevice] | None:
        for base, length, dev in self._ranges:
            if base <= addr < base + length:
                return addr - base, dev
        return None

    def read(self, addr: int, size: int, cpu: int) -> bytes:
        hit = self._find(addr)
        return hit[1].read(hit[0], size, cpu) if hit else b"\xff" * size

    def write(self, addr: int, data: bytes, cpu: int) -> None:
        hit = self._find(addr)
        if hit:
            hit[1].write(hit[0], data, cpu)
