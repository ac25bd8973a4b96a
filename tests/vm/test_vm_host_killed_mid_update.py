"""The outgoing host SIGKILLed at each point of an update: the guest runs on (the host's freeze and
handover never pause it: each VM switches VMMs only once the new host holds everything), in exactly
one VMM, is preserved again with the host that serves next, and crosses the next update."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from luo.testing.processes import alive
from luo.testing.vms import more_beats, vmm_processes
from luo.testing.wait import wait_for
from luo.vmm.live.guest_state import read_guest_state

RESUME_BOUND_S = 1.0


def held(root: Path) -> tuple[str, int] | None:
    try:
        point, pid = (root / "host.held").read_text().split()
    except (OSError, ValueError):
        return None
    return point, int(pid)


@pytest.mark.parametrize("point", ["prepared", "frozen", "handover", "confirmed"])
def test_host_killed_mid_update(vm_host, point: str) -> None:  # noqa: ANN001
    host = vm_host("k1", cmdline="hb_ms=100 stall_ms=0")  # the hold is a long pause on purpose
    vdir = host.rt.vm_dir("k1")
    old_host = host.pid
    assert old_host is not None
    client = subprocess.Popen([*host.command, "--runtime-dir", str(host.root), "update", "--fault",
                               f"host-hold={point}"], env=host.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        at, pid = wait_for(lambda: held(host.root), 60, f"the host to hold at {point}")
        assert (at, pid) == (point, old_host)
        guest = read_guest_state(vdir)
        assert guest is not None
        assert guest["state"] == "running", guest  # whatever the host's phase: docs/design.md
        t_kill = time.time()
        os.kill(old_host, signal.SIGKILL)

        running = wait_for(lambda: (g := read_guest_state(vdir)) and g["state"] == "running" and g, 10,
                           "the guest to run")
        assert running["since"] <= t_kill or running["since"] - t_kill <= RESUME_BOUND_S, running
        assert running["vmm_pid"] != old_host
        wait_for(lambda: len(vmm_processes(host)) == 1, 10, "exactly one VMM left")
        more_beats(host, "k1", 3)
        # the successor held the prepared tree and every fd: it serves now, and the VM is preserved again
        wait_for(lambda: host.pid not in (None, old_host) and alive(host.pid), 10, "the successor to serve")
        st = wait_for(lambda: (s := host.client(timeout=5).status()) and any(
            v["name"] == "k1" and v["state"] == "running" for v in s["vms"]) and s, 30,
            "the VMM to register with the new host")
        assert st["last_update"].get("orphaned") is True, st["last_update"]
        assert [s["name"] for s in st["sessions"] if s.get("direction") != "in"] == ["vm:k1"]
        out, err = client.communicate(timeout=30)  # the client is told, not left waiting
        assert client.returncode != 0, out
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    if host.state() == "updated":
        host.luo("finish")
    r = host.update()
    assert "k1" in r["vms"], r
    more_beats(host, "k1", 3)
    beats = host.console("k1").heartbeats()
    assert len({b.boot_id for b in beats}) == 1
    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))
    assert not host.console("k1").problems()


def test_status_says_paused_while_frozen(vm_host) -> None:  # noqa: ANN001
    host = vm_host("p1", cmdline="hb_ms=100 stall_ms=0")
    host.luo("prepare")
    host.luo("freeze")
    vms = {v["name"]: v for v in host.client().status()["vms"]}
    assert vms["p1"]["state"] == "paused", vms
    assert vms["p1"]["guest"]["for_s"] >= 0
    host.luo("cancel")
    vms = {v["name"]: v for v in host.client().status()["vms"]}
    assert vms["p1"]["state"] == "running", vms
    more_beats(host, "p1", 2)
