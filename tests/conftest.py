from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luo.testing.host import HostProcess


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path for runtime dirs: AF_UNIX socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="luo-t-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_host(short_dir: Path) -> Iterator[Callable[..., HostProcess]]:
    """Real hosts in private runtime dirs (fault injection allowed), stopped after the test."""
    hosts: list[HostProcess] = []

    def make(env: dict[str, str] | None = None, name: str = "rt") -> HostProcess:
        h = HostProcess(short_dir / name, {"LUO_ALLOW_FAULTS": "1", **(env or {})}).start()
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.stop()


@pytest.fixture
def host(make_host: Callable[..., HostProcess]) -> HostProcess:
    return make_host()


@pytest.fixture(scope="session", autouse=True)
def _hugepages_as_found() -> Iterator[None]:
    """Pools of hugetlb pages raise vm.nr_hugepages, and hosts the tests kill (SIGKILL) never give
    them back: the suite leaves the machine's huge pages as it found them."""
    path = Path("/proc/sys/vm/nr_hugepages")
    try:
        before = path.read_text().strip()
    except OSError:
        yield
        return
    yield
    try:
        path.write_text(before)
    except OSError:
        pass
