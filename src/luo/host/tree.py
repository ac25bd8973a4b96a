"""The outgoing KHO tree of a host: the LUO record plus the preserved-memory map."""

from __future__ import annotations

from typing import TYPE_CHECKING

from luo.abi import MEMFD_COMPATIBLE
from luo.core.handover import LuoRecord, MemoryRange
from luo.kho import build_tree

if TYPE_CHECKING:
    from luo.host.daemon import Host


def memory_map(record: LuoRecord) -> list[MemoryRange]:
    """Every preserved memfd is preserved memory: the map names it by its handover fd."""
    return [MemoryRange(fd_index=f.fd_index, size=f.data, name=f.meta.get("name", ""))
            for f in record.all_files() if f.compatible == MEMFD_COMPATIBLE]


def tree_for(record: LuoRecord) -> bytes:
    return build_tree(record, memory_map(record))


def outgoing_blob(host: Host) -> bytes:
    record, _ = host.orch.outgoing_record()
    return tree_for(record)
