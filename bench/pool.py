"""Benchmark: the memory pool (docs/pool.md), each scenario beside its no-pool twin, in one run.

1. start: ``luo vm start g --mem 1G`` until the VM runs (the command returns when its VMM has
   registered), from a hugetlb pool vs from a fresh memfd (``--no-pool``); the VM is stopped in
   between, so the pool case also pays the scrub of the extent the previous VM used.
2. throughput: the test guest's integrity workload (it fills and checks a buffer, printing
   ``integrity pass=N bytes=B``), bytes checked per second over a window, on 2 MiB hugetlb pages
   (pool) vs 4 KiB shmem pages (``--no-pool``), the two VMs one after the other.
3. updates: a 1 GiB guest crossing updates in a host without a pool vs in a host with an 8 GiB
   hugetlb pool (the guest's RAM in it): the blackout and the host's phases, median and p99. The
   pool must add nothing measurable to the blackout.

    python bench/pool.py                  # 5 starts, 20 s of throughput, 10 updates, pool 8G
    python bench/pool.py --starts 3 --window 10 --updates 5 --pool 4G
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from common import emit, facts_line, machine_facts, median, percentile, short_runtime_dir, table

from luo.testing.console import Console
from luo.testing.host import HostProcess
from luo.testing.wait import wait_for

INTEGRITY = re.compile(r"^integrity pass=(\d+) bytes=(\d+)")


def wait_beats(con: Console, n: int, timeout: float = 60.0) -> None:
    have = con.count()
    wait_for(lambda: con.count() >= have + n, timeout, f"{n} more heartbeats")


def passes(con: Console) -> tuple[int, int]:
    """(last integrity pass number, bytes per pass) so far."""
    last = (0, 0)
    for ln in con.lines():
        m = INTEGRITY.match(ln)
        if m:
            last = (int(m.group(1)), int(m.group(2)))
    return last


def host_with(root: Any, pool: str | None) -> HostProcess:
    return HostProcess(root, {"LUO_POOL": pool} if pool else {}).start(timeout=120)


def starts(n: int, pool: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"pool": [], "no-pool": []}
    with short_runtime_dir() as root:
        host = host_with(root / "rt", pool)
        try:
            for i in range(n):
                for case in ("pool", "no-pool"):
                    name = f"s{i}{case[0]}"
                    t0 = time.perf_counter()
                    host.luo("vm", "start", name, "--mem", "1G", "--cpus", "1",
                             *(["--no-pool"] if case == "no-pool" else []))
                    out[case].append((time.perf_counter() - t0) * 1000)
                    wait_beats(host.console(name), 1)
                    host.luo("vm", "stop", name)
        finally:
            host.stop()
    return out


def throughput(window: float, pool: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with short_runtime_dir() as root:
        host = host_with(root / "rt", pool)
        try:
            for case in ("pool", "no-pool"):
                name = f"t{case[0]}"
                host.luo("vm", "start", name, "--mem", "1G", "--cpus", "1",
                         *(["--no-pool"] if case == "no-pool" else []))
                con = host.console(name)
                wait_for(lambda con=con: passes(con)[0] >= 2, 120, "the first integrity passes")
                p0, size = passes(con)
                t0 = time.monotonic()
                time.sleep(window)  # a measuring window, not a synchronisation
                p1, _ = passes(con)
                out[case] = (p1 - p0) * size / (time.monotonic() - t0) / (1 << 20)
                if any("FAIL" in ln for ln in con.lines()):
                    raise SystemExit(f"integrity FAIL in {name}")
                host.luo("vm", "stop", name)
        finally:
            host.stop()
    return out


def updates(n: int, pool: str | None) -> list[dict[str, Any]]:
    runs = []
    with short_runtime_dir() as root:
        host = host_with(root / "rt", pool)
        try:
            host.luo("vm", "start", "g", "--mem", "1G", "--cpus", "2")
            con = host.console("g")
            wait_beats(con, 3)
            for _ in range(n):
                r = host.update()
                runs.append({"blackout_ms": r["vms"]["g"]["blackout_ms"], "phases_ms": r["phases_ms"],
                             "total_ms": r["total_ms"]})
                host.luo("finish")
                wait_beats(con, 1)
            if any("FAIL" in ln for ln in con.lines()):
                raise SystemExit("integrity FAIL across the updates")
        finally:
            host.stop()
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--window", type=float, default=20.0, help="seconds of integrity workload per case")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--pool", default="8G", help="the pool of the update scenario (hugetlb)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    facts = machine_facts()
    print(f"# bench/pool.py  {facts_line(facts)}", flush=True)
    nr = Path("/proc/sys/vm/nr_hugepages")
    before = nr.read_text()
    try:
        return run(args, facts)
    finally:  # the hosts here are killed, not stopped: the machine's huge pages as they were
        nr.write_text(before)


def run(args: argparse.Namespace, facts: dict[str, Any]) -> int:
    st = starts(args.starts, "2G:hugetlb")
    print(f"  start: pool median {median(st['pool']):.0f} ms, no-pool {median(st['no-pool']):.0f} ms", flush=True)
    tp = throughput(args.window, "2G:hugetlb")
    print(f"  integrity throughput: {tp}", flush=True)
    up = {"no pool": updates(args.updates, None), f"pool {args.pool}": updates(args.updates, f"{args.pool}:hugetlb")}
    phase_names = list(next(iter(up.values()))[0]["phases_ms"])
    rows = []
    for case, runs in up.items():
        bl = [r["blackout_ms"] for r in runs]
        rows.append([case, len(runs), median(bl), percentile(bl, 99), median([r["total_ms"] for r in runs]),
                     *[median([r["phases_ms"].get(p, 0.0) for r in runs]) for p in phase_names]])
    out = ["Memory pool, each case beside its no-pool twin", "",
           "VM start (luo vm start --mem 1G until registered), ms", "",
           table(["case", "starts", "median", "p99"],
                 [[c, len(v), median(v), percentile(v, 99)] for c, v in st.items()]), "",
           f"Integrity workload throughput, MiB/s checked ({args.window:g} s window each)", "",
           table(["pages", "MiB/s"], [["2 MiB hugetlb (pool)", tp["pool"]], ["4 KiB shmem (--no-pool)", tp["no-pool"]]]),
           "", f"Updates of a 1 GiB guest (2 vCPUs), ms: host without a pool vs with {args.pool} of hugetlb pages", "",
           table(["host", "updates", "blackout median", "blackout p99", "total", *phase_names], rows)]
    emit("\n".join(out), args.json, facts, args.updates, {"starts": st, "throughput": tp, "updates": up})
    return 0


if __name__ == "__main__":
    sys.exit(main())
