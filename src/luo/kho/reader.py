"""Read-only access to an untrusted DTB that fails only with LuoError(EINVAL).

libfdt trusts the header's ``totalsize`` and would read past a short buffer, so the header is
checked here in Python first; then libfdt's ``fdt_check_full`` validates the whole structure
(tags, nesting, string offsets, lengths). Only then is the tree indexed, in one linear pass over
the structure block: a libfdt round trip through SWIG per property costs ~1.5 µs and pylibfdt
raises SystemError on a property name that is not UTF-8, so walking the validated bytes is both
faster (a 1024-file handover parses several times faster) and stricter. The pass still
bounds-checks every read, so it never trusts the blob more than libfdt does.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

import libfdt

from luo.errors import LuoError

FDT_HEADER_SIZE = 40  # struct fdt_header, version 17
FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17  # what libfdt writes; earlier versions align property values differently
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9
FDT_MAX_DEPTH = 64  # far deeper than any handover; bounds work on hostile input


def bad(message: str) -> LuoError:
    return LuoError(errno.EINVAL, message)


def _strerror(err: int) -> str:
    try:
        return str(libfdt.fdt_strerror(err))
    except Exception:  # noqa: BLE001 - a message, never a failure of its own
        return f"libfdt error {err}"


def _align4(pos: int) -> int:
    return (pos + 3) & ~3


@dataclass(frozen=True)
class Node:
    offset: int  # of its FDT_BEGIN_NODE in the structure block, as libfdt numbers nodes
    path: str  # "" for the root

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def where(self) -> str:
        return self.path or "/"


@dataclass
class _Entry:
    raw_name: bytes
    props: list[tuple[int, bytes]] = field(default_factory=list)  # (name offset, value)
    children: list[int] = field(default_factory=list)  # offsets


class FdtReader:
    """A structurally valid FDT: nodes, their children and their properties as bytes."""

    def __init__(self, blob: bytes | bytearray | memoryview) -> None:
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise bad(f"the handover tree must be bytes, not {type(blob).__name__}.")
        data = bytes(blob)
        if len(data) < FDT_HEADER_SIZE:
            raise bad(
                f"the handover tree is {len(data)} bytes long, shorter than a DTB header ({FDT_HEADER_SIZE})."
            )
        magic, totalsize, off_struct, off_strings, off_rsv, version, _lcv, _cpu, size_strings, size_struct = (
            struct.unpack(">10I", data[:FDT_HEADER_SIZE])
        )
        if magic != FDT_MAGIC:
            raise bad(f"the handover tree is not a DTB: bad magic {magic:#010x} (want {FDT_MAGIC:#010x}).")
        if totalsize > len(data):
            raise bad(
                f"the handover tree is truncated: its header says {totalsize} bytes, {len(data)} are present."
            )
        if version < FDT_VERSION:
            raise bad(
                f"the handover tree is DTB version {version}; this version reads {FDT_VERSION} and later."
            )
        data = data[:totalsize]
        err = libfdt.fdt_check_full(bytearray(data), totalsize)
        if err != 0:
            raise bad(f"the handover tree is not a valid DTB: {_strerror(err)}.")
        if off_struct + size_struct > totalsize or off_strings + size_strings > totalsize:
            raise bad("the handover tree's blocks run past its end.")
        self._data = data
        self._rsv_off = off_rsv
        self._struct = (off_struct, off_struct + size_struct)
        self._strings = (off_strings, off_strings + size_strings)
        self._entries: dict[int, _Entry] = {}
        self._names: dict[int, str] = {}
        self._root_off = 0
        self._index()

    def _index(self) -> None:
        """One pass over the structure block, recording every node and property."""
        data = self._data
        base, end = self._struct
        pos = base
        stack: list[_Entry] = []
        closed_root = False
        while True:
            if pos + 4 > end:
                raise bad("the handover tree's structure block ends without FDT_END.")
            (tag,) = struct.unpack_from(">I", data, pos)
            at = pos - base
            pos += 4
            if tag == FDT_BEGIN_NODE:
                if closed_root:
                    raise bad("the handover tree has more than one root node.")
                nul = data.find(b"\0", pos, end)
                if nul < 0:
                    raise bad(f"the node at offset {at} has an unterminated name.")
                entry = _Entry(data[pos:nul])
                if not self._entries:
                    self._root_off = at
                self._entries[at] = entry
                if stack:
                    stack[-1].children.append(at)
                stack.append(entry)
                if len(stack) > FDT_MAX_DEPTH + 1:
                    raise bad(f"the handover tree nests deeper than {FDT_MAX_DEPTH} levels.")
                pos = _align4(nul + 1)
            elif tag == FDT_END_NODE:
                if not stack:
                    raise bad(f"the handover tree closes a node it never opened (offset {at}).")
                stack.pop()
                closed_root = not stack
            elif tag == FDT_PROP:
                if not stack or pos + 8 > end:
                    raise bad(f"the property at offset {at} is outside a node or truncated.")
                length, name_off = struct.unpack_from(">II", data, pos)
                pos += 8
                if pos + length > end:
                    raise bad(f"the property at offset {at} runs past the structure block.")
                stack[-1].props.append((name_off, data[pos : pos + length]))
                pos = _align4(pos + length)
            elif tag == FDT_NOP:
                continue
            elif tag == FDT_END:
                break
            else:
                raise bad(f"the handover tree has an unknown tag {tag:#x} at offset {at}.")
        if stack or not self._entries:
            raise bad("the handover tree's nodes are not closed properly.")

    # -- names ------------------------------------------------------------------------------

    def _node_name(self, offset: int) -> str:
        raw = self._entries[offset].raw_name
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(f"the name of the node at offset {offset} is not valid UTF-8 ({raw!r}).") from e

    def _prop_name(self, node: Node, name_off: int) -> str:
        name = self._names.get(name_off)
        if name is not None:
            return name
        start, end = self._strings
        nul = self._data.find(b"\0", start + name_off, end)
        if name_off >= end - start or nul < 0:
            raise bad(f"node {node.where}: a property has a bad name offset ({name_off}).")
        raw = self._data[start + name_off : nul]
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(f"node {node.where}: a property name is not valid UTF-8 ({raw!r}).") from e
        self._names[name_off] = name
        return name

    # -- queries ----------------------------------------------------------------------------

    @property
    def root(self) -> Node:
        return Node(self._root_off, "")

    def blob(self) -> bytes:
        return self._data

    def mem_reserve(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = self._rsv_off
        while pos + 16 <= len(self._data):
            addr, size = struct.unpack_from(">QQ", self._data, pos)
            if addr == 0 and size == 0:
                break
            out.append((addr, size))
            pos += 16
        return out

    def children(self, node: Node) -> list[Node]:
        """Direct subnodes in tree order; duplicate names are refused."""
        out: list[Node] = []
        seen: set[str] = set()
        for off in self._entries[node.offset].children:
            name = self._node_name(off)
            if name in seen:
                raise bad(f"node {node.where} has two children named {name!r}.")
            seen.add(name)
            out.append(Node(off, f"{node.path}/{name}"))
        return out

    def child(self, node: Node, name: str) -> Node:
        for c in self.children(node):
            if c.name == name:
                return c
        raise bad(f"node {node.where} has no {name!r} child.")

    def props(self, node: Node) -> dict[str, bytes]:
        """Every property of a node, in tree order; a name used twice is refused."""
        out: dict[str, bytes] = {}
        for name_off, value in self._entries[node.offset].props:
            name = self._prop_name(node, name_off)
            if name in out:
                raise bad(f"node {node.where} has property {name!r} twice.")
            out[name] = value
        return out

    def walk(self) -> list[tuple[Node, int]]:
        """Every node with its depth (root 0), depth first, in tree order."""
        out: list[tuple[Node, int]] = []
        todo: list[tuple[Node, int]] = [(self.root, 0)]
        while todo:
            node, depth = todo.pop()
            out.append((node, depth))
            kids = [
                Node(off, f"{node.path}/{self._node_name(off)}")
                for off in self._entries[node.offset].children
            ]
            todo.extend((k, depth + 1) for k in reversed(kids))
        return out
