"""The test guest's console lines, parsed (formats: docs/guest.md), and waiting on them.

Kept apart from the tests so the same parsing can be lifted by whoever checks a guest across a
live update: the lines are the guest's only interface.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from luo.testing.console import HEARTBEAT as HEARTBEAT_RE  # one definition of the line  # noqa: F401
from luo.testing.console import Heartbeat, parse_heartbeats

GUEST_DIR = Path(__file__).resolve().parents[2] / "guest"

BOOT_RE = re.compile(r'^luo-guest boot cpus=(\d+) mem=(\d+) boot_id=([0-9a-f]{16}) cmdline="(.*)"$')
READY = "luo-guest ready"
INTEGRITY_START_RE = re.compile(r"^integrity start addr=0x([0-9a-f]+) bytes=(\d+)$")
INTEGRITY_PASS_RE = re.compile(r"^integrity pass=(\d+) bytes=(\d+)$")
INTEGRITY_FAIL_RE = re.compile(
    r"^integrity FAIL addr=0x([0-9a-f]+) expected=0x([0-9a-f]+) got=0x([0-9a-f]+)$"
)
STALL_RE = re.compile(r"^stall gap_ns=(\d+) cpu=(\d+) at_ns=(\d+)$")
FATAL = "luo-guest FATAL"

Lines = list[str]


@dataclass(frozen=True)
class Boot:
    cpus: int
    mem: int
    boot_id: str
    cmdline: str


def mono_gaps(hbs: list[Heartbeat]) -> list[int]:
    """mono_ns between consecutive heartbeats."""
    return [b.mono_ns - a.mono_ns for a, b in pairwise(hbs)]


def boots(lines: Lines) -> list[Boot]:
    return [Boot(int(m[1]), int(m[2]), m[3], m[4]) for m in map(BOOT_RE.match, lines) if m]


def heartbeats(lines: Lines) -> list[Heartbeat]:
    return parse_heartbeats(lines)


def integrity_start(lines: Lines) -> tuple[int, int] | None:
    """(buffer GPA, bytes) of the integrity buffer, once announced."""
    for m in map(INTEGRITY_START_RE.match, lines):
        if m:
            return int(m[1], 16), int(m[2])
    return None


def integrity_passes(lines: Lines) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in map(INTEGRITY_PASS_RE.match, lines) if m]


def integrity_failures(lines: Lines) -> list[tuple[int, int, int]]:
    return [(int(m[1], 16), int(m[2], 16), int(m[3], 16)) for m in map(INTEGRITY_FAIL_RE.match, lines) if m]


def stalls(lines: Lines) -> list[tuple[int, int]]:
    """(gap_ns, cpu) of every stall the guest saw."""
    return [(int(m[1]), int(m[2])) for m in map(STALL_RE.match, lines) if m]


def bad_lines(lines: Lines) -> Lines:
    """Everything that means the guest is unhappy: failures, stalls, fatal exceptions."""
    return [ln for ln in lines if "FAIL" in ln or ln.startswith("stall ") or ln.startswith("clock backwards")]


class MemorySink:
    """A console sink for an in-process VM that tests can wait on (no polling)."""

    def __init__(self) -> None:
        self.lines: Lines = []
        self._cond = threading.Condition()

    def write_line(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def snapshot(self) -> Lines:
        with self._cond:
            return list(self.lines)

    def wait_until(self, pred: Callable[[Lines], bool], timeout: float) -> Lines:
        """The lines once pred(lines) holds; AssertionError with the console on timeout."""
        with self._cond:
            if self._cond.wait_for(lambda: pred(self.lines), timeout):
                return list(self.lines)
            raise AssertionError("guest console did not get there in time:\n" + "\n".join(self.lines[-40:]))


def wait_file(path: Path, pred: Callable[[Lines], bool], timeout: float, alive: Callable[[], bool]) -> Lines:
    """The console file's lines once pred holds, re-read as it grows, up to a deadline.

    ``alive`` says whether the writer still runs, so a VMM that died fails the wait at once.
    """
    deadline = time.monotonic() + timeout
    lines: Lines = []
    while True:
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()
            if pred(lines):
                return lines
        if time.monotonic() > deadline or not alive():
            raise AssertionError(
                f"guest console {path} did not get there in time:\n" + "\n".join(lines[-40:])
            )
        time.sleep(0.05)  # the file has no change notification we can block on portably


def after(lines: Lines, marker: str) -> Lines:
    """The lines after the last occurrence of ``marker``."""
    idx = max((i for i, ln in enumerate(lines) if ln == marker), default=-1)
    return lines[idx + 1 :]
