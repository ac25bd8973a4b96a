"""A cancelled or failed update leaves the guest running on the old VMM."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from luo.testing.console import check_continuity
from luo.testing.host import HostProcess
from luo.testing.processes import alive
from luo.testing.vms import HB_MS, MARGIN_MS, more_beats, vmm_pid, vmm_processes
from luo.testing.wait import wait_for


def successor_vmm_pids(host: HostProcess) -> list[int]:
    return vmm_processes(host, successors_only=True)


def test_cancel_at_prepare_keeps_old_vmm(vm_host) -> None:  # noqa: ANN001
    host = vm_host("c1")
    pid = vmm_pid(host, "c1")
    host.luo("prepare")
    assert host.state() == "prepared"
    succ = successor_vmm_pids(host)
    assert succ, "prepare should have warmed a successor VMM"
    host.luo("cancel")
    assert host.state() == "normal"
    wait_for(lambda: not any(alive(p) for p in succ), 30, "the warmed successor VMM to go")
    more_beats(host, "c1", 3)
    assert vmm_pid(host, "c1") == pid
    con = host.console("c1")
    assert not check_continuity(con.heartbeats(), HB_MS, MARGIN_MS)
    assert not con.problems()


def test_cancel_at_freeze_resumes_on_old_vmm(vm_host) -> None:  # noqa: ANN001
    host = vm_host("c2", cmdline="hb_ms=100 stall_ms=0")  # the freeze below is a long pause on purpose
    con = host.console("c2")
    pid = vmm_pid(host, "c2")
    host.luo("prepare")
    host.luo("freeze")
    assert host.state() == "frozen"
    frozen_at = con.count()
    host.luo("status")  # the host still answers while its VMs are paused
    host.luo("cancel")
    assert host.state() == "normal"
    more_beats(host, "c2", 3)
    beats = con.heartbeats()
    assert beats[-1].seq >= frozen_at + 2
    assert vmm_pid(host, "c2") == pid
    seqs = [b.seq for b in beats]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert len({b.boot_id for b in beats}) == 1


def test_successor_vmm_killed_during_restore(vm_host) -> None:  # noqa: ANN001
    host = vm_host("c3")
    con = host.console("c3")
    pid = vmm_pid(host, "c3")
    out: dict[str, subprocess.CompletedProcess[str]] = {}

    def run() -> None:
        out["cp"] = host.luo("update", "--json", "--fault", "vmm-successor-stall-restore", check=False)

    t = threading.Thread(target=run)
    t.start()
    stalled = host.rt.vm_dir("c3") / "successor.stalled"
    spid = int(wait_for(lambda: stalled.exists() and stalled.read_text().strip(), 60, "the successor VMM to stall"))
    os.kill(spid, signal.SIGKILL)
    t.join(120)
    # the host update itself went through; the VM fell back to its old VMM under the new host
    assert out["cp"].returncode == 0, out["cp"].stderr
    wait_for(lambda: any(v["name"] == "c3" and v["state"] == "running" and v["pid"] == pid
                         for v in host.client().status()["vms"]), 30, "the old VMM to re-register")
    more_beats(host, "c3", 3)
    beats = con.heartbeats()
    assert len({b.boot_id for b in beats}) == 1
    seqs = [b.seq for b in beats]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # and it is preserved again: the next update works normally
    host.luo("finish")
    r = host.update()
    assert "c3" in r["vms"]
    more_beats(host, "c3", 2)


def test_successor_vmm_that_cannot_warm_fails_prepare(vm_host) -> None:  # noqa: ANN001
    host = vm_host("c4")
    pid = vmm_pid(host, "c4")
    old_host = host.pid
    cp = host.luo("update", "--fault", "vmm-successor-fail-warm", check=False)
    assert cp.returncode == 1 and "nothing was frozen" in cp.stderr and "ENOMEM" in cp.stderr, cp.stderr
    assert host.pid == old_host and host.state() == "normal"
    more_beats(host, "c4", 3)
    assert vmm_pid(host, "c4") == pid
    r = host.update()  # and the next update goes through
    assert "c4" in r["vms"]


def test_successor_host_dying_after_confirmation(vm_host) -> None:  # noqa: ANN001
    """The VMs already moved on to their successor VMMs; the old host takes them back under its wing."""
    host = vm_host("c5")
    con = host.console("c5")
    old_vmm = vmm_pid(host, "c5")
    old_host = host.pid
    cp = host.luo("update", "--fault", "successor-exit-after-confirm", check=False)
    assert cp.returncode == 1 and "died after confirming" in cp.stderr, cp.stderr
    assert host.pid == old_host and host.state() == "normal"
    wait_for(lambda: any(v["name"] == "c5" and v["state"] == "running" and v["pid"] != old_vmm
                         for v in host.client().status()["vms"]), 60, "the successor VMM to register here")
    wait_for(lambda: [s["name"] for s in host.client().status()["sessions"]] == ["vm:c5"], 30,
             "the VM's memory to be preserved again")
    more_beats(host, "c5", 3)
    beats = con.heartbeats()
    assert len({b.boot_id for b in beats}) == 1
    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))
    r = host.update()  # and the next update works
    assert "c5" in r["vms"]
