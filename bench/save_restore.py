"""Benchmark: the VMM's part of a live update's blackout, in one process, step by step.

The test guest is booted with ``luo.vmm.vm.Vm`` around a RAM memfd this script owns. Then, N
times, exactly as a live update does it (RunningVmm.freeze, run_successor_vmm):

    (prepare, not timed)  succ = Vm.create(..., memfd=ram)   # the successor's VM, vCPUs, CPUID
    pause    cur.pause()
    save     rec = cur.save()
    write    write_state(state_memfd, rec, t0)                # luo.vmm.live.statefile
    read     rec = read_state(state_memfd)
    restore  succ.restore(rec)
    resume   succ.start()
    (not timed)  cur.stop(); cur = succ; the next heartbeat of the same boot, seq +1

and reports the median and p99 of each step and of the whole (pause start -> start returned).
Garbage collection is off inside the blackout, as the live-update code does.

``--profile`` then runs more cycles instrumented (their timings are not in the main table):
  - every KVM ioctl the main thread makes, timed around the libc call, by phase and request;
  - the record's serialization alone (build/parse, state.py) on a real record;
  - cProfile of save() and restore(), the Python functions by own time.

``--paths`` names the save/restore paths to time, in the same run:
  - ``v1``: record version 1, the code before issue 8 item 2 (``Vm.save(version=1)``; restore
    reads it with the version-1 code), ctypes ioctl by ioctl;
  - ``c``: record version 2, prepared batches run by the C runner (csrc/ioctl_batch.c);
  - ``py``: record version 2, the same batches run by the fcntl.ioctl fallback.
The cycles are done in rounds visiting every path in turn (blocks of ``--block`` cycles, the first
of each block dropped: its save was done by a VM of the previous block's path), so the machine's
slow spells fall on every path alike.

    .venv/bin/python bench/save_restore.py                               # 1G, 2 vCPUs, c, 50 cycles
    .venv/bin/python bench/save_restore.py --paths v1,c,py -n 100 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import os
import pstats
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from common import emit, facts_line, machine_facts, median, parse_size, percentile, table

from luo.testing.console import parse_heartbeats
from luo.vmm import state as state_mod
from luo.vmm.devices.console_sink import MemoryConsoleSink
from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import sys as ksys
from luo.vmm.kvm.batch import have_cext
from luo.vmm.live.main import DEFAULT_CMDLINE, default_image
from luo.vmm.live.statefile import create_state_memfd, read_state, write_state
from luo.vmm.saveplan import Layout
from luo.vmm.vm import Vm

STEPS = ("pause", "save", "write", "read", "restore", "resume", "blackout")
PATHS = ("v1", "c", "py")


@contextlib.contextmanager
def batch_mode(path: str) -> Iterator[None]:
    """VMs created inside run their prepared batches in C, or (path py) with the fcntl fallback."""
    old = os.environ.get("LUO_VMM_NO_CEXT")
    os.environ["LUO_VMM_NO_CEXT"] = "1" if path == "py" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LUO_VMM_NO_CEXT"]
        else:
            os.environ["LUO_VMM_NO_CEXT"] = old


# --- the guest ------------------------------------------------------------------------------

class Guest:
    """Heartbeat bookkeeping over the in-memory console."""

    def __init__(self, sink: MemoryConsoleSink) -> None:
        self.sink = sink
        self.boot_id = ""
        self.seq = -1
        self.pos = 0  # lines before this index were checked

    def next_beat(self, timeout: float = 15.0) -> None:
        """Wait for a heartbeat newer than the last one seen; every one since must be the next seq of the same boot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.sink.lines[self.pos:]
            self.pos += len(lines)
            beats = parse_heartbeats(lines)
            for b in beats:
                if self.boot_id and b.boot_id != self.boot_id:
                    raise SystemExit(f"the guest rebooted: boot_id {b.boot_id}, was {self.boot_id}")
                if self.seq >= 0 and b.seq != self.seq + 1:
                    raise SystemExit(f"heartbeat seq {self.seq} -> {b.seq}")
                if not b.integrity_ok or any("FAIL" in ln for ln in lines):
                    raise SystemExit(f"the guest reports a failure: {lines}")
                self.boot_id, self.seq = b.boot_id, b.seq
            if beats:
                return
            time.sleep(0.005)
        raise SystemExit(f"no heartbeat after seq {self.seq} within {timeout} s; last lines {self.sink.lines[-5:]}")


# --- ioctl accounting (--profile) -------------------------------------------------------------

_NAMES: dict[int, str] = {}
for _n, _v in vars(K).items():
    if _n.startswith("KVM_") and isinstance(_v, int) and _v > 0xFFFF:
        _NAMES[_v] = f"{_NAMES[_v]}/{_n}" if _v in _NAMES else _n


