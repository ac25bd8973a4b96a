"""The pool's map on its own, as a DTB: ``<runtime>/pool.dtb`` (``dtc -I dtb pool.dtb``).

The same node the handover tree carries under ``/preserved-memory-map``, under a root of its own.
The host rewrites it on every change of the pool, so an operator can read the pool with dtc at any
time, and a host that restarts after a crash (the pool's memfd comes back from the fd store)
knows whose each extent was.
"""

from __future__ import annotations

from luo.kho.builder import TreeWriter
from luo.kho.reader import FdtReader
from luo.pool.memmap import POOL_MAP_NODE, PoolMap, parse_pool_map, write_pool_map


def pool_dtb(m: PoolMap) -> bytes:
    w = TreeWriter(4096 + 64 * (len(m.extents) + len(m.shards)) + (m.layout.pool.size >> 21) // 4)
    w.begin("")
    write_pool_map(w, m)
    w.end()
    return w.finish()


def read_pool_dtb(blob: bytes) -> PoolMap:
    reader = FdtReader(blob)
    return parse_pool_map(reader, reader.child(reader.root, POOL_MAP_NODE))
