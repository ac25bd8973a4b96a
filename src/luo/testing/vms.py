"""Helpers for tests that watch a VM under a real host."""

from __future__ import annotations

from luo.testing.host import HostProcess
from luo.testing.processes import alive, pids_of
from luo.testing.wait import wait_for

HB_MS = 100.0  # the test guest's default heartbeat period
MARGIN_MS = 60.0  # scheduling noise of a shared 2-core machine, on top of a blackout


def vmm_pid(host: HostProcess, name: str) -> int:
    """The pid of the VMM that runs ``name`` now (it changes with every update)."""
    vms = {v["name"]: v for v in host.client().status()["vms"]}
    assert vms[name]["state"] == "running", vms
    return int(vms[name]["pid"])


def more_beats(host: HostProcess, name: str, n: int = 2, timeout: float = 30.0) -> None:
    """Wait until the guest printed ``n`` more heartbeats: proof that it runs."""
    have = host.console(name).count()
    wait_for(lambda: host.console(name).count() >= have + n, timeout, f"{n} more heartbeats from {name}")


def vmm_processes(host: HostProcess, successors_only: bool = False) -> list[int]:
    """Live VMM processes of the host's runtime dir (``luo ... vmm run|successor``)."""
    out = []
    for pid in pids_of(host.root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"vmm" in argv and alive(pid) and (not successors_only or b"successor" in argv):
            out.append(pid)
    return out


def require_kvm_and_guest() -> None:
    """Skip without /dev/kvm; fail (not skip) when the test guest was not built."""
    import os
    from pathlib import Path

    import pytest

    from luo.vmm.live.main import default_image

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    if not Path(default_image()).exists():
        pytest.fail(f"the test guest is not built ({default_image()}): run ./scripts/setup.sh")
