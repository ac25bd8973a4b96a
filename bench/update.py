"""Benchmark: host update phases and the hosts' extra memory, by preserved memory and fd count.

For every (total memfd size, fd count) scenario: a real host in a fresh short runtime dir; N
memfds totalling SIZE, filled with data so every page exists, half preserved through the RFC v2
global API and half in 6.19 sessions (128 files per session at most, so 1024 fds use several);
then U updates. Each update hands over the full set: after it, every global file is restored and
every session retrieved and finished (checking each is the very file preserved), ``finish`` is
sent, and everything is preserved again for the next update.

Memory, per update: the old host's peak RSS (VmHWM, reset just before through clear_refs, and
polled every 2 ms until the host exits) minus its RSS just before; the successor's VmHWM once the
update returned minus the same baseline (same program, same fds); and the system's Shmem and
MemAvailable from /proc/meminfo around the update. Nothing is copied, so the memfd size must not
show up in any of them.

    python bench/update.py                      # 1G,8G x 1,64,1024 fds, 5 updates each
    python bench/update.py --quick              # small sizes, 1 update each (the smoke test)
    python bench/update.py --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from common import (
    GiB,
    MemorySampler,
    MiB,
    emit,
    facts_line,
    fmt_size,
    machine_facts,
    median,
    meminfo,
    parse_size,
    proc_status,
    reset_hwm,
    short_runtime_dir,
    table,
)

from luo.client import Client, Session
from luo.testing.host import HostProcess
from luo.testing.processes import alive
from luo.testing.wait import wait_for

PHASES = ("start", "prepare", "check", "freeze", "tree", "handover", "release")
SESSION_MAX = 128
CHUNK = 4 * MiB
PAGE = 4096


@dataclass
class PreservedSet:
    """The bench's own memfds (it keeps them open throughout) and where each is preserved."""

    fds: list[int]
    n_global: int
    global_tokens: list[int] = field(default_factory=list)  # host-assigned, per round
    sessions: list[Session] = field(default_factory=list)

    @classmethod
    def create(cls, total: int, n: int) -> PreservedSet:
        """n memfds sharing ``total`` bytes (page multiples), each written through, page by page."""
        per = max(PAGE, (total // n) // PAGE * PAGE)
        sizes = [per] * n
        sizes[-1] = max(PAGE, total - per * (n - 1))
        pattern = (bytes(range(256)) * (CHUNK // 256))
        fds: list[int] = []
        for i, size in enumerate(sizes):
            fd = os.memfd_create(f"luo-bench-{i}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            fds.append(fd)
            off = 0
            while off < size:
                n_bytes = min(CHUNK, size - off)
                os.pwrite(fd, memoryview(pattern)[:n_bytes], off)
                off += n_bytes
            os.pwrite(fd, marker(i), 0)
        return cls(fds, n_global=n // 2)

    @property
    def session_fds(self) -> list[int]:
        return self.fds[self.n_global:]

    def session_names(self) -> list[str]:
        n = len(self.session_fds)
        return [f"bench-{k}" for k in range((n + SESSION_MAX - 1) // SESSION_MAX)]

    def preserve(self, c: Client) -> None:
        self.global_tokens = [c.preserve_fd(fd) for fd in self.fds[:self.n_global]]
        self.sessions = []
        sfds = self.session_fds
        for k, name in enumerate(self.session_names()):
            s = c.create_session(name)
            for j, fd in enumerate(sfds[k * SESSION_MAX:(k + 1) * SESSION_MAX]):
                s.preserve_fd(fd, j)
            self.sessions.append(s)

    def take_back_and_finish(self, c: Client) -> None:
        """After an update: restore / retrieve every file, check it, finish; nothing is left over."""
        for s in self.sessions:
            s.detach()  # the old host's session sockets are dead
        sfds = self.session_fds
        for k, name in enumerate(self.session_names()):
            s = c.retrieve_session(name)
            for j, fd in enumerate(sfds[k * SESSION_MAX:(k + 1) * SESSION_MAX]):
                self._check(s.retrieve_fd(j), fd, self.n_global + k * SESSION_MAX + j)
            s.finish()
            s.close()
        for i, (tok, fd) in enumerate(zip(self.global_tokens, self.fds, strict=False)):
            self._check(c.restore_fd(tok), fd, i)
        c.finish()

    @staticmethod
    def _check(got: int, mine: int, index: int) -> None:
        try:
            a, b = os.fstat(got), os.fstat(mine)
            if (a.st_dev, a.st_ino, a.st_size) != (b.st_dev, b.st_ino, b.st_size):
                raise SystemExit(f"memfd {index}: the host handed back another file")
            if os.pread(got, len(marker(index)), 0) != marker(index):
                raise SystemExit(f"memfd {index}: contents changed across the update")
        finally:
            os.close(got)

    def close(self) -> None:
        for s in self.sessions:
            s.detach()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def marker(i: int) -> bytes:
    return f"luo-bench memfd {i:05d}\n".encode()


def one_update(host: HostProcess) -> dict[str, Any]:
    old_pid = host.pid
    assert old_pid is not None
    reset_hwm(old_pid)
    base = proc_status(old_pid) or {}
    mi0 = meminfo()
    with MemorySampler(old_pid) as s:
        r = host.update()
        wait_for(lambda: not alive(old_pid), 30, "the old host to exit")
    new_pid = int(r["new_pid"])
    nst = proc_status(new_pid) or {}
    mi1 = meminfo()
    rss0 = base.get("VmRSS", 0)
    return {
        "phases_ms": {**{k: float(r["phases_ms"].get(k, float("nan"))) for k in PHASES},
                      "total": float(r["total_ms"])},
        "successor_ms": r.get("successor", {}),
        "preserved_fds": r.get("preserved_fds"),
        "old_pid": old_pid,
        "new_pid": new_pid,
        "old_rss_before_mib": rss0 / MiB,
        "old_extra_mib": (s.old_hwm - rss0) / MiB if s.old_samples else float("nan"),
        "old_rss_shmem_mib": s.old_rss_shmem / MiB,
        "new_hwm_mib": nst.get("VmHWM", 0) / MiB,
        "new_extra_mib": (nst.get("VmHWM", 0) - rss0) / MiB,
        "new_rss_shmem_mib": nst.get("RssShmem", 0) / MiB,
        "sampled_successor": s.new_pid == new_pid,
        "shmem_peak_delta_mib": (s.shmem_max - mi0["Shmem"]) / MiB,
        "shmem_after_delta_mib": (mi1["Shmem"] - mi0["Shmem"]) / MiB,
        "avail_drop_mib": (mi0["MemAvailable"] - s.avail_min) / MiB,
        "avail_after_drop_mib": (mi0["MemAvailable"] - mi1["MemAvailable"]) / MiB,
    }


def run_scenario(total: int, nfds: int, updates: int) -> dict[str, Any]:
    avail = meminfo()["MemAvailable"]
    if total + GiB > avail:
        return {"size": total, "fds": nfds, "skipped": f"needs {fmt_size(total)} + 1G, MemAvailable {avail // MiB} MiB"}
    with short_runtime_dir() as root:
        host = HostProcess(root)
        pset = PreservedSet.create(total, nfds)
        try:
            host.start()
            pset.preserve(host.client())
            runs = []
            for _ in range(updates):
                runs.append(one_update(host))
                c = host.client()
                pset.take_back_and_finish(c)
                pset.preserve(c)
                c.close()
        finally:
            pset.close()
            host.stop()
    return {"size": total, "fds": nfds, "n_global": nfds // 2, "n_session": nfds - nfds // 2,
            "sessions": (nfds - nfds // 2 + SESSION_MAX - 1) // SESSION_MAX, "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    out = {f"{k}_ms": median([r["phases_ms"][k] for r in runs]) for k in (*PHASES, "total")}
    for k in ("old_rss_before_mib", "old_extra_mib", "new_extra_mib", "shmem_peak_delta_mib",
              "shmem_after_delta_mib", "avail_drop_mib", "avail_after_drop_mib", "old_rss_shmem_mib",
              "new_rss_shmem_mib"):
        out[k] = median([r[k] for r in runs])
    out["max_old_extra_mib"] = max(r["old_extra_mib"] for r in runs)
    out["max_new_extra_mib"] = max(r["new_extra_mib"] for r in runs)
    out["max_shmem_peak_delta_mib"] = max(r["shmem_peak_delta_mib"] for r in runs)
    return out


def report(results: list[dict[str, Any]], updates: int) -> str:
    done = [r for r in results if "summary" in r]
    phase_rows = []
    mem_rows = []
    for r in done:
        s = r["summary"]
        label = [fmt_size(r["size"]), f"{r['fds']} ({r['n_global']}+{r['n_session']})"]
        phase_rows.append([*label, *[s[f"{k}_ms"] for k in (*PHASES, "total")]])
        mem_rows.append([*label, s["old_rss_before_mib"], s["old_extra_mib"], s["max_old_extra_mib"],
                         s["new_extra_mib"], s["max_new_extra_mib"], s["old_rss_shmem_mib"] + s["new_rss_shmem_mib"],
                         s["shmem_peak_delta_mib"], s["avail_drop_mib"]])
    out = [f"Update phases, ms (median of {updates} updates each; fds = global + in sessions)", "",
           table(["memfds", "fds", *PHASES, "total"], phase_rows), "",
           "Hosts' extra memory, MiB (median, and max over the updates)", "",
           table(["memfds", "fds", "host RSS", "old +peak", "old +max", "new +peak", "new +max",
                  "hosts RssShmem", "Shmem Δ peak", "MemAvail drop"], mem_rows), "",
           "old +peak: old host's VmHWM during the update minus its RSS just before; new +peak: the successor's "
           "VmHWM after the update minus the same baseline; hosts RssShmem: memfd pages mapped by either host; "
           "Shmem Δ peak / MemAvail drop: /proc/meminfo during the update vs just before (the drop includes the "
           "successor's own Python process, ~ one host RSS)."]
    for r in results:
        if "skipped" in r:
            out.append(f"skipped {fmt_size(r['size'])} x {r['fds']} fds: {r['skipped']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1G,8G", help="total preserved memfd bytes per scenario (comma list)")
    ap.add_argument("--fds", default="1,64,1024", help="preserved fd counts (comma list)")
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="64M and 256M, 1 and 1024 fds, 1 update each")
    ap.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.fds, a.updates = "64M,256M", "1,1024", 1
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    counts = [int(n) for n in a.fds.split(",")]
    facts = machine_facts()
    print(f"# bench/update.py  {facts_line(facts)}", flush=True)
    results = []
    for size in sizes:
        for n in counts:
            r = run_scenario(size, n, a.updates)
            results.append(r)
            if "summary" in r:
                s = r["summary"]
                print(f"  {fmt_size(size)} x {n} fds: total {s['total_ms']:.1f} ms, old +{s['old_extra_mib']:.1f} MiB, "
                      f"new +{s['new_extra_mib']:.1f} MiB, Shmem Δ {s['shmem_peak_delta_mib']:.1f} MiB", flush=True)
            else:
                print(f"  {fmt_size(size)} x {n} fds: skipped ({r['skipped']})", flush=True)
    emit(report(results, a.updates), a.json, facts, a.updates, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