class IoctlTimer:
    """Wraps the libc ioctl the VMM calls (luo.vmm.kvm.sys._ioctl) and times the main thread's calls by phase."""

    def __init__(self) -> None:
        self.phase = ""
        self.ns: dict[tuple[str, str], list[int]] = defaultdict(list)
        self._main = threading.get_ident()
        self._orig: Any = None
        self._traces: list[tuple[str, list[tuple[str, int]]]] = []

    def watch(self, vm: Vm) -> None:
        """Also time the ioctls of this VM's prepared batches (they bypass luo.vmm.kvm.sys)."""
        for phase, plan in (("save", getattr(vm, "_save_plan", None)), ("restore", getattr(vm, "_restore_plan", None))):
            if plan is not None:
                plan.batch.trace = []
                self._traces.append((phase, plan.batch.trace))

    def collect(self) -> None:
        for phase, trace in self._traces:
            for name, ns in trace:
                self.ns[(phase, name.split(" ", 1)[-1] if name.startswith("vcpu") else name)].append(ns)
            trace.clear()
        self._traces.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self._orig = orig = ksys._ioctl
        ns, pc, main = self.ns, time.perf_counter_ns, self._main

        def timed(fd: int, req: int, arg: Any) -> int:
            if threading.get_ident() != main or not self.phase:
                return orig(fd, req, arg)  # type: ignore[no-any-return]
            t = pc()
            r = orig(fd, req, arg)
            ns[(self.phase, _NAMES.get(req, hex(req)))].append(pc() - t)
            return r  # type: ignore[no-any-return]

        ksys._ioctl = timed
        try:
            yield
        finally:
            ksys._ioctl = orig

    def rows(self, cycles: int) -> list[list[Any]]:
        self.collect()
        out = []
        for (phase, name), xs in sorted(self.ns.items(), key=lambda kv: (kv[0][0], -sum(kv[1]))):
            out.append([phase, name, len(xs) / cycles, median(xs) / 1000, sum(xs) / cycles / 1000])
        return out

    def per_phase(self, cycles: int) -> dict[str, float]:
        self.collect()
        tot: dict[str, float] = defaultdict(float)
        for (phase, _), xs in self.ns.items():
            tot[phase] += sum(xs) / cycles / 1000
        return dict(tot)


# --- one cycle ------------------------------------------------------------------------------

