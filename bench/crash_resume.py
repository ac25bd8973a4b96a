"""Benchmark: how long a guest waits when a process of an update dies, per kind of crash.

For each kind, N times: a real host in a fresh runtime dir with a 2-vCPU guest; an update is held
at a point by a fault (``host-hold=<point>`` for the outgoing host; the stall faults for the
successors; ``luo prepare`` + ``luo freeze`` for the old VMM), the process is SIGKILLed, and the
time from the kill to the guest running again is read from the VMM's own record
(``vms/NAME/guest.json``, written right after the vCPUs are resumed, wall clock). Then the run
checks that exactly one VMM is left and the guest's heartbeats go on.

Kinds:
- host@prepared, host@frozen, host@handover, host@confirmed: the outgoing host;
- successor-host@handover: the successor host, stalled after receiving the final tree;
- old-vmm@frozen: the running VMM after it saved the paused guest;
- successor-vmm@restore: the successor VMM, stalled before restoring.

For the outgoing host (host@...) the guest was never paused (since cdefd79 the VMs switch VMMs
only after the host's handover): the figure is the time until the old VMM has dropped its warmed
successor, and the run checks that its guest ran throughout.

    python bench/crash_resume.py               # 5 of each
    python bench/crash_resume.py --runs 10 --json out.json
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import emit, facts_line, machine_facts, median, short_runtime_dir, table

from luo.testing.host import HostProcess
from luo.testing.processes import alive, kill_all
from luo.testing.vms import vmm_pid, vmm_processes
from luo.testing.wait import wait_for
from luo.vmm.live.guest_state import read_guest_state

KINDS = ["host@prepared", "host@frozen", "host@handover", "host@confirmed", "successor-host@handover",
         "old-vmm@frozen", "successor-vmm@restore"]


def _start(root: Path) -> HostProcess:
    h = HostProcess(root, {"LUO_ALLOW_FAULTS": "1"}).start()
    h.luo("vm", "start", "b1", "--mem", "256M", "--cpus", "2", "--cmdline", "hb_ms=100 stall_ms=0")
    wait_for(lambda: h.console("b1").count() >= 2, 60, "the guest's first heartbeats")
    return h


def _update(h: HostProcess, fault: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*h.command, "--runtime-dir", str(h.root), "update", "--fault", fault],
                            env=h.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def one(kind: str, root: Path) -> float:
    h = _start(root)
    vdir = h.rt.vm_dir("b1")
    client = None
    try:
        who, _, point = kind.partition("@")
        if who == "host":
            client = _update(h, f"host-hold={point}")
            victim = wait_for(lambda: _pid_file(root / "host.held"), 60, "the hold")
        elif who == "successor-host":
            client = _update(h, "successor-stall-handover")
            victim = wait_for(lambda: _pid_file(root / "successor.stalled"), 60, "the stall")
        elif who == "successor-vmm":
            client = _update(h, "vmm-successor-stall-restore")
            victim = wait_for(lambda: _pid_file(vdir / "successor.stalled"), 60, "the stall")
        else:  # old-vmm
            victim = vmm_pid(h, "b1")
            h.luo("prepare")
            h.luo("freeze")
        t_kill = time.time()
        os.kill(victim, signal.SIGKILL)
        if who == "host":  # the guest never paused for the host: until its warmed successor VMM is gone
            wait_for(lambda: len(vmm_processes(h)) == 1, 30, "the warmed successor VMM to go")
            g = read_guest_state(vdir)
            assert g is not None and g["state"] == "running" and g["since"] <= t_kill, g
            resumed = time.time()
        else:
            g = wait_for(lambda: (g := read_guest_state(vdir)) and g["state"] == "running" and g["since"] > t_kill
                         and g, 30, "the guest to run again")
            resumed = g["since"]
        wait_for(lambda: len(vmm_processes(h)) == 1, 30, "exactly one VMM")
        have = h.console("b1").count()
        wait_for(lambda: h.console("b1").count() >= have + 2, 30, "heartbeats after the crash")
        return (resumed - t_kill) * 1000.0
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        kill_all(root)
        wait_for(lambda: not any(alive(p) for p in vmm_processes(h)), 30, "the run's processes to go")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--json")
    args = ap.parse_args()
    facts = machine_facts()
    print(facts_line(facts), flush=True)
    results: dict[str, list[float]] = {}
    for kind in args.kinds.split(","):
        results[kind] = []
        for i in range(args.runs):
            with short_runtime_dir() as d:
                ms = one(kind, d / "rt")
            results[kind].append(round(ms, 3))
            print(f"{kind} run {i + 1}: guest running again {ms:.1f} ms after the kill", flush=True)
    rows = [[k, len(v), round(median(v), 1), round(max(v), 1)] for k, v in results.items()]
    text = table(["crash", "runs", "median ms", "max ms"], rows)
    emit(text, args.json, facts, sum(len(v) for v in results.values()), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
