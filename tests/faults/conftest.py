from __future__ import annotations

import os
from pathlib import Path

import pytest

from luo.vmm.live.main import default_image


@pytest.fixture(scope="session", autouse=True)
def _needs_kvm_and_guest() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    if not Path(default_image()).exists():
        pytest.fail(f"the test guest is not built ({default_image()}): run ./scripts/setup.sh")
