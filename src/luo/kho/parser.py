"""Read the handover tree back into records, refusing anything malformed or unknown.

Every refusal is ``LuoError(EINVAL, sentence naming the node/property)``, as the kernel answers
``-EINVAL`` to an incoming LUO tree it cannot take; no other exception type escapes (the tests fuzz
this). ``check_compatibles`` answers a different question — does this successor speak every
format the tree uses? — and refuses with EPROTO.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING

from luo import abi
from luo.core.handover import FileRecord, LuoRecord, MemoryRange, SessionRecord
from luo.errors import LuoError
from luo.kho import compat
from luo.kho.encoding import node_name_for, unpack_u32, unpack_u64
from luo.kho.reader import FdtReader, Node, bad
from luo.kho.validate import FILE_PROPS, META_PREFIX, SESSION_PROPS, validate

if TYPE_CHECKING:
    from luo.pool.memmap import PoolMap

POOL_MAP_NODE = "pool-map"  # luo.pool.memmap.POOL_MAP_NODE: the pool's map, a child of the memory map


class Props:
    """One node's properties with typed, checked accessors that name the node on failure."""

    def __init__(self, reader: FdtReader, node: Node) -> None:
        self.path = node.path or "/"
        self.raw = reader.props(node)

    def get(self, name: str) -> bytes:
        if name not in self.raw:
            raise bad(f"node {self.path} has no {name!r} property.")
        return self.raw[name]

    def u32(self, name: str) -> int:
        raw = self.get(name)
        if len(raw) != 4:
            raise bad(f"property {self.path}:{name} is {len(raw)} bytes long; a u32 is 4.")
        return unpack_u32(raw)

    def u64(self, name: str) -> int:
        raw = self.get(name)
        if len(raw) != 8:
            raise bad(f"property {self.path}:{name} is {len(raw)} bytes long; a u64 is 8.")
        return unpack_u64(raw)

    def string(self, name: str) -> str:
        return decode_string(self.get(name), f"property {self.path}:{name}")

    def expect_compatible(self, want: str) -> None:
        got = self.string("compatible")
        if got != want:
            raise bad(f"node {self.path} is compatible {got!r}; this version reads only {want!r}.")

    def only(self, allowed: frozenset[str] | set[str], *, meta: bool = False) -> None:
        """Refuse properties the layout does not define (``meta,*`` allowed if ``meta``)."""
        for k in self.raw:
            if k not in allowed and not (meta and k.startswith(META_PREFIX)):
                raise bad(f"node {self.path} has an unknown property {k!r}.")

    def meta(self) -> dict[str, str]:
        n = len(META_PREFIX)
        return {k[n:]: self.string(k) for k in self.raw if k.startswith(META_PREFIX)}


def decode_string(raw: bytes, what: str) -> str:
    if not raw.endswith(b"\0") or b"\0" in raw[:-1]:
        raise bad(f"{what} is not a single NUL-terminated string.")
    try:
        return raw[:-1].decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"{what} is not valid UTF-8.") from e


def _expect_only_children(reader: FdtReader, node: Node, allowed: set[str]) -> dict[str, Node]:
    kids = {c.name: c for c in reader.children(node)}
    for name in kids:
        if name not in allowed:
            raise bad(f"node {node.path} has an unknown child {name!r}.")
    for name in allowed:
        if name not in kids:
            raise bad(f"node {node.path or '/'} has no {name!r} child.")
    return kids


def _parse_file(reader: FdtReader, node: Node) -> FileRecord:
    p = Props(reader, node)
    token = p.u64("token")
    if node.name != str(token):
        raise bad(f"node {node.path} holds token {token}; its name must be {str(token)!r}.")
    if reader.children(node):
        raise bad(f"file node {node.path} must have no children.")
    return FileRecord(
        token=token,
        compatible=p.string("compatible"),
        data=p.u64("data"),
        fd_index=p.u32("fd-index"),
        meta=_meta(p, FILE_PROPS),
    )


def _meta(p: Props, allowed: frozenset[str]) -> dict[str, str]:
    p.only(allowed, meta=True)
    return p.meta()


def _parse_files(reader: FdtReader, node: Node) -> tuple[FileRecord, ...]:
    return tuple(_parse_file(reader, c) for c in reader.children(node))


def _parse_session(reader: FdtReader, node: Node) -> SessionRecord:
    p = Props(reader, node)
    name = p.string("session-name")
    if node.name != node_name_for(name):
        raise bad(
            f"session node {node.path} holds name {name!r}; its node name must be {node_name_for(name)!r}."
        )
    return SessionRecord(name=name, files=_parse_files(reader, node), meta=_meta(p, SESSION_PROPS))


