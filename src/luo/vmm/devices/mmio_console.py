"""luo-mmio-console at 0xD0000000: a 1-byte write at offset 0 appends to the writer vCPU's line.

MMIO (unlike port I/O) works from guest ring 3 on PVM, which is why the guest has this console.
One line buffer per vCPU so concurrent writers never interleave inside a line.

State version 2: ``u32 count | count x u32 length | the partial lines``; version 1 (JSON) is still
read, and written by ``save_v1``.
"""

from __future__ import annotations

import errno
import json
import struct
import threading

from luo.errors import LuoError
from luo.vmm.devices.console_sink import ConsoleSink
from luo.vmm.devices.line_buffer import feed
from luo.vmm.state import check_version

MMIO_CONSOLE_GPA = 0xD0000000
MMIO_CONSOLE_SIZE = 0x1000
VERSION = 2
VERSION_V1 = 1


class MmioConsole:
    def __init__(self, ncpus: int, sink: ConsoleSink) -> None:
        self.sink = sink
        self._lines = [bytearray() for _ in range(ncpus)]
        self._lock = threading.Lock()
        self._head = struct.Struct(f"<{ncpus + 1}I")  # version 2: count, then each line's length

    def read(self, offset: int, size: int, cpu: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes, cpu: int) -> None:
        if offset == 0:
            with self._lock:
                feed(self._lines[cpu], data[:1], self.sink)

    def save(self) -> tuple[int, bytes]:
        with self._lock:
            lines = self._lines
            return VERSION, b"".join([self._head.pack(len(lines), *map(len, lines)), *lines])

    def save_v1(self) -> tuple[int, bytes]:
        with self._lock:
            return VERSION_V1, json.dumps([b.decode("latin-1") for b in self._lines]).encode()

    def restore(self, version: int, payload: bytes) -> None:
        if version != VERSION:
            check_version("mmio-console", version, (VERSION, VERSION_V1))
            lines = [bytearray(s.encode("latin-1")) for s in json.loads(payload)]
        else:
            n = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else -1
            head = self._head if n == len(self._lines) else struct.Struct(f"<{n + 1}I")
            lens = head.unpack_from(payload)[1:] if 0 <= n and 4 + 4 * n <= len(payload) else None
            if lens is None or 4 + 4 * n + sum(lens) != len(payload):
                raise LuoError(errno.EINVAL, "the mmio-console state is truncated")
            off, lines = 4 + 4 * n, []
            for ln in lens:
                lines.append(bytearray(payload[off : off + ln]))
                off += ln
        with self._lock:
            for i, b in enumerate(lines[: len(self._lines)]):
                self._lines[i] = b
