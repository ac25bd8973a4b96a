"""A VMM or the `luo update` client killed in the middle of an update: no guest is lost or left paused."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from luo.testing.processes import alive
from luo.testing.vms import more_beats, vmm_pid, vmm_processes
from luo.testing.wait import wait_for
from luo.vmm.live.guest_state import read_guest_state


def test_old_vmm_killed_after_saving_hands_the_guest_to_its_successor(vm_host) -> None:  # noqa: ANN001
    host = vm_host("o1", cmdline="hb_ms=100 stall_ms=0")
    vdir = host.rt.vm_dir("o1")
    old = vmm_pid(host, "o1")
    host.luo("prepare")
    [succ] = vmm_processes(host, successors_only=True)
    host.luo("freeze")  # the old VMM paused and saved the guest into the preserved state memfd
    assert read_guest_state(vdir)["state"] == "paused"
    t_kill = time.time()
    os.kill(old, signal.SIGKILL)
    g = wait_for(lambda: (g := read_guest_state(vdir)) and g["state"] == "running" and g["since"] > t_kill and g,
                 10, "the successor VMM to take the guest")
    assert g["vmm_pid"] == succ
    assert g["since"] - t_kill <= 1.0, g
    host.luo("cancel")  # the host did not see it happen: its update is cancelled, the guest stays put
    wait_for(lambda: any(v["name"] == "o1" and v["pid"] == succ and v["state"] == "running"
                         for v in host.client().status()["vms"]), 30, "the successor VMM to register")
    assert vmm_processes(host) == [succ]
    more_beats(host, "o1", 3)
    r = host.update()
    assert "o1" in r["vms"]
    more_beats(host, "o1", 2)
    beats = host.console("o1").heartbeats()
    assert len({b.boot_id for b in beats}) == 1
    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))


def test_update_client_killed_mid_update(vm_host) -> None:  # noqa: ANN001
    host = vm_host("u1", env={"LUO_PROBES": "h:hold-prepare"})
    old_host = host.pid
    client = subprocess.Popen([*host.command, "--runtime-dir", str(host.root), "update"], env=host.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fifo = host.root / "probe-h.hold"
    wait_for(fifo.exists, 60, "the update to reach the held prepare")
    client.kill()
    client.wait()
    with open(fifo, "wb"):  # release the prepare: the host goes on without its caller
        pass
    wait_for(lambda: host.pid != old_host and not alive(old_host), 60, "the update to complete")
    wait_for(lambda: any(v["name"] == "u1" and v["state"] == "running" for v in host.client().status()["vms"]),
             30, "the VM on its new VMM")
    more_beats(host, "u1", 3)
    assert len(vmm_processes(host)) == 1
    assert not host.console("u1").problems()