def _parse_luo(reader: FdtReader, node: Node) -> LuoRecord:
    p = Props(reader, node)
    p.expect_compatible(abi.LUO_COMPATIBLE)
    number = p.u64("liveupdate-number")
    p.only({"compatible", "liveupdate-number"})
    kids = _expect_only_children(
        reader, node, {compat.SUBSYSTEMS_NODE, compat.FILE_DESCRIPTORS_NODE, compat.SESSIONS_NODE}
    )

    subs_node = kids[compat.SUBSYSTEMS_NODE]
    sp = Props(reader, subs_node)
    sp.expect_compatible(abi.SUBSYSTEMS_COMPATIBLE)
    subsystems = {k: sp.u64(k) for k in sp.raw if k != "compatible"}
    if reader.children(subs_node):
        raise bad(f"node {subs_node.path} must have no children.")

    fd_node = kids[compat.FILE_DESCRIPTORS_NODE]
    fp = Props(reader, fd_node)
    fp.expect_compatible(abi.FILE_DESCRIPTORS_COMPATIBLE)
    fp.only({"compatible"})
    files = _parse_files(reader, fd_node)

    sess_node = kids[compat.SESSIONS_NODE]
    ssp = Props(reader, sess_node)
    ssp.expect_compatible(abi.LUO_SESSION_COMPATIBLE)
    ssp.only({"compatible"})
    sessions = tuple(_parse_session(reader, c) for c in reader.children(sess_node))
    return LuoRecord(liveupdate_number=number, subsystems=subsystems, files=files, sessions=sessions)


def _parse_memory(reader: FdtReader, node: Node) -> list[MemoryRange]:
    mp = Props(reader, node)
    mp.expect_compatible(abi.KHO_MEMORY_MAP_COMPATIBLE)
    mp.only({"compatible"})
    out: list[MemoryRange] = []
    for c in reader.children(node):
        if c.name == POOL_MAP_NODE:
            continue  # the pool's map: parse_pool reads it
        p = Props(reader, c)
        p.only({"fd-index", "size", "label"})
        if reader.children(c):
            raise bad(f"node {c.path} must have no children.")
        fd_index = p.u32("fd-index")
        if c.name != f"mem@{fd_index}":
            raise bad(f"node {c.path} holds fd-index {fd_index}; its name must be 'mem@{fd_index}'.")
        out.append(MemoryRange(fd_index=fd_index, size=p.u64("size"), name=p.string("label")))
    return out


def parse_tree(
    blob: bytes | bytearray | memoryview, fd_count: int | None = None
) -> tuple[LuoRecord, list[MemoryRange]]:
    """The records a DTB from ``build_tree`` holds. ``fd_count``: how many fds came with it.

    Unknown subtrees of the root are ignored (KHO roots carry other owners' subtrees); inside
    the LUO node and the memory map everything must be known. Raises LuoError(EINVAL).
    """
    try:
        reader = FdtReader(blob)
        root = reader.root
        Props(reader, root).expect_compatible(abi.KHO_COMPATIBLE)
        memory = _parse_memory(reader, reader.child(root, compat.MEMORY_MAP_NODE))
        luo = _parse_luo(reader, reader.child(root, compat.LUO_NODE))
        validate(luo, memory, fd_count)
    except LuoError:
        raise
    except Exception as e:  # noqa: BLE001 - the promise is: only LuoError leaves this function
        raise bad(f"the handover tree is malformed ({type(e).__name__}: {e}).") from e
    return luo, memory


def parse_pool(blob: bytes | bytearray | memoryview, fd_count: int | None = None) -> PoolMap | None:
    """The memory pool's map in a tree (None: the host had no pool). Only LuoError(EINVAL) leaves."""
    from luo.pool.memmap import parse_pool_map

    try:
        reader = FdtReader(blob)
        mem = reader.child(reader.root, compat.MEMORY_MAP_NODE)
        node = next((c for c in reader.children(mem) if c.name == POOL_MAP_NODE), None)
    except LuoError:
        raise
    except Exception as e:  # noqa: BLE001
        raise bad(f"the handover tree is malformed ({type(e).__name__}: {e}).") from e
    return None if node is None else parse_pool_map(reader, node, fd_count)


def required_compatibles(blob: bytes | bytearray | memoryview) -> set[str]:
    """Every compatible string the tree uses (its own formats and the file handlers').

    A lenient walk: it reads trees of formats this version cannot parse (say ``luo-v2``) so the
    successor can name what it is missing. Raises LuoError(EINVAL) only if the blob is no DTB.
    """
    try:
        reader = FdtReader(blob)
        out: set[str] = set()
        for node, _depth in reader.walk():
            raw = reader.props(node).get("compatible")
            if raw is None:
                continue
            for part in raw.split(b"\0"):
                if part:
                    out.add(part.decode("utf-8", "backslashreplace"))
        return out
    except LuoError:
        raise
    except Exception as e:  # noqa: BLE001 - only LuoError leaves this function
        raise bad(f"the handover tree is malformed ({type(e).__name__}: {e}).") from e


def check_compatibles(blob: bytes | bytearray | memoryview, handler_compatibles: Iterable[str]) -> None:
    """Refuse, with LuoError(EPROTO), a tree using a format this successor does not know.

    Known: the tree's own compatibles (``abi.TREE_COMPATIBLES``) plus ``handler_compatibles``.
    """
    missing = required_compatibles(blob) - abi.TREE_COMPATIBLES - set(handler_compatibles)
    if missing:
        raise LuoError(
            errno.EPROTO,
            f"the handover uses {', '.join(sorted(missing))}, which this version does not know; "
            "update to a version that does, or cancel the update.",
        )
