"""Write the handover as a flattened device tree with libfdt's sequential-write API.

libfdt is the C library the kernel and dtc use, so the blob is exactly what ``dtc`` reads. The
layout is described in docs/kho.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import libfdt

from luo import abi
from luo.core.handover import FileRecord, LuoRecord, MemoryRange, SessionRecord
from luo.kho import compat
from luo.kho.encoding import node_name_for, pack_str, pack_u32, pack_u64
from luo.kho.validate import META_PREFIX, validate

if TYPE_CHECKING:
    from luo.pool.memmap import PoolMap


class TreeWriter:
    """FdtSw with bytes-valued properties only, so no value goes through SWIG's str coercion."""

    def __init__(self, size_hint: int) -> None:
        self.sw = libfdt.FdtSw(size_hint)
        self.sw.finish_reservemap()

    def begin(self, name: str) -> None:
        self.sw.begin_node(name)

    def end(self) -> None:
        self.sw.end_node()

    def prop(self, name: str, value: bytes) -> None:
        self.sw.property(name, value)

    def string(self, name: str, value: str) -> None:
        self.prop(name, pack_str(value))

    def u32(self, name: str, value: int) -> None:
        self.prop(name, pack_u32(value))

    def u64(self, name: str, value: int) -> None:
        self.prop(name, pack_u64(value))

    def finish(self) -> bytes:
        fdt = self.sw.as_fdt()
        fdt.pack()
        return bytes(fdt.as_bytearray())


def meta_value(value: str) -> bytes:
    """A meta value as FDT string bytes. Meta is for status only, so an update must not fail
    over a process name with stray bytes: NULs and unpaired surrogates (undecodable bytes from
    the OS) are written as backslash escapes."""
    return value.encode("utf-8", "backslashreplace").replace(b"\0", b"\\0") + b"\0"


def _write_meta(w: TreeWriter, meta: dict[str, str]) -> None:
    for key in sorted(meta):
        w.prop(META_PREFIX + key, meta_value(meta[key]))


def _write_file(w: TreeWriter, f: FileRecord) -> None:
    w.begin(str(f.token))
    w.string("compatible", f.compatible)
    w.u64("data", f.data)
    w.u32("fd-index", f.fd_index)
    w.u64("token", f.token)
    _write_meta(w, f.meta)
    w.end()


def _write_session(w: TreeWriter, s: SessionRecord) -> None:
    w.begin(node_name_for(s.name))
    w.string("session-name", s.name)
    _write_meta(w, s.meta)
    for f in s.files:
        _write_file(w, f)
    w.end()


def _write_luo(w: TreeWriter, luo: LuoRecord) -> None:
    w.begin(compat.LUO_NODE)
    w.string("compatible", abi.LUO_COMPATIBLE)
    w.u64("liveupdate-number", luo.liveupdate_number)
    w.begin(compat.SUBSYSTEMS_NODE)
    w.string("compatible", abi.SUBSYSTEMS_COMPATIBLE)
    for name, data in luo.subsystems.items():
        w.u64(name, data)
    w.end()
    w.begin(compat.FILE_DESCRIPTORS_NODE)
    w.string("compatible", abi.FILE_DESCRIPTORS_COMPATIBLE)
    for f in luo.files:
        _write_file(w, f)
    w.end()
    w.begin(compat.SESSIONS_NODE)
    w.string("compatible", abi.LUO_SESSION_COMPATIBLE)
    for s in luo.sessions:
        _write_session(w, s)
    w.end()
    w.end()


def _write_memory(w: TreeWriter, memory: Sequence[MemoryRange], pool: PoolMap | None) -> None:
    w.begin(compat.MEMORY_MAP_NODE)
    w.string("compatible", abi.KHO_MEMORY_MAP_COMPATIBLE)
    for m in memory:
        w.begin(f"mem@{m.fd_index}")
        w.u32("fd-index", m.fd_index)
        w.u64("size", m.size)
        w.string("label", m.name)
        w.end()
    if pool is not None:  # the pool's own map, under its own compatible (luo.abi)
        from luo.pool.memmap import write_pool_map

        write_pool_map(w, pool)
    w.end()


def build_tree(luo: LuoRecord, memory: Sequence[MemoryRange] = (), pool: PoolMap | None = None) -> bytes:
    """The handover as a DTB. Raises LuoError(EINVAL) if the records break a rule of the format.
    ``pool``: the memory pool's map (luo.pool), a child of the preserved-memory map.

    Validation happens first, with the parser's own rules, so a tree that builds also parses.
    """
    validate(luo, memory)
    files = luo.all_files()
    nodes = 8 + len(files) + len(luo.sessions) + len(memory) + (8 + len(pool.extents) + len(pool.shards) if pool else 0)
    w = TreeWriter(size_hint=2048 + 160 * nodes + 64 * sum(len(f.meta) for f in files))
    w.begin("")
    w.string("compatible", abi.KHO_COMPATIBLE)
    _write_memory(w, memory, pool)
    _write_luo(w, luo)
    w.end()
    return w.finish()
