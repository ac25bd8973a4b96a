"""How values and names are spelled in the tree.

Integers are stored *little-endian* (x86-64's native order), as the kernel stores KHO/LUO
properties native-endian. We fix the order instead of following ``sys.byteorder`` so a tree means
the same on every host; ``dtc`` shows these as bytes or (misread, big-endian) cells either way.

Session names are free text (up to 63 bytes) while FDT node names are restricted, so a session
node is named by an escaped form of its name and the real name is kept in a ``name`` property.
"""

from __future__ import annotations

import re
import struct

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

# Characters the devicetree spec allows in property names.
_PROP_NAME_RE = re.compile(r"[A-Za-z0-9,._+?#-]+")
# Characters kept verbatim in an escaped node name ('_' is the escape character itself).
_NODE_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789,.+-")


def pack_u32(value: int) -> bytes:
    return struct.pack("<I", value)


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def unpack_u32(raw: bytes) -> int:
    return int(struct.unpack("<I", raw)[0])


def unpack_u64(raw: bytes) -> int:
    return int(struct.unpack("<Q", raw)[0])


def pack_str(value: str) -> bytes:
    return value.encode("utf-8") + b"\0"


def is_prop_name(name: str) -> bool:
    return _PROP_NAME_RE.fullmatch(name) is not None


def node_name_for(text: str) -> str:
    """A valid, injective FDT node name for free text: unsafe bytes become ``_xx`` (hex)."""
    out: list[str] = []
    for b in text.encode("utf-8"):
        out.append(chr(b) if b in _NODE_SAFE else f"_{b:02x}")
    return "".join(out) or "_"
