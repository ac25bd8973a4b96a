"""The successor side of the cross-process test: a fresh process, the RAM memfd inherited.

Protocol over its stdio pipes: builds its Vm around --memfd, writes b"R"; reads a u32 length and
the state record on stdin; restores, reports the restored registers, starts, waits for the next
"count" line, and writes one JSON line with what it saw and its timings.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time

from luo.vmm.devices.console_sink import FileConsoleSink, MemoryConsoleSink, TeeConsoleSink
from luo.vmm.vm import Vm


def read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("parent closed the pipe")
        buf += chunk
    return buf


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memfd", type=int, required=True)
    ap.add_argument("--mem", type=int, required=True)
    ap.add_argument("--cpus", type=int, required=True)
    ap.add_argument("--console", required=True)
    a = ap.parse_args()
    mem_sink = MemoryConsoleSink()
    vm = Vm.create("successor", a.mem, a.cpus, memfd=a.memfd, console=TeeConsoleSink(FileConsoleSink(a.console), mem_sink))
    os.write(1, b"R")
    (n,) = struct.unpack("<I", read_exact(0, 4))
    record = read_exact(0, n)
    vm.restore(record)
    r = vm.vcpus[0].state.regs()
    vm.start()
    resumed_at = time.monotonic()
    line = mem_sink.wait_for(r"^count ", 10)
    ap1 = mem_sink.wait_for(r"^ap1 ", 10)
    counter_ram = struct.unpack("<Q", os.pread(a.memfd, 8, 0x5000))[0]
    vm.stop()
    report = {
        "resumed_at": resumed_at,
        "regs": {k: getattr(r, k) for k in ("rip", "rbx", "r12", "r13", "rsp")},
        "first_count_line": line,
        "ap1_line": ap1,
        "counter_ram": counter_ram,
        "timings": vm.timings,
        "stop_reason": vm.stop_reason,
    }
    os.write(1, (json.dumps(report) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
