"""Read-only access to an untrusted DTB that fails only with LuoError(EINVAL).

libfdt trusts the header's ``totalsize`` and would read past a short buffer, so the header is
checked here in Python first; then ``fdt_check_full`` validates the whole structure (tags,
nesting, string offsets, lengths) so every later libfdt call stays inside the blob.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import libfdt

from luo.errors import LuoError

FDT_HEADER_SIZE = 40  # struct fdt_header, version 17
FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17  # what libfdt writes; earlier versions align property values differently
FDT_PROP = 3
FDT_MAX_DEPTH = 64  # far deeper than any handover; bounds work on hostile input


def bad(message: str) -> LuoError:
    return LuoError(errno.EINVAL, message)


def _strerror(err: int) -> str:
    try:
        return str(libfdt.fdt_strerror(err))
    except Exception:  # noqa: BLE001 - a message, never a failure of its own
        return f"libfdt error {err}"


def _decode_name(raw: str, what: str) -> str:
    # SWIG hands back names decoded with surrogateescape; insist on real UTF-8.
    try:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError as e:
        raise bad(f"{what} {raw!r} is not valid UTF-8.") from e


@dataclass(frozen=True)
class Node:
    offset: int
    path: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


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
        magic, totalsize = struct.unpack(">II", data[:8])
        if magic != FDT_MAGIC:
            raise bad(f"the handover tree is not a DTB: bad magic {magic:#010x} (want {FDT_MAGIC:#010x}).")
        if totalsize > len(data):
            raise bad(
                f"the handover tree is truncated: its header says {totalsize} bytes, {len(data)} are present."
            )
        version = struct.unpack(">I", data[20:24])[0]
        if version < FDT_VERSION:
            raise bad(
                f"the handover tree is DTB version {version}; this version reads {FDT_VERSION} and later."
            )
        self._buf = bytearray(data[:totalsize])
        err = libfdt.fdt_check_full(self._buf, totalsize)
        if err != 0:
            raise bad(f"the handover tree is not a valid DTB: {_strerror(err)}.")

    @property
    def root(self) -> Node:
        return Node(0, "")

    def blob(self) -> bytes:
        return bytes(self._buf)

    def mem_reserve(self) -> list[tuple[int, int]]:
        n = libfdt.fdt_num_mem_rsv(self._buf)
        out: list[tuple[int, int]] = []
        for i in range(max(n, 0)):
            err, addr, size = libfdt.fdt_get_mem_rsv(self._buf, i)
            if err == 0:
                out.append((addr, size))
        return out

    def children(self, node: Node) -> list[Node]:
        """Direct subnodes in tree order; duplicate names are refused."""
        out: list[Node] = []
        seen: set[str] = set()
        off = libfdt.fdt_first_subnode(self._buf, node.offset)
        while off >= 0:
            name = self.node_name(off)
            if name in seen:
                raise bad(f"node {node.path or '/'} has two children named {name!r}.")
            seen.add(name)
            out.append(Node(off, f"{node.path}/{name}"))
            off = libfdt.fdt_next_subnode(self._buf, off)
        if off != -libfdt.NOTFOUND:
            raise bad(f"node {node.path or '/'}: cannot list children: {_strerror(off)}.")
        return out

    def child(self, node: Node, name: str) -> Node:
        for c in self.children(node):
            if c.name == name:
                return c
        raise bad(f"node {node.path or '/'} has no {name!r} child.")

    def node_name(self, offset: int) -> str:
        res = libfdt.fdt_get_name(self._buf, offset)
        if not isinstance(res, list) or res[0] is None:
            raise bad(f"cannot read the name of the node at offset {offset}.")
        return _decode_name(res[0], "node name")

    def props(self, node: Node) -> dict[str, bytes]:
        """Every property of a node, in tree order; a name used twice is refused."""
        out: dict[str, bytes] = {}
        off = libfdt.fdt_first_property_offset(self._buf, node.offset)
        while off >= 0:
            name, value = self._prop_at(node, off)
            if name in out:
                raise bad(f"node {node.path or '/'} has property {name!r} twice.")
            out[name] = value
            off = libfdt.fdt_next_property_offset(self._buf, off)
        if off != -libfdt.NOTFOUND:
            raise bad(f"node {node.path or '/'}: cannot list properties: {_strerror(off)}.")
        return out

    def _prop_at(self, node: Node, off: int) -> tuple[str, bytes]:
        """The property at struct offset ``off``, read from the bytes themselves.

        pylibfdt's getter fails with SystemError on a name that is not UTF-8, so the (already
        validated) layout is read here: tag, length, name offset, value; name in the strings block.
        """
        where = f"node {node.path or '/'}"
        buf = self._buf
        struct_off = libfdt.fdt_off_dt_struct(buf)
        strings_off = libfdt.fdt_off_dt_strings(buf)
        strings_end = strings_off + libfdt.fdt_size_dt_strings(buf)
        pos = struct_off + off
        if pos + 12 > len(buf):
            raise bad(f"{where}: a property runs past the end of the tree.")
        tag, length, name_off = struct.unpack_from(">III", buf, pos)
        if tag != FDT_PROP or pos + 12 + length > len(buf):
            raise bad(f"{where}: the property at offset {off} is malformed.")
        start = strings_off + name_off
        end = buf.find(b"\0", start, strings_end)
        if name_off >= strings_end - strings_off or end < 0:
            raise bad(f"{where}: the property at offset {off} has a bad name offset.")
        try:
            name = bytes(buf[start:end]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(f"{where}: a property name is not valid UTF-8 ({bytes(buf[start:end])!r}).") from e
        return name, bytes(buf[pos + 12 : pos + 12 + length])

    def walk(self) -> list[tuple[Node, int]]:
        """Every node with its depth (root 0), depth first, in tree order."""
        out: list[tuple[Node, int]] = [(self.root, 0)]
        stack = [""]
        off, depth = 0, 0
        while True:
            res = libfdt.fdt_next_node(self._buf, off, depth)
            off, depth = res[0], res[1]
            if off < 0 or depth <= 0:
                break
            if depth > FDT_MAX_DEPTH:
                raise bad(f"the handover tree nests deeper than {FDT_MAX_DEPTH} levels.")
            del stack[depth:]
            path = f"{stack[-1]}/{self.node_name(off)}"
            stack.append(path)
            out.append((Node(off, path), depth))
        if off < 0 and off != -libfdt.NOTFOUND:
            raise bad(f"cannot walk the handover tree: {_strerror(off)}.")
        return out
