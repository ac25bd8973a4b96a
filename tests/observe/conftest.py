"""Fixtures for tests/observe: the synthetic records, a runtime dir holding them, a real host."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luo.testing.host import HostProcess

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


# copied from tests/host/conftest.py: a real host in a private runtime dir, stopped after the test
@pytest.fixture
def make_host(short_dir: Path) -> Iterator[Callable[..., HostProcess]]:
    hosts: list[HostProcess] = []

    def make(env: dict[str, str] | None = None, name: str = "rt") -> HostProcess:
        h = HostProcess(short_dir / name, env).start()
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.stop()


@pytest.fixture
def host(make_host: Callable[..., HostProcess]) -> HostProcess:
    return make_host()
