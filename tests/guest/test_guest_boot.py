"""Boot the test guest under the real VMM and check what it promises on its console.

The VMM runs as `python -m luo.vmm.run` in a subprocess, exactly as a developer would run it;
the tests wait on the console file with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guest_console import (
    FATAL,
    READY,
    after,
    bad_lines,
    boots,
    heartbeats,
    integrity_passes,
    integrity_start,
    mono_gaps,
    wait_file,
)

pytestmark = pytest.mark.kvm

MiB = 1 << 20


class Runner:
    def __init__(self, proc: subprocess.Popen[str], console: Path) -> None:
        self.proc = proc
        self.console = console

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, pred: Callable[[list[str]], bool], timeout: float = 30.0) -> list[str]:
        return wait_file(self.console, pred, timeout, self.alive)


RunGuest = Callable[..., Runner]


@pytest.fixture
def run_guest(guest_elf: Path, tmp_path: Path) -> Iterator[RunGuest]:
    procs: list[subprocess.Popen[str]] = []

    def start(cpus: int, mem: str, cmdline: str, seconds: float = 60.0) -> Runner:
        console = tmp_path / f"console-{len(procs)}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "luo.vmm.run",
                "--image",
                str(guest_elf),
                "--mem",
                mem,
                "--cpus",
                str(cpus),
                "--cmdline",
                cmdline,
                "--console",
                str(console),
                "--seconds",
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        return Runner(proc, console)

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)  # the runner stops the VM cleanly on Ctrl-C
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def enough(n_beats: int, passes: int) -> Callable[[list[str]], bool]:
    def pred(lines: list[str]) -> bool:
        if any(ln.startswith(FATAL) for ln in lines):
            return True  # fail fast, the assertions below say why
        return len(heartbeats(lines)) >= n_beats and len(integrity_passes(lines)) >= passes

    return pred


def check_heartbeats(lines: list[str], hb_ms: int, boot_id: str) -> None:
    hbs = heartbeats(lines)
    assert [h.seq for h in hbs] == list(range(len(hbs))), "heartbeat seq must count from 0 without gaps"
    assert all(h.boot_id == boot_id for h in hbs)
    gaps = mono_gaps(hbs)
    assert all(g > 0 for g in gaps), "mono_ns must increase"
    hb_ns = hb_ms * 1_000_000
    assert all(0.5 * hb_ns <= g <= 2 * hb_ns for g in gaps), gaps
    assert abs(sum(gaps) / len(gaps) - hb_ns) < 0.15 * hb_ns, gaps


def test_two_vcpus_boot_beat_and_verify(run_guest: RunGuest) -> None:
    cmdline = "hb_ms=100 stall_ms=50 integrity_mb=16 some_unknown_word x=y"
    r = run_guest(2, "256M", cmdline)
    lines = r.wait(enough(n_beats=4, passes=1))
    assert not [ln for ln in lines if ln.startswith(FATAL)], lines

    (boot,) = boots(lines)
    assert boot.cpus == 2 and boot.mem == 256 * MiB and boot.cmdline == cmdline
    assert READY in lines and lines.index(READY) > lines.index(
        next(ln for ln in lines if ln.startswith("luo-guest boot"))
    )
    check_heartbeats(after(lines, READY), 100, boot.boot_id)

    start = integrity_start(lines)
    assert start is not None
    gpa, size = start
    assert size == 16 * MiB and gpa >= 0x100000 and gpa + size <= 256 * MiB
    assert all(b == size for _n, b in integrity_passes(lines))
    assert [n for n, _b in integrity_passes(lines)] == list(range(1, len(integrity_passes(lines)) + 1))
    assert all(h.integrity_ok for h in heartbeats(lines))
    assert bad_lines(lines) == []


def test_one_vcpu_interleaves_heartbeat_and_integrity(run_guest: RunGuest) -> None:
    r = run_guest(1, "128M", "hb_ms=50 integrity_mb=8")
    lines = r.wait(enough(n_beats=6, passes=2))
    (boot,) = boots(lines)
    assert boot.cpus == 1
    check_heartbeats(after(lines, READY), 50, boot.boot_id)
    start = integrity_start(lines)
    assert start is not None and start[1] == 8 * MiB
    assert bad_lines(lines) == [] and not any(ln.startswith(FATAL) for ln in lines)


def test_default_integrity_buffer_is_a_quarter_of_ram(run_guest: RunGuest) -> None:
    r = run_guest(3, "256M", "")
    lines = r.wait(lambda ls: integrity_start(ls) is not None and len(heartbeats(ls)) >= 2)
    start = integrity_start(lines)
    assert start is not None and start[1] == 64 * MiB
    assert boots(lines)[0].cpus == 3
    assert bad_lines(lines) == []
