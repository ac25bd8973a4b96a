"""Timeline spans that another process sent: kept as far as they are well formed.

Every process of an update (the hosts, each VMM and its successor) stamps its phases on
CLOCK_MONOTONIC, one clock for the machine, and hands them on to whoever writes the update record
(docs/observe.md). The sender may be another version, or broken: a span is accounting, never
a reason to stop, so a bad one is dropped, not refused.
"""

from __future__ import annotations

from typing import Any

MAX_SPANS = 32  # per sender; an update has a dozen phases per process


def spans_of(got: object, lane: str) -> list[dict[str, Any]]:
    """The well-formed spans of ``got`` (a list of dicts), all put in ``lane``."""
    out: list[dict[str, Any]] = []
    for e in got[:MAX_SPANS] if isinstance(got, list) else []:
        if not isinstance(e, dict) or not isinstance(e.get("phase"), str):
            continue
        a, b, pid = e.get("start_ns"), e.get("end_ns"), e.get("pid")
        if all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (a, b, pid)) and a <= b:
            out.append({"lane": lane, "pid": pid, "phase": e["phase"][:32], "start_ns": a, "end_ns": b})
    return out


def span(lane: str, pid: int, phase: str, start_ns: int, end_ns: int) -> dict[str, Any]:
    return {"lane": lane, "pid": pid, "phase": phase, "start_ns": start_ns, "end_ns": end_ns}
