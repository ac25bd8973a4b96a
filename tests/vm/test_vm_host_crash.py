"""A host that dies outside an update takes its preserved fds with it, never its VMs."""

from __future__ import annotations

import os
import signal

from luo.testing.host import HostProcess
from luo.testing.processes import alive
from luo.testing.vms import more_beats, vmm_pid
from luo.testing.wait import wait_for


def test_vm_survives_host_crash_and_reattaches(vm_host) -> None:  # noqa: ANN001
    host = vm_host("h1")
    pid = vmm_pid(host, "h1")
    old = host.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), 10, "the host to die")
    more_beats(host, "h1", 3)  # the guest does not care
    again = HostProcess(host.root, {"LUO_ALLOW_FAULTS": "1"}).start()
    try:
        wait_for(lambda: any(v["name"] == "h1" and v["state"] == "running" and v["pid"] == pid
                             for v in again.client().status()["vms"]), 60, "the VMM to re-register")
        st = again.client().status()
        assert [s["name"] for s in st["sessions"]] == ["vm:h1"]  # preserved again
        r = again.update()  # and it crosses updates as before
        assert "h1" in r["vms"]
        more_beats(again, "h1", 2)
        beats = again.console("h1").heartbeats()
        assert len({b.boot_id for b in beats}) == 1
        assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))
    finally:
        again.stop()
