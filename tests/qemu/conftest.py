from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import qemu_helpers

from luo.testing.host import HostProcess


@pytest.fixture(scope="module", autouse=True)
def _needs_qemu_and_guest() -> None:
    qemu_helpers.needs_qemu_and_guest()


@pytest.fixture
def qemu_host(short_dir: Path) -> Iterator[Callable[..., HostProcess]]:
    yield from qemu_helpers.qemu_host(short_dir)
