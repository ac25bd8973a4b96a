"""``luo demo``: the main job. VMs under load, live-updated several times, blackouts reported.

It starts a private host, boots the test guest in our VMM (heartbeat on vCPU 0, memory-integrity
workload on vCPU 1) and, when the set-up's QEMU guest is there, a stock Linux guest in QEMU
(the same heartbeat and integrity lines), updates host and VMMs (QEMU itself too) N times while
the guests run, and shows from each guest's own console that it went on: same boot id, no
heartbeat gap, no integrity mismatch, no stall.

The host has a memory pool of hugetlb pages (``--pool``; docs/pool.md) and the guests' RAM comes
from it; the QEMU VM runs on the set-up's QEMU 10 when it is there (cpr-transfer, RAM from the
pool), else on the system's QEMU (x-ignore-shared, RAM in a memfd of its own).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from luo.testing.console import check_continuity
from luo.testing.host import HostProcess
from luo.testing.wait import wait_for

HB_MS = 100.0


def run_demo(mem: str = "1G", cpus: int = 2, updates: int = 5, runtime_dir: str | None = None,
             integrity_pct: int = 30, qemu: bool = True, pool: str | None = "2G:hugetlb") -> int:
    root = Path(runtime_dir) if runtime_dir else Path(tempfile.mkdtemp(prefix="luo-demo-", dir="/tmp")) / "rt"
    host = HostProcess(root, {"LUO_POOL": pool} if pool else {})
    print(f"== luo demo: runtime dir {root}" + (f", memory pool {pool}" if pool else ""))
    nr = Path("/proc/sys/vm/nr_hugepages")
    huge = nr.read_text() if nr.exists() else None
    host.start()
    try:
        return _demo(host, mem, cpus, updates, integrity_pct, qemu and _qemu_ready())
    finally:
        host.stop()
        if huge is not None:  # the host is killed, not stopped: the machine's huge pages as they were
            nr.write_text(huge)


def _show(vm: str, line: str) -> None:
    print(f"   {vm:>5}| {line}")


def _qemu_ready() -> bool:
    from luo.errors import LuoError
    from luo.qemu.guest import default_initrd, default_kernel, qemu_binary

    try:
        qemu_binary(), default_kernel(), default_initrd()
    except LuoError as e:
        print(f"== no QEMU VM: {e.message}")
        return False
    return True


QEMU_MARGIN_MS = 300.0  # TCG on a shared 2-core machine: the guest's own timer beats can be this late


def _demo(host: HostProcess, mem: str, cpus: int, updates: int, integrity_pct: int, qemu: bool) -> int:
    cmdline = f"hb_ms={int(HB_MS)} stall_ms=50 integrity_pct={integrity_pct}"
    vms = {"demo": 60.0}
    print(host.luo("vm", "start", "demo", "--mem", mem, "--cpus", str(cpus), "--cmdline", cmdline).stdout.strip())
    if qemu:
        vms["linux"] = QEMU_MARGIN_MS
        newer = Path(__file__).resolve().parents[2] / ".cache" / "qemu-10" / "qemu-system-x86_64"
        print(host.luo("vm", "start", "linux", "--vmm", "qemu", "--mem", "512M", "--cpus", "1",
                       *(["--qemu", str(newer)] if newer.exists() else []), timeout=180).stdout.strip())
    st = host.client().status()
    if "pool" in st:
        from luo.cli_pool import format_pool

        print("\n".join(format_pool(st["pool"])))
    cons = {n: host.console(n) for n in vms}
    for n, con in cons.items():
        wait_for(lambda con=con: con.count() >= 3, 60, f"{n}'s first heartbeats")
        for line in con.lines()[:1]:
            _show(n, line)
        _show(n, _last(con, "heartbeat"))
    blackouts: dict[str, list[float]] = {n: [] for n in vms}
    for i in range(1, updates + 1):
        seen = {n: con.count() for n, con in cons.items()}
        r = host.update()
        print(f"== update {i}: host pid {r['old_pid']} -> {r['new_pid']}")
        for n in vms:
            vm = r["vms"][n]
            bl = vm.get("qmp_blackout_ms", vm["blackout_ms"])
            blackouts[n].append(bl)
            parts = ", ".join(f"{k} {v:.2f}" for k, v in vm["parts_ms"].items())
            moved = (f"; {vm['migration'].get('mode', 'x-ignore-shared')}, {vm['migration']['bytes']} bytes of "
                     "device state moved") if "migration" in vm else ""
            print(f"   vm {n}: blackout {bl:.2f} ms ({parts}){moved}")
        host.luo("finish")
        for n, con in cons.items():
            wait_for(lambda con=con, s=seen[n]: con.count() >= s + 3, 30, f"{n}'s heartbeats after the update")
            for prefix in ("heartbeat", "integrity pass"):
                if line := _last(con, prefix):
                    _show(n, line)
    failed = False
    for n, con in cons.items():
        beats = con.heartbeats()
        errors = check_continuity(beats, HB_MS, max(blackouts[n]) + vms[n]) + con.problems()
        print(f"== {n}: {updates} updates, blackout median {statistics.median(blackouts[n]):.2f} ms, "
              f"max {max(blackouts[n]):.2f} ms; boot id {beats[0].boot_id}, heartbeats seq "
              f"{beats[0].seq}..{beats[-1].seq}, "
              f"{sum(1 for ln in con.lines() if ln.startswith('integrity pass'))} integrity passes")
        if errors:
            print(f"== FAIL {n}: " + "; ".join(errors[:10]))
            failed = True
    if failed:
        return 1
    print("== PASS: same boot id, no heartbeat gap, clock never back, no integrity mismatch, no stall")
    print(host.luo("status").stdout.rstrip())
    return 0


def _last(con, prefix: str) -> str:  # noqa: ANN001
    for line in reversed(con.lines()):
        if line.startswith(prefix):
            return line
    return ""
