"""The VM state record: everything but RAM, as one byte string built and parsed inside the blackout.

Layout: MAGIC (8) | u32 record version | u32 header length | JSON header | payload bytes.
The header is {"meta": {...}, "components": {name: {"version", "offset", "length"}}}; each
component (a vCPU, a device) owns its payload and its version, so one device can change its format
without touching the others. Inside a payload, ``pack_blobs`` stores named raw KVM structs.
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

from luo.errors import LuoError

MAGIC = b"LUOVMST\x00"
RECORD_VERSION = 1
_HDR = struct.Struct("<8sII")


def build_record(meta: dict[str, Any], components: dict[str, tuple[int, bytes]]) -> bytes:
    index: dict[str, dict[str, int]] = {}
    off = 0
    for name, (version, payload) in components.items():
        index[name] = {"version": version, "offset": off, "length": len(payload)}
        off += len(payload)
    header = json.dumps({"meta": meta, "components": index}, separators=(",", ":")).encode()
    return b"".join([_HDR.pack(MAGIC, RECORD_VERSION, len(header)), header, *(p for _, p in components.values())])


def parse_record(record: bytes) -> tuple[dict[str, Any], dict[str, tuple[int, bytes]]]:
    """(meta, {component: (version, payload)}); LuoError(EINVAL/EPROTO) for a record not ours."""
    if len(record) < _HDR.size:
        raise LuoError(errno.EINVAL, "the VM state record is too short to hold its header")
    magic, version, hlen = _HDR.unpack_from(record)
    if magic != MAGIC:
        raise LuoError(errno.EINVAL, "this is not a luo VM state record (bad magic)")
    if version != RECORD_VERSION:
        raise LuoError(errno.EPROTO, f"VM state record version {version} is unknown to this VMM (it reads {RECORD_VERSION})")
    try:
        header = json.loads(record[_HDR.size : _HDR.size + hlen])
    except ValueError:
        raise LuoError(errno.EINVAL, "the VM state record header is not valid JSON") from None
    base = _HDR.size + hlen
    out: dict[str, tuple[int, bytes]] = {}
    for name, c in header["components"].items():
        start = base + c["offset"]
        if start + c["length"] > len(record):
            raise LuoError(errno.EINVAL, f"component {name} reaches past the end of the VM state record")
        out[name] = (c["version"], record[start : start + c["length"]])
    return header["meta"], out


def check_version(component: str, got: int, want: int) -> None:
    if got != want:
        raise LuoError(errno.EPROTO, f"{component} state version {got} is unknown to this VMM (it reads {want})")


_BLOB = struct.Struct("<HI")


def pack_blobs(blobs: dict[str, bytes]) -> bytes:
    parts = []
    for name, data in blobs.items():
        n = name.encode()
        parts += [_BLOB.pack(len(n), len(data)), n, data]
    return b"".join(parts)


def unpack_blobs(payload: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    off = 0
    while off < len(payload):
        nlen, dlen = _BLOB.unpack_from(payload, off)
        off += _BLOB.size
        name = payload[off : off + nlen].decode()
        off += nlen
        out[name] = payload[off : off + dlen]
        off += dlen
    if off != len(payload):
        raise LuoError(errno.EINVAL, "a component payload of the VM state record is truncated")
    return out