class Bench:
    def __init__(self, mem: int, cpus: int) -> None:
        self.mem, self.cpus = mem, cpus
        self.ram = os.memfd_create("luo-bench:ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram, mem)
        self.state_fd = create_state_memfd("bench")
        self.sink = MemoryConsoleSink()
        self.guest = Guest(self.sink)
        self.cur = Vm.create("bench", mem, cpus, memfd=self.ram, console=self.sink)
        self.cur.boot(default_image(), DEFAULT_CMDLINE)
        self.cur.start()
        self.guest.next_beat(60)
        self.guest.next_beat()
        self.record_bytes = 0

    def close(self) -> None:
        self.cur.stop()
        os.close(self.ram)
        os.close(self.state_fd)

    def cycle(self, path: str, timer: IoctlTimer | None = None, prof: cProfile.Profile | None = None,
              check_beat: bool = True) -> dict[str, float]:
        """One pause -> save -> write -> read -> restore -> start; times in µs."""
        with batch_mode(path):
            succ = Vm.create("bench", self.mem, self.cpus, memfd=self.ram, console=self.sink)
        if timer is not None:
            timer.watch(succ)
        gc.collect()
        gc.disable()
        pc = time.perf_counter_ns
        cur = self.cur
        try:
            ph = timer or IoctlTimer()
            ph.phase = "pause"
            t0 = pc()
            cur.pause()
            t1 = pc()
            ph.phase = "save"
            if prof:
                prof.enable()
            rec = cur.save(version=1) if path == "v1" else cur.save()
            if prof:
                prof.disable()
            t2 = pc()
            ph.phase = ""
            write_state(self.state_fd, rec, t0)
            t3 = pc()
            rec2, _ = read_state(self.state_fd)
            t4 = pc()
            ph.phase = "restore"
            if prof:
                prof.enable()
            succ.restore(rec2)
            if prof:
                prof.disable()
            t5 = pc()
            ph.phase = "resume"
            succ.start()
            t6 = pc()
            ph.phase = ""
        finally:
            gc.enable()
        self.record_bytes = len(rec)
        cur.stop()
        self.cur = succ
        if check_beat:
            self.guest.next_beat()
        ts = (t0, t1, t2, t3, t4, t5, t6)
        out = {s: (ts[i + 1] - ts[i]) / 1000 for i, s in enumerate(STEPS[:-1])}
        out["blackout"] = (t6 - t0) / 1000
        return out


def serialization_costs(b: Bench, reps: int = 2000) -> list[list[Any]]:
    """The record's serialization alone, on a real save of each version (µs per call)."""
    vm = b.cur
    vm.pause()
    try:
        rec1 = vm.save(version=1)
        rec2 = vm.save()
    finally:
        vm.start()
    meta, comps = state_mod.parse_record(rec1)
    plan = vm._save_plan  # the version-2 writer and its prepared fixed payloads
    var = [("uart", *vm.uart.save()), ("mmio-console", *vm.mmio_console.save())]

    def parse2() -> None:
        _, table_, base = state_mod.parse_record_v2(rec2)
        Layout.of_record(rec2, table_, base, vm.ncpus)

    rows = []
    pc = time.perf_counter_ns
    for name, fn in (("v1 build_record (JSON header, blobs)", lambda: state_mod.build_record(meta, comps)),
                     ("v1 parse_record", lambda: state_mod.parse_record(rec1)),
                     ("v1 uart + mmio-console save (JSON)", lambda: (vm.uart.save_v1(), vm.mmio_console.save_v1())),
                     ("v2 RecordWriter.build", lambda: plan.writer.build(plan.fixed, var)),
                     ("v2 parse_record_v2 + Layout.of_record", parse2),
                     ("v2 uart + mmio-console save (binary)", lambda: (vm.uart.save(), vm.mmio_console.save()))):
        xs = []
        for _ in range(reps):
            t = pc()
            fn()
            xs.append(pc() - t)
        rows.append([name, median(xs) / 1000, percentile(xs, 99) / 1000])
    return rows


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {s: {"median": median([r[s] for r in runs]), "p99": percentile([r[s] for r in runs], 99)} for s in STEPS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", default="1G", help="guest RAM (default 1G)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("-n", "--cycles", type=int, default=50, help="timed cycles per path")
    ap.add_argument("--paths", default="c", help=f"comma list of {', '.join(PATHS)} (default c)")
    ap.add_argument("--block", type=int, default=11, help="cycles per path and round (the first one dropped)")
    ap.add_argument("--profile", action="store_true", help="then ioctl timings, serialization, cProfile")
    ap.add_argument("--profile-cycles", type=int, default=20)
    ap.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    a = ap.parse_args(argv)
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        raise SystemExit(f"--paths: a comma list of {', '.join(PATHS)}")
    if not os.path.exists(default_image()):
        raise SystemExit(f"no guest image at {default_image()}: run `make -C guest`")
    facts = machine_facts()
    print(f"# bench/save_restore.py  {facts_line(facts)}", flush=True)
    b = Bench(parse_size(a.mem), a.cpus)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    results: dict[str, Any] = {"mem": a.mem, "cpus": a.cpus, "c_runner": have_cext()}
    block = max(2, a.block)
    try:
        for p in paths:  # warm-up: first imports, first-call caches
            b.cycle(p)
        while any(len(runs[p]) < a.cycles for p in paths):
            for p in paths:
                b.cycle(p)  # dropped: saved by a VM of the previous path
                for _ in range(min(block - 1, a.cycles - len(runs[p]))):
                    runs[p].append(b.cycle(p))
        results["record_bytes"] = b.record_bytes
        results["runs"] = runs
        results["summary"] = {p: summarize(r) for p, r in runs.items()}
        lines = [f"Blackout steps, µs, {a.mem} guest RAM, {a.cpus} vCPUs, {a.cycles} cycles per path "
                 f"(record {b.record_bytes} bytes, last path)", ""]
        hdr = ["step"] + [f"{p} {q}" for p in paths for q in ("median", "p99")]
        rows = [[s] + [results["summary"][p][s][q] for p in paths for q in ("median", "p99")] for s in STEPS]
        lines.append(table(hdr, rows))
        if a.profile:
            for p in paths:
                timer = IoctlTimer()
                prof = cProfile.Profile()
                b.cycle(p, check_beat=False)  # so the next save is by a VM of this path
                with timer.installed():
                    for _ in range(a.profile_cycles):
                        b.cycle(p, timer=timer, check_beat=False)
                for _ in range(a.profile_cycles):
                    b.cycle(p, prof=prof, check_beat=False)
                b.guest.next_beat()
                n = a.profile_cycles
                lines += ["", f"[{p}] KVM ioctls of the main thread per cycle ({n} cycles; wall time around the "
                          "libc call, in the C runner for path c, µs)", "",
                          table(["phase", "ioctl", "calls/cycle", "median µs", "µs/cycle"], timer.rows(n)), "",
                          f"[{p}] ioctl µs/cycle by phase: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(timer.per_phase(n).items()))]
                s = io.StringIO()
                st = pstats.Stats(prof, stream=s)
                st.sort_stats("tottime").print_stats(25)
                lines += ["", f"[{p}] cProfile of save()+restore() over {n} cycles (own time first; "
                          "cProfile inflates Python-heavy code)", "", "```", s.getvalue().strip(), "```"]
            lines += ["", "Record serialization alone (state.py, device states), µs", "",
                      table(["function", "median", "p99"], serialization_costs(b))]
        b.guest.next_beat()
    finally:
        b.close()
    emit("\n".join(lines), a.json, facts, a.cycles, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
