"""Fixtures for tests/observe: the synthetic records and a runtime dir holding them (the real
host: ``host`` in tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

RECORDS = Path(__file__).parent / "records"
MEASURED = RECORDS / "000007.json"  # a timeline as the hosts and VMMs write it (one VM, "g")
END_TO_END = RECORDS / "000003.json"  # a real record from before the timeline: durations only


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    """A runtime dir (no host) whose updates/ holds both synthetic records."""
    (tmp_path / "updates").mkdir()
    for rec in (MEASURED, END_TO_END):
        shutil.copy(rec, tmp_path / "updates" / rec.name)
    return tmp_path
