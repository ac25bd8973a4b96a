"""The README's main job, `luo demo`, end to end (one update, small guests): it must pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_demo_passes(short_dir: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "luo", "--runtime-dir", str(short_dir / "rt"), "demo", "--updates", "1",
                         "--mem", "256M", "--cpus", "1", "--pool", "1G:hugetlb"],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-2000:]
    assert "== PASS" in cp.stdout and "pool: 1G:hugetlb" in cp.stdout
    assert "vm demo: blackout" in cp.stdout and "vm linux: blackout" in cp.stdout
