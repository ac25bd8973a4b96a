from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luo.keeper.client import KeeperStore
from luo.testing.processes import kill_all


@pytest.fixture
def runtime(short_dir: Path) -> Iterator[Path]:
    """A runtime dir whose keeper (and any other process naming it) is killed at the end."""
    rt = short_dir / "rt"
    yield rt
    kill_all(rt)


@pytest.fixture
def store(runtime: Path) -> Iterator[KeeperStore]:
    s = KeeperStore(runtime)
    yield s
    s.close()


@pytest.fixture
def memfd() -> Iterator[Callable[[bytes], int]]:
    """memfd(content) -> a memfd holding ``content``, closed at the end of the test."""
    made: list[int] = []

    def make(content: bytes = b"", name: str = "luo-test") -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(fd, content)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass
