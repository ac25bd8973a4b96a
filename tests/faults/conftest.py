from __future__ import annotations

import pytest

from luo.testing.vms import require_kvm_and_guest


@pytest.fixture(scope="session", autouse=True)
def _needs_kvm_and_guest() -> None:
    require_kvm_and_guest()
