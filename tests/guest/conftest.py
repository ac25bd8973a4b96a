"""Fixtures for the test-guest tests: the built image and a way to tell whether the VMM is there."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from guest_console import GUEST_DIR  # noqa: E402

GUEST_ELF = GUEST_DIR / "build" / "luo-guest.elf"
HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@pytest.fixture
def guest_elf() -> Path:
    """The image the project's set-up builds (`make -s -C guest`); these tests do not rebuild it."""
    if not HAVE_KVM:
        pytest.skip("needs /dev/kvm")
    if not GUEST_ELF.exists():
        pytest.skip(f"{GUEST_ELF} is not built (make -C guest)")
    if not _have("luo.vmm.run"):
        pytest.skip("luo.vmm.run is not there yet")
    return GUEST_ELF
