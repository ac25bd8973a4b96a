"""Boot the QEMU driver's default guest (Debian's cloud kernel + luo-linux-guest) under plain QEMU.

QEMU is started by hand here, as the future driver will: TCG (KVM under PVM does not run a stock
guest, /work/shared/reference/qemu-notes.md), guest RAM in a memfd this test owns and passes as an
inherited fd, the console in a file read with the test guest's own parser. Each boot takes ~3 s
to the first line on this machine kind; the module about 10 s.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from luo.qemu.guest import DEFAULT_APPEND, default_initrd, default_kernel, qemu_binary
from luo.testing.console import Console, check_continuity
from luo.testing.wait import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 is not installed (scripts/setup.sh installs qemu-system-x86)",
)

MEM = 512 << 20
BOOT = re.compile(r'^luo-guest boot cpus=(\d+) mem=(\d+) boot_id=([0-9a-f]{16}) cmdline="(.*)"$')
INTEGRITY_START = re.compile(r"^integrity start addr=0x([0-9a-f]+) bytes=(\d+)$")
INTEGRITY_PASS = re.compile(r"^integrity pass=(\d+) bytes=(\d+)$")
# Boot (~3 s here) plus a second of beats, with room for a slow shared machine.
DEADLINE_S = 45.0


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    console: Console
    memfd: int
    stderr: Path

    def describe(self) -> str:
        """What to show when an assertion fails: the console and QEMU's own complaints."""
        err = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return (
            "console:\n" + "\n".join(self.console.lines()[-40:]) + ("\nqemu stderr:\n" + err if err else "")
        )

    def wait(self, beats: int, passes: int = 1) -> list[str]:
        """The console once it has `beats` heartbeats and `passes` integrity passes."""

        def ready() -> list[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu exited with {self.proc.returncode}\n{self.describe()}")
            lines = self.console.lines()
            n_pass = sum(1 for ln in lines if INTEGRITY_PASS.match(ln))
            return lines if self.console.count() >= beats and n_pass >= passes else None

        try:
            return wait_for(ready, DEADLINE_S, f"{beats} heartbeats and {passes} integrity pass(es)")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.describe()}") from None


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Callable[[str], Guest]]:
    """Starts guests; kills every QEMU and closes its memfd afterwards, whatever the test did."""
    guests: list[Guest] = []

    def start(append: str) -> Guest:
        memfd = os.memfd_create("luo-test-guest-ram")
        os.ftruncate(memfd, MEM)
        n = len(guests)
        log, err = tmp_path / f"console{n}.log", tmp_path / f"qemu{n}.err"
        argv = [
            qemu_binary(), "-accel", "tcg", "-m", "512M", "-smp", "1", "-nodefaults", "-display", "none",
            "-monitor", "none", "-serial", f"file:{log}",
            "-kernel", str(default_kernel()), "-initrd", str(default_initrd()), "-append", append,
            "-object", f"memory-backend-file,id=ram0,size={MEM},mem-path=/proc/self/fd/{memfd},share=on",
            "-machine", "pc,memory-backend=ram0",
        ]  # fmt: skip
        with err.open("wb") as errf:
            proc = subprocess.Popen(argv, pass_fds=(memfd,), stdin=subprocess.DEVNULL,
                                    stdout=errf, stderr=errf)  # fmt: skip
        g = Guest(proc, Console(log), memfd, err)
        guests.append(g)
        return g

    yield start
    for g in guests:
        if g.proc.poll() is None:
            g.proc.kill()
        g.proc.wait(timeout=10)
        os.close(g.memfd)


def beat_gaps_ms(console: Console) -> list[float]:
    beats = console.heartbeats()
    return [(b.mono_ns - a.mono_ns) / 1e6 for a, b in zip(beats, beats[1:], strict=False)]


def check_guest(g: Guest, lines: list[str], hb_ms: int) -> re.Match[str]:
    """What every healthy boot shows; returns the boot line's match."""
    ctx = g.describe()
    boots = [m for m in map(BOOT.match, lines) if m]
    assert len(boots) == 1, f"expected one boot line\n{ctx}"
    beats = g.console.heartbeats()
    assert len(beats) >= 10, ctx
    assert beats[0].seq == 0, ctx
    assert {b.boot_id for b in beats} == {boots[0][3]}, ctx
    # Consecutive seq, one boot id, integrity=ok, no beat later than a host hiccup on a shared
    # 2-core machine (under TCG time QEMU does not run passes in the guest). "About hb_ms" is the
    # median: a beat late by less than a period is made up by a shorter gap to the next one.
    assert check_continuity(beats, hb_ms, max_jump_ms=300) == [], ctx
    gaps = beat_gaps_ms(g.console)
    assert abs(statistics.median(gaps) - hb_ms) < hb_ms * 0.05, f"beat gaps {gaps}\n{ctx}"
    assert [ln for ln in lines if "FAIL" in ln] == [], ctx
    assert any(INTEGRITY_PASS.match(ln) for ln in lines), ctx
    return boots[0]


def test_default_guest_boots_and_beats(boot: Callable[[str], Guest]) -> None:
    g = boot(DEFAULT_APPEND)
    lines = g.wait(beats=10)
    m = check_guest(g, lines, hb_ms=100)
    assert m[1] == "1", g.describe()
    assert 0 < int(m[2]) <= MEM, "mem= is what the kernel manages: a little less than -m"
    assert m[4] == DEFAULT_APPEND
    starts = [s for s in map(INTEGRITY_START.match, lines) if s]
    assert len(starts) == 1 and int(starts[0][2]) == 64 << 20, g.describe()
    # The guest's RAM is the memfd: at least the 64 MiB integrity buffer landed in it.
    assert os.fstat(g.memfd).st_blocks * 512 >= 64 << 20


def test_cmdline_keys(boot: Callable[[str], Guest]) -> None:
    append = 'console=ttyS0 quiet panic=-1 hb_ms=50 stall_ms=80 integrity_mb=8 note="a b"'
    g = boot(append)
    lines = g.wait(beats=12, passes=2)
    m = check_guest(g, lines, hb_ms=50)
    # `"` shows as `?` on the boot line, as in the test guest.
    assert m[4] == append.replace('"', "?"), g.describe()
    starts = [s for s in map(INTEGRITY_START.match, lines) if s]
    assert len(starts) == 1 and int(starts[0][2]) == 8 << 20, g.describe()
    passes = [int(p[1]) for p in map(INTEGRITY_PASS.match, lines) if p]
    assert passes == list(range(1, len(passes) + 1)), g.describe()
    assert all(int(p[2]) == 8 << 20 for p in map(INTEGRITY_PASS.match, lines) if p)
