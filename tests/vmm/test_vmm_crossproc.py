"""Real KVM, two processes: save in this one, rebuild around the same RAM memfd in a child.

A KVM fd is useless in another process (EIO), so only the memfd crosses (inherited) and the state
record goes over a pipe. The guest's count must continue exactly (no gap, no repeat, no broken
line in the shared O_APPEND console log), its registers must be those saved, and the blackout is
printed: pause → save → pipe → restore → start, with the successor built before the pause.
"""

from __future__ import annotations

import json
import os
import re
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from luo.vmm.devices.console_sink import FileConsoleSink, MemoryConsoleSink, TeeConsoleSink
from luo.vmm.vm import Vm

pytestmark = pytest.mark.kvm
CHILD = Path(__file__).parent / "successor_child.py"
LINE = re.compile(r"^(count|ap1) ([0-9a-f]{16})$")


def read_with_timeout(fd: int, n: int, timeout: float) -> bytes:
    end = time.monotonic() + timeout
    buf = b""
    while len(buf) < n:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"child sent {buf!r} of {n} bytes in {timeout} s")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError(f"child closed stdout after {buf!r}")
        buf += chunk
    return buf


def read_line(fd: int, timeout: float) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        buf += read_with_timeout(fd, 1, timeout)
    return buf


@pytest.mark.parametrize("mem", [256 << 20, 4 << 30], ids=["256M", "4G"])
def test_restore_in_another_process(counter_elf: Path, tmp_path: Path, mem: int) -> None:
    log_path = tmp_path / "console.log"
    sink = MemoryConsoleSink()
    vm = Vm.create("pred", mem, 2, console=TeeConsoleSink(FileConsoleSink(str(log_path)), sink))
    vm.boot(str(counter_elf), "")
    vm.start()
    errlog = open(tmp_path / "child.stderr", "wb")  # closed in finally
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "--memfd", str(vm.memfd), "--mem", str(mem), "--cpus", "2", "--console", str(log_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog, pass_fds=(vm.memfd,),
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert read_with_timeout(child.stdout.fileno(), 1, 30) == b"R"  # successor built, before the pause
        assert sink.wait_for(r"^count 0+3$", 10)
        t0 = time.monotonic()
        vm.pause()
        rec = vm.save()
        regs = vm.vcpus[0].state.regs()
        os.write(child.stdin.fileno(), struct.pack("<I", len(rec)) + rec)
        report = json.loads(read_line(child.stdout.fileno(), 30))
        vm.stop()
        assert child.wait(10) == 0
    except BaseException:
        print("child stderr:\n" + (tmp_path / "child.stderr").read_text())
        print("console:\n" + log_path.read_text()[-2000:])
        raise
    finally:
        errlog.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        vm.stop()
    blackout = (report["resumed_at"] - t0) * 1000
    print(f"\n{mem >> 20} MiB x2 vCPUs: pause {vm.timings['pause']:.3f} ms, save {vm.timings['save']:.3f} ms "
          f"({len(rec)} B), restore {report['timings']['restore']:.3f} ms, resume {report['timings']['resume']:.3f} ms, "
          f"blackout incl. pipe {blackout:.3f} ms; successor create {report['timings']['create']:.1f} ms")
    assert report["regs"] == {k: getattr(regs, k) for k in ("rip", "rbx", "r12", "r13", "rsp")}
    assert report["stop_reason"] is None
    assert report["first_count_line"] is not None and report["ap1_line"] is not None
    assert report["counter_ram"] > regs.rbx - 1
    lines = log_path.read_text().splitlines()
    bad = [ln for ln in lines if not LINE.match(ln)]
    assert bad == [], "a console line broke across the handover"
    counts = [int(ln[6:], 16) for ln in lines if ln.startswith("count")]
    assert counts == list(range(1, len(counts) + 1)), "the guest counter skipped or repeated"
    assert counts[-1] >= regs.rbx  # the successor printed the pause point (the count may be printed after the pause)
