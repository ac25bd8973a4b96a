"""A DTS printer walking the tree with libfdt, so ``luo kho dump`` needs no dtc.

Output is dts that ``dtc -I dts`` compiles back to the same values. Strings print as quoted
strings; our integers are little-endian (see encoding.py), which dts cells (``<...>``, always
big-endian) cannot express, so they print as bytes with the decoded value in a comment:
``data = [00 10 00 00 00 00 00 00]; /* u64 0x1000 */``.
"""

from __future__ import annotations

from luo.errors import LuoError
from luo.kho import compat
from luo.kho.reader import FdtReader, Node, bad

# Properties our layout defines as integers, by name (anywhere) or by containing node.
_U64_PROPS = frozenset({"data", "token", "size", "liveupdate-number"})
_U32_PROPS = frozenset({"fd-index"})


def _printable_strings(raw: bytes) -> list[str] | None:
    """The strings of a stringlist, or None if ``raw`` is not one (dtc's own heuristic)."""
    if not raw or not raw.endswith(b"\0"):
        return None
    parts = raw[:-1].split(b"\0")
    if any(not p for p in parts):
        return None
    out: list[str] = []
    for p in parts:
        if any(b < 0x20 and b not in (0x09, 0x0A) or b == 0x7F for b in p):
            return None
        out.append(_quote(p))
    return out


def _quote(raw: bytes) -> str:
    out = ['"']
    for b in raw:
        if b == 0x22:
            out.append('\\"')
        elif b == 0x5C:
            out.append("\\\\")
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x09:
            out.append("\\t")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    out.append('"')
    return "".join(out)


def _bytes(raw: bytes) -> str:
    return "[" + " ".join(f"{b:02x}" for b in raw) + "]"


def _int_kind(node: Node, name: str, raw: bytes) -> int:
    """8 or 4 if the layout says this property is a u64/u32 of that size, else 0."""
    is_subsystem = node.path == f"/{compat.LUO_NODE}/{compat.SUBSYSTEMS_NODE}" and name != "compatible"
    if (name in _U64_PROPS or is_subsystem) and len(raw) == 8:
        return 8
    if name in _U32_PROPS and len(raw) == 4:
        return 4
    return 0


def _format_prop(node: Node, name: str, raw: bytes) -> str:
    if not raw:
        return f"{name};"
    kind = _int_kind(node, name, raw)
    if kind:
        value = int.from_bytes(raw, "little")
        return f"{name} = {_bytes(raw)}; /* u{kind * 8} {value:#x} = {value} */"
    strings = _printable_strings(raw)
    if strings is not None:
        return f"{name} = {', '.join(strings)};"
    return f"{name} = {_bytes(raw)};"


def to_dts(blob: bytes | bytearray | memoryview) -> str:
    """The tree as dts source. Raises LuoError(EINVAL) if ``blob`` is not a valid DTB."""
    try:
        reader = FdtReader(blob)
        lines = ["/dts-v1/;", ""]
        for addr, size in reader.mem_reserve():
            lines.append(f"/memreserve/ {addr:#x} {size:#x};")
        nodes = reader.walk()
        open_depth = -1
        for node, depth in nodes:
            while open_depth >= depth:
                lines.append("\t" * open_depth + "};")
                open_depth -= 1
            indent = "\t" * depth
            if depth > 0:
                lines.append("")
            lines.append(f"{indent}{node.name or '/'} {{")
            for name, raw in reader.props(node).items():
                lines.append(f"{indent}\t{_format_prop(node, name, raw)}")
            open_depth = depth
        while open_depth >= 0:
            lines.append("\t" * open_depth + "};")
            open_depth -= 1
        return "\n".join(lines) + "\n"
    except LuoError:
        raise
    except Exception as e:  # noqa: BLE001 - only LuoError leaves this function
        raise bad(f"cannot print the handover tree ({type(e).__name__}: {e}).") from e
