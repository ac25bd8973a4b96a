"""cpr-transfer (QEMU >= 10.0): the successor QEMU receives the guest's memory fds over the cpr
channel. Runs only where such a QEMU is present: scripts/setup.sh unpacks Debian 12's backports
QEMU 10 into .cache/qemu-10 (scripts/qemu-backports.sh); without it every test here skips, saying
so. Also: moving a running VM between QEMU 7.2 and 10 in both directions (x-ignore-shared, since
7.2 can neither send nor receive cpr-transfer)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_helpers import HB_MS, MARGIN_MS, memfd_inode, more_beats, vm_of

from luo.qemu.machine import supports_cpr
from luo.testing.console import check_continuity
from luo.testing.host import HostProcess
from luo.testing.processes import alive
from luo.testing.wait import wait_for

QEMU10 = Path(__file__).resolve().parents[2] / ".cache" / "qemu-10" / "qemu-system-x86_64"


@pytest.fixture(scope="module")
def qemu10() -> str:
    if not QEMU10.exists():
        pytest.skip(f"no QEMU >= 10 at {QEMU10}: scripts/qemu-backports.sh could not fetch bookworm-backports' "
                    "qemu-system-x86 (see its message in the set-up's output); cpr-transfer is not tested")
    assert supports_cpr(str(QEMU10)), f"{QEMU10} is there but has no aux-ram-share: not a QEMU >= 10"
    return str(QEMU10)


def system_qemu() -> str:
    path = shutil.which("qemu-system-x86_64")
    assert path is not None
    return path


def start_vm(host: HostProcess, qemu: str) -> None:
    host.luo("vm", "start", "q", "--vmm", "qemu", "--mem", "512M", "--cpus", "1", "--qemu", qemu, timeout=120)
    wait_for(lambda: host.console("q").count() >= 2, 60, "the guest's first heartbeats")


def test_cpr_transfer_updates_keep_the_guest(qemu_host: Callable[..., HostProcess], qemu10: str) -> None:
    host = qemu_host()
    start_vm(host, qemu10)
    con = host.console("q")
    first = vm_of(host, "q")
    assert first["cpr"] is True and first["qemu"] == qemu10
    inode = memfd_inode(first["qemu_pid"], "q")
    pids, blackouts = [first["qemu_pid"]], []
    for _ in range(3):
        r = host.update()
        vm = r["vms"]["q"]
        assert vm["migration"]["mode"] == "cpr-transfer", vm["migration"]
        assert vm["migration"]["bytes"] < 1 << 20, vm["migration"]  # device state only
        blackouts.append(max(vm["qmp_blackout_ms"], vm["blackout_ms"]))
        host.luo("finish")
        now = vm_of(host, "q")
        assert now["mode"] == "cpr-transfer" and now["qemu_pid"] not in pids
        wait_for(lambda p=pids[-1]: not alive(p), 10, "the old QEMU to exit")
        pids.append(now["qemu_pid"])
        assert memfd_inode(now["qemu_pid"], "q") == inode
        more_beats(con, 2)
    assert "cpr-transfer" in host.luo("status").stdout
    beats = con.heartbeats()
    assert not check_continuity(beats, HB_MS, max(blackouts) + MARGIN_MS)
    assert len({b.seq for b in beats}) == len(beats)
    assert sum(1 for ln in con.lines() if ln.startswith("luo-guest boot")) == 1
    assert not [ln for ln in con.lines() if "FAIL" in ln]


def test_a_vm_moves_from_qemu_7_to_10_and_back(qemu_host: Callable[..., HostProcess], qemu10: str) -> None:
    """7.2 -> 10 (x-ignore-shared: 7.2 cannot send cpr), 10 -> 10 (cpr-transfer), 10 -> 7.2
    (x-ignore-shared: 7.2 cannot receive it), the guest running throughout."""
    host = qemu_host()
    old = system_qemu()
    start_vm(host, old)
    con = host.console("q")
    assert vm_of(host, "q")["cpr"] is False
    for qemu, mode in ((qemu10, "x-ignore-shared"), (qemu10, "cpr-transfer"), (old, "x-ignore-shared")):
        r = host.update("--qemu", qemu)
        assert r["vms"]["q"]["migration"]["mode"] == mode, (qemu, r["vms"]["q"])
        host.luo("finish")
        assert vm_of(host, "q")["qemu"] == qemu
        more_beats(con, 2)
    assert not check_continuity(con.heartbeats(), HB_MS, 5000)
    assert sum(1 for ln in con.lines() if ln.startswith("luo-guest boot")) == 1


def test_cpr_successor_dead_at_the_switch_gives_the_guest_back(qemu_host: Callable[..., HostProcess],
                                                                qemu10: str) -> None:
    host = qemu_host()
    start_vm(host, qemu10)
    before = vm_of(host, "q")
    host.update("--fault", "qemu-successor-dies")
    host.luo("finish")
    wait_for(lambda: vm_of(host, "q")["state"] == "running", 30, "the VM registered again")
    assert vm_of(host, "q")["qemu_pid"] == before["qemu_pid"]
    more_beats(host.console("q"), 3)
    assert not check_continuity(host.console("q").heartbeats(), HB_MS, 5000)
    # (no second update here: the faults of an update stay in its successor host's environment)


def test_cpr_migration_cancelled_half_way_gives_the_guest_back(qemu_host: Callable[..., HostProcess],
                                                               qemu10: str) -> None:
    host = qemu_host(faults="qemu-migration-cancelled")
    start_vm(host, qemu10)
    before = vm_of(host, "q")
    host.update()
    host.luo("finish")
    wait_for(lambda: vm_of(host, "q")["state"] == "running", 30, "the VM registered again")
    assert vm_of(host, "q")["qemu_pid"] == before["qemu_pid"]
    more_beats(host.console("q"), 3)
    assert "migration" in (host.rt.vm_dir("q") / "vmm.log").read_text()
    assert not check_continuity(host.console("q").heartbeats(), HB_MS, 5000)


def test_a_qemu_10_vm_runs_from_the_hosts_hugetlb_pool(short_dir: Path, qemu10: str) -> None:
    """RAM as one extent of the pool (memory-backend-file offset=, which QEMU 7.2 lacks: its VM on
    the same host keeps a memfd of its own), across updates in cpr-transfer."""
    from luo.client import pool as lp

    host = HostProcess(short_dir / "rt", {"LUO_POOL": "1G:hugetlb"}).start()
    try:
        start_vm(host, qemu10)
        host.luo("vm", "start", "old", "--vmm", "qemu", "--mem", "256M", "--cpus", "1", "--qemu", system_qemu(),
                 timeout=120)
        owners = lp.status(host.client())["owners"]
        assert list(owners) == ["vm:q"] and len(owners["vm:q"]["extents"]) == 1, owners
        for _ in range(2):
            r = host.update()
            assert r["vms"]["q"]["migration"]["mode"] == "cpr-transfer"
            host.luo("finish")
            ext = lp.status(host.client())["owners"]["vm:q"]["extents"]
            assert [e[2] for e in ext] == ["claimed"]
            more_beats(host.console("q"), 2)
            more_beats(host.console("old"), 1)
        con = host.console("q")
        assert not check_continuity(con.heartbeats(), HB_MS, 5000)
        assert sum(1 for ln in con.lines() if ln.startswith("luo-guest boot")) == 1
        host.luo("vm", "stop", "q")
        assert "vm:q" not in lp.status(host.client())["owners"]
    finally:
        host.stop()
