"""Reading the test guest's console: heartbeats, integrity and stall lines (docs/guest.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT = re.compile(r"^heartbeat seq=(\d+) mono_ns=(\d+) boot_id=(\w+) integrity=(ok|FAIL)")


@dataclass(frozen=True)
class Heartbeat:
    seq: int
    mono_ns: int
    boot_id: str
    integrity: str


class Console:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def heartbeats(self) -> list[Heartbeat]:
        out = []
        for line in self.lines():
            m = HEARTBEAT.match(line)
            if m:
                out.append(Heartbeat(int(m[1]), int(m[2]), m[3], m[4]))
        return out

    def problems(self) -> list[str]:
        """Lines in which the guest reports trouble in its own words."""
        return [ln for ln in self.lines() if ln.startswith("stall") or "FAIL" in ln or "panic" in ln.lower()
                or "exception" in ln.lower()]

    def count(self) -> int:
        return len(self.heartbeats())
