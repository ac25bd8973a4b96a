"""QEMU VMs with the stock Linux guest under a real host: updates replace QEMU itself, the guest's
RAM memfd never moves, failures leave the guest on its old QEMU. (The guest alone: test_linux_guest.py.)"""

from __future__ import annotations

from pathlib import Path

from qemu_helpers import HB_MS, MARGIN_MS, memfd_inode, more_beats, vm_of

from luo.testing.console import check_continuity
from luo.testing.processes import alive
from luo.testing.wait import wait_for


def test_five_updates_replace_qemu_and_keep_the_guest(qemu_host) -> None:  # noqa: ANN001
    host = qemu_host(("q", "qemu"))
    con = host.console("q")
    first = vm_of(host, "q")
    assert first["vmm"] == "qemu" and first["qemu_pid"] > 0
    inode = memfd_inode(first["qemu_pid"], "q")
    qemu_pids = [first["qemu_pid"]]
    blackouts = []
    for _ in range(5):
        r = host.update()
        vm = r["vms"]["q"]
        assert vm["migration"]["bytes"] < 1 << 20, vm["migration"]  # device state only: RAM never moves
        assert 0 < vm["qmp_blackout_ms"] < 1000 and 0 < vm["blackout_ms"] < 1000, vm
        blackouts.append(max(vm["qmp_blackout_ms"], vm["blackout_ms"]))
        host.luo("finish")
        now = vm_of(host, "q")
        assert now["qemu_pid"] not in qemu_pids, (now, qemu_pids)  # a new QEMU each time
        wait_for(lambda p=qemu_pids[-1]: not alive(p), 10, "the old QEMU to exit")
        qemu_pids.append(now["qemu_pid"])
        assert memfd_inode(now["qemu_pid"], "q") == inode  # the very same memfd
        more_beats(con, 2)
    beats = con.heartbeats()
    errors = check_continuity(beats, HB_MS, max(blackouts) + MARGIN_MS)
    assert not errors, errors
    assert len({b.seq for b in beats}) == len(beats)  # every line once: none lost, none twice
    assert sum(1 for ln in con.lines() if ln.startswith("luo-guest boot")) == 1
    assert not [ln for ln in con.lines() if "FAIL" in ln], con.lines()[-20:]
    stalls = [int(ln.split("gap_ns=")[1].split()[0]) / 1e6 for ln in con.lines() if ln.startswith("stall ")]
    assert all(s < max(blackouts) + MARGIN_MS for s in stalls), (stalls, blackouts)
    assert any(ln.startswith("integrity pass=") for ln in con.lines())


def test_successor_qemu_that_cannot_start_refuses_the_update(qemu_host, tmp_path: Path) -> None:  # noqa: ANN001
    host = qemu_host(("q", "qemu"))
    before = vm_of(host, "q")
    bad = tmp_path / "qemu-broken"
    bad.write_text("#!/bin/sh\necho 'this QEMU cannot start' >&2\nexit 3\n")
    bad.chmod(0o755)
    cp = host.luo("update", "--qemu", str(bad), check=False)
    assert cp.returncode != 0 and "prepare failed" in cp.stderr, cp.stderr
    after = vm_of(host, "q")
    assert after["qemu_pid"] == before["qemu_pid"] and after["state"] == "running"
    assert host.state() == "normal"
    more_beats(host.console("q"), 2)


def test_successor_qemu_dead_at_the_switch_gives_the_guest_back(qemu_host) -> None:  # noqa: ANN001
    host = qemu_host(("q", "qemu"))
    before = vm_of(host, "q")
    con = host.console("q")
    r = host.update("--fault", "qemu-successor-dies")
    host.luo("finish")
    # the host moved on; the guest stayed on its QEMU, which took it back, and re-attached
    wait_for(lambda: vm_of(host, "q")["state"] == "running", 30, "the VM registered again")
    after = vm_of(host, "q")
    assert after["qemu_pid"] == before["qemu_pid"], (before, after)
    assert r["new_pid"] != before["pid"]
    more_beats(con, 3)
    errors = check_continuity(con.heartbeats(), HB_MS, 5000)
    assert not errors, errors


def test_a_migration_that_fails_half_way_gives_the_guest_back(qemu_host) -> None:  # noqa: ANN001
    """The successor QEMU is alive and has part of the stream when the migration fails: the old
    QEMU resumes the guest, after its successor is gone."""
    host = qemu_host(("q", "qemu"), faults="qemu-migration-cancelled")
    before = vm_of(host, "q")
    con = host.console("q")
    host.update()
    host.luo("finish")
    wait_for(lambda: vm_of(host, "q")["state"] == "running", 30, "the VM registered again")
    assert vm_of(host, "q")["qemu_pid"] == before["qemu_pid"]
    more_beats(con, 3)
    assert "migration" in (host.rt.vm_dir("q") / "vmm.log").read_text()  # the fallback said why
    errors = check_continuity(con.heartbeats(), HB_MS, 5000)
    assert not errors, errors


def test_a_qemu_vm_and_our_vm_cross_updates_together_and_stop(qemu_host) -> None:  # noqa: ANN001
    host = qemu_host(("q", "qemu"), ("k", "luo"))
    for _ in range(2):
        r = host.update()
        assert set(r["vms"]) == {"q", "k"}, r
        assert "migration" in r["vms"]["q"] and "migration" not in r["vms"]["k"]
        host.luo("finish")
        more_beats(host.console("q"), 1)
        more_beats(host.console("k"), 1)
    q = vm_of(host, "q")
    host.luo("vm", "stop", "q")
    wait_for(lambda: not alive(q["qemu_pid"]) and not alive(q["pid"]), 15, "QEMU and its VMM to exit")
    sessions = {s["name"] for s in host.client().status()["sessions"]}
    assert "vm:q" not in sessions and "vm:k" in sessions
    more_beats(host.console("k"), 2)
