from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luo.testing.host import HostProcess
from luo.testing.vms import require_kvm_and_guest
from luo.testing.wait import wait_for

pytestmark = pytest.mark.kvm


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.kvm)


@pytest.fixture(scope="session", autouse=True)
def _needs_kvm_and_guest() -> None:
    require_kvm_and_guest()


@pytest.fixture
def vm_host(short_dir: Path) -> Iterator[Callable[..., HostProcess]]:
    hosts: list[HostProcess] = []

    def start(name: str = "g1", mem: str = "256M", cpus: int = 2, env: dict[str, str] | None = None,
              cmdline: str | None = None) -> HostProcess:
        h = HostProcess(short_dir / "rt", {"LUO_ALLOW_FAULTS": "1", **(env or {})}).start()
        hosts.append(h)
        args = ["vm", "start", name, "--mem", mem, "--cpus", str(cpus)]
        if cmdline is not None:
            args += ["--cmdline", cmdline]
        h.luo(*args)
        wait_for(lambda: h.console(name).count() >= 2, 60, "the guest's first heartbeats")
        return h

    yield start
    for h in hosts:
        h.stop()
