"""``luo demo``: the main job. A VM under load, live-updated several times, blackout reported.

It starts a private host, boots the test guest (heartbeat on vCPU 0, memory-integrity workload
on vCPU 1), updates host and VMM N times while the guest runs, and shows from the guest's own
console that it went on: same boot id, no heartbeat gap, no integrity mismatch, no stall.
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
             integrity_pct: int = 30) -> int:
    root = Path(runtime_dir) if runtime_dir else Path(tempfile.mkdtemp(prefix="luo-demo-", dir="/tmp")) / "rt"
    host = HostProcess(root)
    print(f"== luo demo: runtime dir {root}")
    host.start()
    try:
        return _demo(host, mem, cpus, updates, integrity_pct)
    finally:
        host.stop()


def _show(line: str) -> None:
    print(f"   guest| {line}")


def _demo(host: HostProcess, mem: str, cpus: int, updates: int, integrity_pct: int) -> int:
    name = "demo"
    cmdline = f"hb_ms={int(HB_MS)} stall_ms=50 integrity_pct={integrity_pct}"
    print(host.luo("vm", "start", name, "--mem", mem, "--cpus", str(cpus), "--cmdline", cmdline).stdout.strip())
    con = host.console(name)
    wait_for(lambda: con.count() >= 3, 60, "the guest's first heartbeats")
    for line in con.lines()[:2]:
        _show(line)
    _show(_last(con, "heartbeat"))
    blackouts: list[float] = []
    for i in range(1, updates + 1):
        seen = con.count()
        r = host.update()
        vm = r["vms"][name]
        blackouts.append(vm["blackout_ms"])
        parts = ", ".join(f"{k} {v:.2f}" for k, v in vm["parts_ms"].items())
        print(f"== update {i}: host pid {r['old_pid']} -> {r['new_pid']}; "
              f"blackout {vm['blackout_ms']:.2f} ms ({parts})")
        host.luo("finish")
        wait_for(lambda seen=seen: con.count() >= seen + 3, 30, "heartbeats after the update")
        for prefix in ("heartbeat", "integrity pass"):
            if line := _last(con, prefix):
                _show(line)
    beats = con.heartbeats()
    errors = check_continuity(beats, HB_MS, max(blackouts) + 60.0) + con.problems()
    print(f"== {updates} updates: blackout median {statistics.median(blackouts):.2f} ms, "
          f"max {max(blackouts):.2f} ms")
    print(f"== guest: boot id {beats[0].boot_id}, heartbeats seq {beats[0].seq}..{beats[-1].seq}, "
          f"{sum(1 for ln in con.lines() if ln.startswith('integrity pass'))} integrity passes")
    if errors:
        print("== FAIL: " + "; ".join(errors[:10]))
        return 1
    print("== PASS: same boot id, no heartbeat gap, clock never back, no integrity mismatch, no stall")
    print(host.luo("status").stdout.rstrip())
    return 0


def _last(con, prefix: str) -> str:  # noqa: ANN001
    for line in reversed(con.lines()):
        if line.startswith(prefix):
            return line
    return ""
