"""What the guest is doing right now, as its VMM sees it: ``<runtime>/vms/NAME/guest.json``.

The VMM that runs the guest is the only one that knows whether its vCPUs run, so it writes this
file (atomically) at every change: started, paused for a freeze, resumed, handed to a successor
VMM, stopped. The host only reads it and checks that the named VMM is still alive, so ``luo vm
list`` and ``luo status`` tell an operator the truth even while no host runs, and never say
"running" for a paused guest or for a guest whose VMM died. Only the owner of the guest writes:
the old VMM until it sends ``go`` (or falls back), the successor VMM from its resume on.

The writer and the reader may be different installations (a host reads what any VMM wrote), so
the record carries ``format`` (``luo.abi.GUEST_STATE_FORMAT``, with its rule); one of a format
this version does not know is ignored like an unreadable one, never misread.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from luo.abi import GUEST_STATE_FORMAT
from luo.host.runtime import RuntimeDir, write_atomic

FILE = "guest.json"
STATES = ("running", "paused", "stopped")


def alive(pid: int) -> bool:
    """Running: a zombie only awaits its parent's wait and runs nothing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def write_guest_state(runtime: RuntimeDir, name: str, state: str, why: str = "") -> None:
    if state not in STATES:
        raise ValueError(f"guest state {state!r}")
    rec = {"format": GUEST_STATE_FORMAT, "state": state, "since": time.time(), "vmm_pid": os.getpid(), "why": why}
    try:
        write_atomic(runtime.vm_dir(name) / FILE, json.dumps(rec) + "\n")
    except OSError:
        pass  # reporting must never stop a guest


def read_guest_state(vm_dir: Path) -> dict[str, Any] | None:
    """The last record, checked: a VMM that is gone cannot run (or hold paused) a guest."""
    try:
        rec = json.loads((vm_dir / FILE).read_text())
        if rec.get("format", 1) != GUEST_STATE_FORMAT:  # no format: written before it was added, 1
            return None
        state, since, pid = str(rec["state"]), float(rec["since"]), int(rec["vmm_pid"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    out: dict[str, Any] = {"state": state, "since": since, "for_s": round(max(0.0, time.time() - since), 3),
                           "vmm_pid": pid}
    if rec.get("why"):
        out["why"] = str(rec["why"])
    if state != "stopped" and not alive(pid):
        out["state"] = "lost"
        out["why"] = f"its VMM pid {pid} is gone"
    return out
