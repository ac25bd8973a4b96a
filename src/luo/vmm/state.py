"""The VM state record: everything but RAM, as one byte string built and parsed inside the blackout.

Layout: MAGIC (8) | u32 record version | u32 header length | header | payload bytes. Every
version keeps these 16 bytes, so any reader refuses a version it does not know (EPROTO) before
looking further. Each component (a vCPU, a device) owns its payload and its version, so one device
can change its format without touching the others.

- Version 2 (written since issue 8 item 2): a binary header, ``u32 ncpus | u32 ncomponents |
  u64 mem_bytes | u16 name length | name`` then per component ``16s name | u32 version | u32
  offset | u32 length`` (offsets from the first payload byte). The fixed-size components (the
  vCPUs, irqchip, pit, clock) come first, at offsets a VMM can compute before the pause, then
  the variable ones (uart, mmio-console). ``RecordWriter`` prepares everything but the last two
  table entries at VM creation. A JSON header and named blobs cost 24 µs per save + restore
  (bench/save_restore.py --profile: build_record 13.4 µs, parse_record 10.8 µs median).
- Version 1: a JSON header ``{"meta": {...}, "components": {name: {"version", "offset",
  "length"}}}`` and, inside payloads, ``pack_blobs`` named raw structs. Still read (and written on
  request: ``Vm.save(version=1)``, for a successor that only knows version 1).
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

from luo.errors import LuoError

MAGIC = b"LUOVMST\x00"
RECORD_VERSION = 2  # what Vm.save() writes
KNOWN_VERSIONS = (1, 2)  # what Vm.restore() reads
_HDR = struct.Struct("<8sII")
META2 = struct.Struct("<IIQH")  # ncpus, ncomponents, mem_bytes, name length
COMP2 = struct.Struct("<16sIII")  # name, version, offset, length


def record_version(record: bytes) -> int:
    """The version of a record (checked: ours, long enough, a version this VMM reads)."""
    if len(record) < _HDR.size:
        raise LuoError(errno.EINVAL, "the VM state record is too short to hold its header")
    magic, version, _ = _HDR.unpack_from(record)
    if magic != MAGIC:
        raise LuoError(errno.EINVAL, "this is not a luo VM state record (bad magic)")
    if version not in KNOWN_VERSIONS:
        raise LuoError(
            errno.EPROTO,
            f"VM state record version {version} is unknown to this VMM (it reads versions "
            f"{', '.join(map(str, KNOWN_VERSIONS))})",
        )
    return int(version)


class RecordWriter:
    """Version-2 records of one VM: the header but the variable components' entries is built once.

    ``fixed``: (name, version, length) of the components whose payload is the ``fixed`` bytes
    passed to ``build``, in that order; ``build`` appends the variable ones after them.
    """

    def __init__(self, meta: dict[str, Any], fixed: list[tuple[str, int, int]], nvariable: int) -> None:
        name = str(meta["name"]).encode()
        hlen = META2.size + len(name) + COMP2.size * (len(fixed) + nvariable)
        parts = [_HDR.pack(MAGIC, 2, hlen), META2.pack(meta["ncpus"], len(fixed) + nvariable, meta["mem_bytes"],
                                                       len(name)), name]
        off = 0
        for cname, version, length in fixed:
            parts.append(COMP2.pack(cname.encode(), version, off, length))
            off += length
        self.fixed_len = off
        self._head = b"".join(parts)

    def build(self, fixed: memoryview | bytes, variable: list[tuple[str, int, bytes]]) -> bytes:
        off, entries = self.fixed_len, []
        for cname, version, payload in variable:
            entries.append(COMP2.pack(cname.encode(), version, off, len(payload)))
            off += len(payload)
        return b"".join([self._head, *entries, fixed, *(p for _, _, p in variable)])


def parse_record_v2(record: bytes) -> tuple[dict[str, Any], list[tuple[str, int, int, int]], int]:
    """(meta, [(name, version, offset, length)], offset of the first payload byte) of a version-2
    record; LuoError(EINVAL) for a damaged one."""
    _, _, hlen = _HDR.unpack_from(record)
    base = _HDR.size + hlen
    if base > len(record) or hlen < META2.size:
        raise LuoError(errno.EINVAL, "the VM state record header reaches past its end")
    ncpus, ncomp, mem_bytes, nlen = META2.unpack_from(record, _HDR.size)
    p = _HDR.size + META2.size
    if p + nlen + ncomp * COMP2.size != base:
        raise LuoError(errno.EINVAL, "the VM state record header has the wrong length for its components")
    name = record[p : p + nlen].decode("utf-8", "replace")
    p += nlen
    table = []
    size = len(record) - base
    for _ in range(ncomp):
        cname, version, off, length = COMP2.unpack_from(record, p)
        p += COMP2.size
        n = cname.rstrip(b"\0").decode("ascii", "replace")
        if off + length > size:
            raise LuoError(errno.EINVAL, f"component {n} reaches past the end of the VM state record")
        table.append((n, version, off, length))
    return {"name": name, "mem_bytes": mem_bytes, "ncpus": ncpus}, table, base


def build_record(meta: dict[str, Any], components: dict[str, tuple[int, bytes]]) -> bytes:
    """A version-1 record (JSON header)."""
    index: dict[str, dict[str, int]] = {}
    off = 0
    for name, (version, payload) in components.items():
        index[name] = {"version": version, "offset": off, "length": len(payload)}
        off += len(payload)
    header = json.dumps({"meta": meta, "components": index}, separators=(",", ":")).encode()
    return b"".join([_HDR.pack(MAGIC, 1, len(header)), header, *(p for _, p in components.values())])


def parse_record(record: bytes) -> tuple[dict[str, Any], dict[str, tuple[int, bytes]]]:
    """(meta, {component: (version, payload)}) of a version-1 record; LuoError(EINVAL/EPROTO)
    for a record not ours or of another version."""
    version = record_version(record)
    if version != 1:
        raise LuoError(errno.EPROTO, f"VM state record version {version} is not read by parse_record (version 1)")
    _, _, hlen = _HDR.unpack_from(record)
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


def check_version(component: str, got: int, want: int | tuple[int, ...]) -> None:
    """EPROTO unless ``got`` is the version (or one of the versions) this VMM reads for ``component``."""
    wants = want if isinstance(want, tuple) else (want,)
    if got not in wants:
        raise LuoError(errno.EPROTO, f"{component} state version {got} is unknown to this VMM "
                                     f"(it reads {', '.join(map(str, wants))})")


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
