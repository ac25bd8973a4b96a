"""Sample handovers and a tool to damage one in a precise way with libfdt itself."""

from __future__ import annotations

from collections.abc import Callable

import libfdt
import pytest

from luo.core.handover import FileRecord, LuoRecord, MemoryRange, SessionRecord
from luo.kho import build_tree


def sample_records() -> tuple[LuoRecord, list[MemoryRange]]:
    luo = LuoRecord(
        liveupdate_number=7,
        subsystems={"kvm": 5, "vmm.state": 2**64 - 1},
        files=(FileRecord(0, "memfd-v1", 4096, 0, {"owner-pid": "12", "name": "scratch"}),),
        sessions=(
            SessionRecord(
                "vm 1/é",
                (
                    FileRecord(3, "socket-listen-v1", 2, 1),
                    FileRecord(2**64 - 1, "memfd-v1", 1 << 30, 2, {"name": "guest-ram"}),
                ),
                {"owner-comm": 'qemu "x"'},
            ),
            SessionRecord("empty"),
        ),
    )
    memory = [MemoryRange(0, 4096, "scratch"), MemoryRange(2, 1 << 30, "guest-ram")]
    return luo, memory


@pytest.fixture
def sample() -> tuple[LuoRecord, list[MemoryRange]]:
    return sample_records()


@pytest.fixture
def blob() -> bytes:
    return build_tree(*sample_records())


def _mutate(blob: bytes, change: Callable[[libfdt.Fdt], None]) -> bytes:
    """Apply ``change`` to a writable copy of ``blob`` (with room to grow) and pack it."""
    fdt = libfdt.Fdt(blob)
    fdt.resize(len(blob) + 4096)
    change(fdt)
    fdt.pack()
    return bytes(fdt.as_bytearray())


@pytest.fixture
def mutate() -> Callable[[bytes, Callable[[libfdt.Fdt], None]], bytes]:
    return _mutate
