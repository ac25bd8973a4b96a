"""The state record format: round trip, and refusal of records that are not ours."""

from __future__ import annotations

import errno
import struct

import pytest

from luo.errors import LuoError
from luo.vmm.state import (
    MAGIC,
    RecordWriter,
    build_record,
    check_version,
    pack_blobs,
    parse_record,
    parse_record_v2,
    record_version,
    unpack_blobs,
)


def test_roundtrip() -> None:
    comps = {"vcpu0": (1, pack_blobs({"regs": b"\x01" * 144, "empty": b""})), "uart": (3, b'{"x":1}')}
    meta, got = parse_record(build_record({"ncpus": 1}, comps))
    assert meta == {"ncpus": 1}
    assert got["uart"] == (3, b'{"x":1}')
    assert unpack_blobs(got["vcpu0"][1]) == {"regs": b"\x01" * 144, "empty": b""}


def test_unknown_record_version_refused() -> None:
    rec = bytearray(build_record({}, {}))
    struct.pack_into("<I", rec, 8, 99)
    with pytest.raises(LuoError) as ei:
        parse_record(bytes(rec))
    assert ei.value.errno == errno.EPROTO


def test_bad_magic_and_truncation_refused() -> None:
    rec = build_record({}, {"a": (1, b"xyz")})
    with pytest.raises(LuoError) as ei:
        parse_record(b"NOTLUO!!" + rec[8:])
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(LuoError) as ei:
        parse_record(rec[:-1])
    assert ei.value.errno == errno.EINVAL
    assert rec.startswith(MAGIC)


def test_component_version_refused() -> None:
    with pytest.raises(LuoError) as ei:
        check_version("uart16550", 2, 1)
    assert ei.value.errno == errno.EPROTO
    assert "uart16550" in ei.value.message


def test_truncated_blobs_refused() -> None:
    with pytest.raises(LuoError):
        unpack_blobs(pack_blobs({"a": b"12345"})[:-2])


def test_v2_roundtrip_and_version_refusal() -> None:
    w = RecordWriter({"name": "vm-é", "mem_bytes": 1 << 30, "ncpus": 2}, [("vcpu0", 2, 3), ("pit", 1, 2)], 1)
    rec = w.build(b"abcde", [("uart", 2, b"xyz")])
    assert record_version(rec) == 2
    meta, table, base = parse_record_v2(rec)
    assert meta == {"name": "vm-é", "mem_bytes": 1 << 30, "ncpus": 2}
    assert table == [("vcpu0", 2, 0, 3), ("pit", 1, 3, 2), ("uart", 2, 5, 3)]
    assert rec[base:] == b"abcdexyz"
    with pytest.raises(LuoError) as ei:
        parse_record(rec)  # the version-1 parser does not take a version-2 record
    assert ei.value.errno == errno.EPROTO
    with pytest.raises(LuoError) as ei:
        parse_record_v2(rec[:-1])
    assert ei.value.errno == errno.EINVAL
    bad = bytearray(rec)
    struct.pack_into("<I", bad, 8, 3)
    with pytest.raises(LuoError) as ei:
        record_version(bytes(bad))
    assert ei.value.errno == errno.EPROTO and "version 3 is unknown" in ei.value.message
    assert record_version(build_record({}, {})) == 1


def test_check_version_lists_what_it_reads() -> None:
    check_version("uart16550", 1, (2, 1))
    with pytest.raises(LuoError) as ei:
        check_version("uart16550", 3, (2, 1))
    assert ei.value.errno == errno.EPROTO and "reads 2, 1" in ei.value.message
