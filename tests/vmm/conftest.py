"""Fixtures for the VMM tests: a tiny guest assembled from guest_src/counter.S with gcc."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).parent / "guest_src" / "counter.S"
HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


def build_guest(out: Path, delay: int = 20000, stop_at: int | None = None) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to assemble the test guest")
    args = ["gcc", "-nostdlib", "-static", "-no-pie", f"-DDELAY={delay}", "-Wl,-Ttext=0x100000",
            "-Wl,--build-id=none", "-Wl,-N", "-Wl,--no-warn-rwx-segments", "-o", str(out), str(SRC)]
    if stop_at is not None:
        args.insert(1, f"-DSTOP_AT={stop_at}")
    subprocess.run(args, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def counter_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest(tmp_path_factory.mktemp("guest") / "counter.elf")


@pytest.fixture(scope="session")
def dying_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest(tmp_path_factory.mktemp("guest") / "die.elf", stop_at=3)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_KVM:
        return
    skip = pytest.mark.skip(reason="needs /dev/kvm")
    here = Path(__file__).parent
    for it in items:  # this hook sees the whole session: touch only this directory's tests
        if "kvm" in it.keywords and here in Path(it.path).parents:
            it.add_marker(skip)
