"""Shared helpers of the benchmarks: statistics, /proc readings, a memory sampler, tables.

The machine the benchmarks run on is shared and noisy (2 cores), so every figure is a median (and
a p99 where asked), and compared things are measured in the same run.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


# --- statistics -------------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); with 20 samples p99 is
    0.81 of the way from the second largest to the largest, so it is close to the maximum."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --- sizes ------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m[1]) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m[2].upper()]


def fmt_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


# --- /proc ------------------------------------------------------------------------------

def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (KiB if len(parts) > 1 else 1)
    return out


def proc_status(pid: int) -> dict[str, int] | None:
    """The Vm*/Rss* lines of /proc/PID/status in bytes, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    return _parse_status(text)


def _parse_status(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(("Vm", "Rss")):
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * KiB
    return out


def reset_hwm(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (``5`` > clear_refs, Linux 4.0+),
    so the next reading is the peak of what follows rather than of the process's whole life."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class _StatusReader:
    """Re-reads one /proc/PID/status through a kept-open fd (cheap enough to poll every ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd: int | None = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = None

    def read(self) -> dict[str, int] | None:
        if self.fd is None:
            return None
        try:
            data = os.pread(self.fd, 8192, 0)
        except OSError:
            data = b""
        if not data:  # the process is gone (its status reads empty or fails)
            os.close(self.fd)
            self.fd = None
            return None
        return _parse_status(data.decode(errors="replace"))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class MemorySampler:
    """Polls, in a thread, the old host (and the successor it spawns) and /proc/meminfo.

    Records the highest VmHWM / RssShmem seen of the old host until it exits, the successor's pid
    (a child of the old host whose command line holds ``--successor``) and the system's highest
    Shmem and lowest MemAvailable while the update runs.
    """

    def __init__(self, old_pid: int, interval: float = 0.002) -> None:
        self.old_pid = old_pid
        self.interval = interval
        self.old_hwm = 0
        self.old_rss_shmem = 0
        self.old_samples = 0
        self.new_pid: int | None = None
        self.new_hwm = 0
        self.shmem_max = 0
        self.avail_min = 1 << 62
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _meminfo(self) -> None:
        mi = meminfo()
        self.shmem_max = max(self.shmem_max, mi.get("Shmem", 0))
        self.avail_min = min(self.avail_min, mi.get("MemAvailable", 1 << 62))

    def _run(self) -> None:
        old = _StatusReader(self.old_pid)
        new: _StatusReader | None = None
        try:
            while True:
                st = old.read()
                if st is not None:
                    self.old_hwm = max(self.old_hwm, st.get("VmHWM", 0))
                    self.old_rss_shmem = max(self.old_rss_shmem, st.get("RssShmem", 0))
                    self.old_samples += 1
                    if self.new_pid is None:
                        for c in children(self.old_pid):
                            if "--successor" in cmdline(c):
                                self.new_pid = c
                                new = _StatusReader(c)
                if new is not None:
                    nst = new.read()
                    if nst is not None:
                        self.new_hwm = max(self.new_hwm, nst.get("VmHWM", 0))
                self._meminfo()
                if self._stop.wait(self.interval):
                    break
            self._meminfo()
        finally:
            old.close()
            if new is not None:
                new.close()


# --- runtime dirs, files ----------------------------------------------------------------

@contextmanager
def short_runtime_dir(prefix: str = "luo-b-") -> Iterator[Path]:
    """A fresh runtime dir with a short path (AF_UNIX paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def drop_caches() -> None:
    """Write back dirty pages and drop the clean page cache (root only; best effort), so one
    scenario's files do not weigh on the next one's memory readings."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        pass


# --- machine facts and tables -----------------------------------------------------------

def machine_facts() -> dict[str, Any]:
    mi = meminfo()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_total_gib": round(mi.get("MemTotal", 0) / GiB, 1),
        "mem_available_gib": round(mi.get("MemAvailable", 0) / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "luo_source": source_revision(),
    }


def source_revision() -> str:
    """Which luo the benchmark ran: the git commit of the imported package (``+dirty`` when its
    src/ has uncommitted changes), else $LUO_BENCH_REV, else its path."""
    import luo

    pkg = Path(luo.__file__).resolve().parent
    top = pkg.parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(top), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--", "src"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return rev.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        pass
    return os.environ.get("LUO_BENCH_REV") or str(pkg)


def facts_line(f: dict[str, Any]) -> str:
    return (f"{f['date']}; nproc {f['nproc']} ({f['cpu']}); MemTotal {f['mem_total_gib']} GiB, "
            f"MemAvailable {f['mem_available_gib']} GiB; Linux {f['kernel']}; Python {f['python']}; "
            f"luo {f['luo_source']}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too), numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(r[i]) for r in rows) if rows else False for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in
                                 enumerate(zip(r, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if numeric[i] else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


def now_ms() -> float:
    return time.perf_counter() * 1000.0


def emit(report_text: str, json_path: str | None, facts: dict, updates: int, results: list | dict) -> None:
    """Print the tables; keep every single measurement in ``json_path`` when asked."""
    print()
    print(report_text)
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump({"machine": facts, "updates": updates, "results": results}, f, indent=1)
