"""Benchmark: a QEMU VM's blackout across a luo update, against QEMU's own copy-based way.

For every guest size, in the same run (one size after the other, never two benchmarks at once):

- luo: a real host, ``luo vm start q --vmm qemu --mem SIZE`` (Debian's cloud kernel + the heartbeat
  guest, TCG here), then updates: QEMU is replaced by a successor QEMU started at prepare on the
  same RAM memfd; the device state moves by migration (x-ignore-shared on QEMU 7.2, cpr-transfer on
  QEMU >= 10: each QEMU given to --qemu is measured, one after the other). Reported: the blackout
  as QEMU dates it (the old QEMU's STOP event -> the new one's RESUME event), the VMM's own
  measure (stop issued -> cont returned) with its parts, and the bytes the migration moved.
- copy: the same guest in a QEMU of its own; then, a few times: stop -> ``migrate`` to a file
  (``exec:cat > FILE``, x-ignore-shared off: the RAM goes into the file) -> a NEW QEMU with a fresh
  memfd loads it (``migrate-incoming exec:cat FILE``) -> cont. The same two end points (STOP ->
  RESUME). The file is under /var/tmp, read back from the page cache: the cheapest a copy can be.

    python bench/qemu_blackout.py                   # 256M,512M,2G; 10 updates, 3 copies each;
                                                    # the system QEMU, and .cache/qemu-10's if present
    python bench/qemu_blackout.py --sizes 512M --updates 5 --copies 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    MiB,
    emit,
    facts_line,
    fmt_size,
    machine_facts,
    median,
    parse_size,
    percentile,
    short_runtime_dir,
    table,
)

from luo.qemu.guest import DEFAULT_APPEND, default_initrd, default_kernel, qemu_binary
from luo.qemu.machine import MODE_SHARED, QemuConfig, QemuMachine
from luo.testing.console import Console
from luo.testing.host import HostProcess
from luo.testing.wait import wait_for

VM = "q"
PARTS = ("pause", "save", "handover", "restore", "resume")
TARGET_MS = 10.0
QEMU10 = Path(__file__).resolve().parents[1] / ".cache" / "qemu-10" / "qemu-system-x86_64"


def wait_beats(con: Console, n: int, timeout: float = 60.0) -> None:
    have = con.count()
    wait_for(lambda: con.count() >= have + n, timeout, f"{n} more heartbeats")


def check_guest(con: Console) -> dict[str, Any]:
    beats = con.heartbeats()
    seqs = [b.seq for b in beats]
    return {"boots": sum(1 for ln in con.lines() if ln.startswith("luo-guest boot")),
            "boot_ids": len({b.boot_id for b in beats}), "heartbeats": len(beats),
            "seq_breaks": sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1),
            "fail": any("FAIL" in ln for ln in con.lines())}


def luo_runs(size: int, updates: int, qemu: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with short_runtime_dir() as root:
        host = HostProcess(root)
        try:
            host.start()
            host.luo("vm", "start", VM, "--vmm", "qemu", "--mem", fmt_size(size), "--cpus", "1", "--qemu", qemu,
                     timeout=180)
            con = host.console(VM)
            wait_beats(con, 3)
            runs = []
            for _ in range(updates):
                r = host.update()
                vm = r["vms"][VM]
                runs.append({"qmp_blackout_ms": vm.get("qmp_blackout_ms"), "blackout_ms": vm["blackout_ms"],
                             "parts_ms": vm["parts_ms"], "bytes": vm["migration"]["bytes"],
                             "qemu_downtime_ms": vm["migration"].get("downtime_ms"),
                             "mode": vm["migration"].get("mode", MODE_SHARED)})
                host.luo("finish")
                wait_beats(con, 1)
            wait_beats(con, 2)
            health = check_guest(con)
        finally:
            host.stop()
    return runs, health


def copy_runs(size: int, copies: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """QEMU's own save and restore through a file, on the same guest."""
    config = QemuConfig(qemu_binary(), str(default_kernel()), str(default_initrd()), DEFAULT_APPEND, "tcg")
    with short_runtime_dir() as root:
        vdir = Path(root)
        vm = QemuMachine.boot(VM, size, 1, vdir, config)
        vm.start()
        con = Console(vdir / "console.log")
        runs = []
        try:
            wait_beats(con, 3)
            for i in range(copies):
                path = Path("/var/tmp") / f"luo-qemu-copy-{os.getpid()}-{i}.bin"
                vm.qmp.execute("migrate-set-capabilities",
                               {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
                t0 = time.monotonic_ns()
                vm.pause()
                since = len(vm.qmp.events)
                vm.qmp.execute("migrate", {"uri": f"exec:cat > {path}"})
                status = vm._migration_end(since)
                if status != "completed":
                    raise SystemExit(f"copy-based save {status}")
                stop = next(e for e in reversed(vm.qmp.events) if e.name == "STOP")
                t_saved = time.monotonic_ns()
                fresh = os.memfd_create(f"luo-bench:{VM}:copy", os.MFD_CLOEXEC)
                os.ftruncate(fresh, size)
                new = QemuMachine._launch(VM, size, 1, fresh, vdir, config, incoming=MODE_SHARED)
                new.qmp.execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
                t_created = time.monotonic_ns()
                new.qmp.execute("migrate-incoming", {"uri": f"exec:cat {path}"})
                new.restore(b'{"format": "luo-qemu-migration-v1"}')
                t_loaded = time.monotonic_ns()
                new.start()
                resume = new.qmp.wait_event("RESUME", 10.0)
                runs.append({"blackout_ms": (resume.wall_ns - stop.wall_ns) / 1e6, "file_bytes": path.stat().st_size,
                             "save_ms": (t_saved - t0) / 1e6, "create_ms": (t_created - t_saved) / 1e6,
                             "load_ms": (t_loaded - t_created) / 1e6})
                path.unlink()
                vm.stop()
                os.close(vm.memfd)
                vm = new
                wait_beats(con, 2)
            health = check_guest(con)
        finally:
            vm.stop()
    return runs, health


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M,512M,2G")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--qemu", help="comma-separated QEMU binaries to measure luo with, one after the other "
                    "(default: the system's, and .cache/qemu-10's when present)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    qemus = args.qemu.split(",") if args.qemu else [qemu_binary(), *([str(QEMU10)] if QEMU10.exists() else [])]
    facts = machine_facts()
    print(f"# bench/qemu_blackout.py  {facts_line(facts)}", flush=True)
    results = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        copies, chealth = copy_runs(size, args.copies) if args.copies else ([], {})
        cbl = [c["blackout_ms"] for c in copies]
        print(f"  {fmt_size(size)}: copy-based median {median(cbl):.2f} ms over {len(cbl)}", flush=True)
        for qemu in qemus:
            runs, health = luo_runs(size, args.updates, qemu)
            qmp = [r["qmp_blackout_ms"] for r in runs if r["qmp_blackout_ms"] is not None]
            print(f"  {fmt_size(size)} {qemu} ({runs[0]['mode']}): luo QMP blackout median {median(qmp):.2f} ms "
                  f"over {len(qmp)}", flush=True)
            for h in (health, chealth):
                if h and (h["boots"] != 1 or h["boot_ids"] != 1 or h["seq_breaks"] or h["fail"]):
                    raise SystemExit(f"the guest did not survive intact at {fmt_size(size)}: {h}")
            results.append({"size": size, "qemu": qemu, "mode": runs[0]["mode"], "luo": runs, "luo_health": health,
                            "copy": copies, "copy_health": chealth})
    rows, parts, copy_rows = [], [], []
    for r in results:
        qmp = [x["qmp_blackout_ms"] for x in r["luo"] if x["qmp_blackout_ms"] is not None]
        vmm = [x["blackout_ms"] for x in r["luo"]]
        cbl = [c["blackout_ms"] for c in r["copy"]]
        rows.append([fmt_size(r["size"]), r["mode"], len(qmp), median(qmp), percentile(qmp, 99), median(vmm),
                     median([x["bytes"] for x in r["luo"]]), median(cbl) if cbl else "-",
                     f"{median(cbl) / median(qmp):.0f}x" if cbl else "-"])
        parts.append([fmt_size(r["size"]), r["mode"], *[median([float(x["parts_ms"].get(p, float("nan"))) for x in r["luo"]])
                                             for p in PARTS],
                      median([float(x["qemu_downtime_ms"] or float("nan")) for x in r["luo"]])])
        if r["copy"] and r["qemu"] == qemus[0]:
            copy_rows.append([fmt_size(r["size"]), len(r["copy"]), median(cbl),
                              *[median([c[k] for c in r["copy"]]) for k in ("save_ms", "create_ms", "load_ms")],
                              median([c["file_bytes"] for c in r["copy"]]) / MiB])
    meds = [row[3] for row in rows]
    by_mode: dict[str, list[float]] = {}
    for row in rows:
        by_mode.setdefault(row[1], []).append(row[3])
    flat = "; ".join(f"{m} largest/smallest {max(v) / min(v):.2f}x" for m, v in by_mode.items())
    out = ["QEMU VM blackout, ms (luo: QEMU's STOP -> RESUME events; the VMM's measure beside it)", "",
           "QEMUs: " + ", ".join(f"{q} ({m})" for q, m in dict.fromkeys((r["qemu"], r["mode"]) for r in results)),
           "",
           table(["guest", "mode", "updates", "luo median", "luo p99", "VMM measure median", "bytes moved", "copy median",
                  "ratio"], rows), "",
           f"Target: median <= {TARGET_MS:g} ms and flat in guest size: largest median {max(meds):.2f} ms "
           f"({'PASS' if max(meds) <= TARGET_MS else 'MISS'}); {flat}", "",
           "luo parts, ms (median; the VMM's view): pause = QMP stop, save = migrate to the successor QEMU, "
           "handover = the two VMMs' messages, restore = the successor QEMU loaded, resume = cont", "",
           table(["guest", "mode", *PARTS, "QEMU's own downtime"], parts), "",
           "copy-based (QEMU migrate to a file, a new QEMU loads it), ms (median)", "",
           table(["guest", "reps", "blackout", "save", "new QEMU", "load", "file MiB"], copy_rows)]
    emit("\n".join(out), args.json, facts, args.updates, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
