"""luo-mmio-console at 0xD0000000: a 1-byte write at offset 0 appends to the writer vCPU's line.

MMIO (unlike port I/O) works from guest ring 3 on PVM, which is why the guest has this console.
One line buffer per vCPU so concurrent writers never interleave inside a line.
"""

from __future__ import annotations

import json
import threading

from luo.vmm.devices.console_sink import ConsoleSink
from luo.vmm.devices.line_buffer import feed
from luo.vmm.state import check_version

MMIO_CONSOLE_GPA = 0xD0000000
MMIO_CONSOLE_SIZE = 0x1000
VERSION = 1


class MmioConsole:
    def __init__(self, ncpus: int, sink: ConsoleSink) -> None:
        self.sink = sink
        self._lines = [bytearray() for _ in range(ncpus)]
        self._lock = threading.Lock()

    def read(self, offset: int, size: int, cpu: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes, cpu: int) -> None:
        if offset == 0:
            with self._lock:
                feed(self._lines[cpu], data[:1], self.sink)

    def save(self) -> tuple[int, bytes]:
        with self._lock:
            return VERSION, json.dumps([b.decode("latin-1") for b in self._lines]).encode()

    def restore(self, version: int, payload: bytes) -> None:
        check_version("mmio-console", version, VERSION)
        lines = json.loads(payload)
        with self._lock:
            for i, s in enumerate(lines[: len(self._lines)]):
                self._lines[i] = bytearray(s.encode("latin-1"))
