"""Drive an update from a client: ask the host, then follow the successor until it reports.

The old host answers the update request just before it exits; the CLI then reconnects (to the
same socket, now served by the successor) to collect what happened after the switch.
"""

from __future__ import annotations

import os
from typing import Any

from luo.client.client import Client


def update(runtime_dir: str | os.PathLike[str] | None = None, to: str | list[str] | None = None,
           timeout: float = 10.0, connect_timeout: float = 0.0, faults: list[str] | None = None,
           qemu: str | None = None) -> dict[str, Any]:
    """``qemu``: the QEMU binary the successor VMMs of QEMU VMs run (default: the new installation's)."""
    extra = {"qemu": qemu} if qemu else {}
    with Client(runtime_dir, timeout=connect_timeout) as c:
        reply, _ = c.call("update", to=to, handover_timeout=timeout, retry=False, faults=faults or [], **extra)
    result = {k: v for k, v in reply.items() if k != "errno"}
    with Client(runtime_dir, timeout=connect_timeout) as c:
        reply, _ = c.call("wait_update", wait=30.0, timeout=60.0)
    after = reply.get("update") or {}
    if after.get("vms"):
        result["vms"] = after["vms"]
    return result
