"""Fault injection points, for the failure tests (like the kernel's fault injection).

Set ``LUO_FAULTS`` (comma-separated names) in the environment of a host; its successors inherit
it. Each name acts at exactly one point. Nothing here is active unless asked for.

- ``corrupt-tree``: the outgoing host damages the KHO blob it hands over.
- ``successor-stall-handover``: the successor writes ``<runtime>/successor.stalled`` (its pid) after
  receiving the handover and never confirms, so a test can kill it right there.
- ``successor-forget=<compatible>``: the successor acts as a version that does not know that compatible.
- ``vmm-successor-stall-restore``: a successor VMM writes ``<vm dir>/successor.stalled`` before restoring
  and waits, so a test can kill it during restore.
"""

from __future__ import annotations

import os


def active() -> set[str]:
    raw = os.environ.get("LUO_FAULTS", "")
    return {w.strip() for w in raw.split(",") if w.strip()}


def enabled(name: str) -> bool:
    return name in active()


def values(prefix: str) -> list[str]:
    """The arguments of every ``prefix=value`` fault."""
    return [w.split("=", 1)[1] for w in active() if w.startswith(prefix + "=")]
