"""The outgoing KHO tree of a host: the LUO record plus the preserved-memory map (with the memory
pool's map, when the host has a pool)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from luo.abi import MEMFD_COMPATIBLE, POOL_SESSION
from luo.core.handover import LuoRecord, MemoryRange
from luo.kho import build_tree

if TYPE_CHECKING:
    from luo.host.daemon import Host
    from luo.pool.memmap import PoolMap


def memory_map(record: LuoRecord) -> list[MemoryRange]:
    """Every preserved memfd is preserved memory: the map names it by its handover fd."""
    return [MemoryRange(fd_index=f.fd_index, size=f.data, name=f.meta.get("name", ""))
            for f in record.all_files() if f.compatible == MEMFD_COMPATIBLE]


def pool_map(host: Host, record: LuoRecord) -> PoolMap | None:
    """The host's pool as the tree for ``record`` shows it: its memfd is the file of session
    ``luo:pool`` (luo.abi), wherever the record put it."""
    if host.pool is None:
        return None
    from luo.pool.host import POOL_TOKEN

    index = next((f.fd_index for s in record.sessions if s.name == POOL_SESSION for f in s.files
                  if f.token == POOL_TOKEN), None)
    if index is None:  # the update would lose the pool: refuse it (at prepare) instead
        from luo.errors import LuoError

        raise LuoError(errno.EIO, f"the memory pool's memfd is not in session {POOL_SESSION!r}: an update now "
                       "would not carry the pool; see the host's log")
    return host.pool.map(index)


def tree_for(record: LuoRecord, pool: PoolMap | None = None) -> bytes:
    return build_tree(record, memory_map(record), pool)


def host_tree(host: Host, record: LuoRecord) -> bytes:
    return tree_for(record, pool_map(host, record))


def outgoing_blob(host: Host) -> bytes:
    record, _ = host.orch.outgoing_record()
    return host_tree(host, record)
