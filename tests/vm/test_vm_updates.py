"""Guests live through updates of the host and the VMM."""

from __future__ import annotations

import json

from luo.testing.console import check_continuity
from luo.testing.processes import alive
from luo.testing.vms import HB_MS, MARGIN_MS, more_beats, vmm_pid
from luo.testing.wait import wait_for


def test_ten_updates_guest_goes_on(vm_host) -> None:  # noqa: ANN001
    host = vm_host("g1", mem="256M", cpus=2)
    con = host.console("g1")
    blackouts = []
    host_pids = {host.pid}
    vmm_pids = {vmm_pid(host, "g1")}
    for i in range(10):
        r = host.update()
        vm = r["vms"]["g1"]
        assert set(vm["parts_ms"]) >= {"pause", "save", "handover", "restore", "resume"}
        assert 0 < vm["blackout_ms"] < 1000, vm
        blackouts.append(vm["blackout_ms"])
        assert r["liveupdate_number"] == i + 1
        host_pids.add(r["new_pid"])
        host.luo("finish")
        vmm_pids.add(vmm_pid(host, "g1"))
        more_beats(host, "g1", 1)
    more_beats(host, "g1", 2)
    assert len(host_pids) == 11 and len(vmm_pids) == 11  # a new host and a new VMM each time
    assert not any(alive(p) for p in list(vmm_pids - {vmm_pid(host, "g1")}))
    beats = con.heartbeats()
    errors = check_continuity(beats, HB_MS, max(blackouts) + MARGIN_MS)
    assert not errors, errors
    assert beats[-1].seq >= 12
    assert not con.problems(), (con.problems(), blackouts)
    assert any(line.startswith("integrity pass=") for line in con.lines()[-200:])
    # one JSON record per update in the runtime dir
    records = sorted(host.rt.updates.glob("0*.json"))
    names = {p.name for p in records}
    for n in range(1, 11):
        assert f"{n:06d}.json" in names, names
    rec = json.loads((host.rt.updates / "000010.json").read_text())
    assert rec["vms"]["g1"]["blackout_ms"] == blackouts[-1]


def test_update_prints_blackout(vm_host) -> None:  # noqa: ANN001
    host = vm_host("g2", mem="256M", cpus=1)
    out = host.luo("update").stdout
    assert "vm g2: blackout" in out and "pause" in out and "restore" in out
    host.luo("finish")
    assert "g2" in host.luo("vm", "list").stdout
    st = host.luo("status").stdout
    assert "vm:g2" in st and "luo-vm:g2:ram" in st


def test_vm_stop_releases_its_session(vm_host) -> None:  # noqa: ANN001
    host = vm_host("g3", mem="256M", cpus=1)
    pid = vmm_pid(host, "g3")
    host.luo("vm", "stop", "g3")
    wait_for(lambda: not alive(pid), 30, "the VMM to exit")
    st = host.client().status()
    assert not [s for s in st["sessions"] if s["name"] == "vm:g3"]
    assert not st["files"]


def test_two_vms_cross_updates_together(vm_host) -> None:  # noqa: ANN001
    host = vm_host("a", mem="256M", cpus=1)
    host.luo("vm", "start", "b", "--mem", "512M", "--cpus", "2")
    wait_for(lambda: host.console("b").count() >= 2, 60, "b's first heartbeats")
    for _ in range(3):
        r = host.update()
        assert set(r["vms"]) == {"a", "b"}
        host.luo("finish")
    for name in ("a", "b"):
        more_beats(host, name, 2)
        con = host.console(name)
        assert not check_continuity(con.heartbeats(), HB_MS, 200.0), name
        assert not con.problems(), (name, con.problems())
    assert sorted(s["name"] for s in host.client().status()["sessions"]) == ["vm:a", "vm:b"]
