"""The benchmark scripts keep working: each runs in --quick mode and its output parses.

Speed is not asserted here (benchmarks measure it); only that the scripts run end to end, print
their tables, write JSON with every field the docs quote, and that the facts they exist to show
hold grossly: an update copies no memfd, and luo's blackout is shorter than the copy-based one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "guest" / "build" / "luo-guest.elf"

pytestmark = pytest.mark.slow


def run_bench(script: str, out: Path) -> tuple[str, dict[str, Any]]:
    cp = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--json", str(out)],
                        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert cp.returncode == 0, f"{script} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}"
    return cp.stdout, json.loads(out.read_text())


def table_rows(text: str, header_first: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with ``header_first``."""
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("|") and cells[0] == header_first:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table starting with {header_first!r} in:\n{text}")


def test_update_bench_quick(tmp_path: Path) -> None:
    out, data = run_bench("update.py", tmp_path / "update.json")
    rows = table_rows(out, "memfds")
    assert len(rows) == 4  # 64M and 256M x 1 and 1024 fds
    for row in rows:
        float(row[-1])  # total ms
    results = data["results"]
    assert {(r["size"] >> 20, r["fds"]) for r in results} == {(64, 1), (64, 1024), (256, 1), (256, 1024)}
    for r in results:
        s = r["summary"]
        for k in ("start", "prepare", "check", "freeze", "tree", "handover", "release", "total"):
            assert s[f"{k}_ms"] >= 0
        assert r["runs"][0]["preserved_fds"] == r["fds"]
        # nothing copied: neither host grows by anything near the 64/256 MiB handed over
        assert s["max_old_extra_mib"] < 48, s
        assert s["max_new_extra_mib"] < 48, s
        assert s["old_rss_shmem_mib"] + s["new_rss_shmem_mib"] < 1, s


@pytest.mark.kvm
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")
@pytest.mark.skipif(not GUEST.exists(), reason="needs the test guest (make -C guest)")
def test_blackout_bench_quick(tmp_path: Path) -> None:
    out, data = run_bench("blackout.py", tmp_path / "blackout.json")
    rows = table_rows(out, "guest")
    assert rows[0][0] == "256M"
    luo_median, copy_median = float(rows[0][1]), float(rows[0][3])
    assert 0 < luo_median < copy_median
    assert "Targets" in out
    (r,) = data["results"]
    assert len(r["luo"]["runs"]) == 3 and len(r["copy"]["runs"]) == 1
    assert set(r["luo"]["parts_median_ms"]) == {"pause", "save", "handover", "restore", "resume"}
    assert r["luo"]["health"]["boots"] == 1 and r["copy"]["health"]["boots"] == 1
    # the guest's own view of each update, placed on its clock (stall lines with at_ns)
    seen = r["luo"]["guest_seen"]
    assert seen["updates"] == 3 and seen["max_ms"] is not None and seen["max_ms"] >= 0
    assert all(run["guest_max_stall_ms"] is not None for run in r["luo"]["runs"])
