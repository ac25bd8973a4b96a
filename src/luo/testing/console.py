"""Reading the test guest's console: heartbeats, integrity and stall lines (docs/guest.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The one definition of the test guest's heartbeat line (docs/guest.md).
HEARTBEAT = re.compile(r"^heartbeat seq=(\d+) mono_ns=(\d+) boot_id=([0-9a-f]{16}) integrity=(ok|FAIL)$")


@dataclass(frozen=True)
class Heartbeat:
    seq: int
    mono_ns: int
    boot_id: str
    integrity: str

    @property
    def integrity_ok(self) -> bool:
        return self.integrity == "ok"


def parse_heartbeats(lines: list[str]) -> list[Heartbeat]:
    return [Heartbeat(int(m[1]), int(m[2]), m[3], m[4]) for m in map(HEARTBEAT.match, lines) if m]


class Console:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def heartbeats(self) -> list[Heartbeat]:
        return parse_heartbeats(self.lines())

    def problems(self) -> list[str]:
        """Lines in which the guest reports trouble in its own words."""
        return [ln for ln in self.lines() if ln.startswith(("stall", "clock backwards")) or "FAIL" in ln]

    def count(self) -> int:
        return len(self.heartbeats())


def check_continuity(beats: list[Heartbeat], hb_ms: float, max_jump_ms: float) -> list[str]:
    """What is wrong with a heartbeat sequence: boot id changes, seq gaps, clock going back or jumping."""
    errors = []
    if not beats:
        return ["no heartbeat at all"]
    if len({b.boot_id for b in beats}) != 1:
        errors.append(f"boot id changed: {sorted({b.boot_id for b in beats})}")
    for a, b in zip(beats, beats[1:], strict=False):
        if b.seq != a.seq + 1:
            errors.append(f"heartbeat seq {a.seq} -> {b.seq}")
        gap_ms = (b.mono_ns - a.mono_ns) / 1e6
        if gap_ms <= 0:
            errors.append(f"guest clock went back at seq {b.seq}: {gap_ms:.3f} ms")
        elif gap_ms > hb_ms + max_jump_ms:
            errors.append(f"guest clock jumped {gap_ms:.1f} ms at seq {b.seq} (allowed {hb_ms + max_jump_ms:.1f})")
    if any(b.integrity != "ok" for b in beats):
        errors.append("a heartbeat reports integrity=FAIL")
    return errors
