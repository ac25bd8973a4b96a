"""build_tree -> parse_tree gives the records back, and the bytes follow the documented layout."""

from __future__ import annotations

import errno
import struct

import libfdt
import pytest

from luo import abi
from luo.core.handover import FileRecord, LuoRecord, MemoryRange, SessionRecord
from luo.errors import LuoError
from luo.kho import build_tree, parse_tree
from luo.kho.encoding import node_name_for


def test_roundtrip_sample(sample: tuple[LuoRecord, list[MemoryRange]]) -> None:
    luo, memory = sample
    blob = build_tree(luo, memory)
    assert parse_tree(blob, fd_count=3) == (luo, memory)


def test_roundtrip_empty() -> None:
    luo = LuoRecord(liveupdate_number=0)
    assert parse_tree(build_tree(luo, [])) == (luo, [])


def test_layout_is_the_documented_one(blob: bytes) -> None:
    fdt = libfdt.FdtRo(blob)
    assert fdt.getprop(0, "compatible").as_str() == abi.KHO_COMPATIBLE
    luo = fdt.path_offset("/LUO")
    assert fdt.getprop(luo, "compatible").as_str() == "luo-v1"
    # u64 properties are 8 little-endian bytes, u32 are 4.
    assert bytes(fdt.getprop(luo, "liveupdate-number")) == struct.pack("<Q", 7)
    f = fdt.path_offset("/LUO/file-descriptors/0")
    assert fdt.getprop(f, "compatible").as_str() == "memfd-v1"
    assert bytes(fdt.getprop(f, "data")) == struct.pack("<Q", 4096)
    assert bytes(fdt.getprop(f, "fd-index")) == struct.pack("<I", 0)
    assert fdt.getprop(f, "meta,owner-pid").as_str() == "12"
    s = fdt.path_offset("/LUO/luo-session/" + node_name_for("vm 1/é"))
    assert fdt.getprop(s, "session-name").as_str() == "vm 1/é"
    assert fdt.path_offset("/LUO/luo-session/" + node_name_for("vm 1/é") + "/18446744073709551615") > 0
    m = fdt.path_offset("/preserved-memory-map/mem@2")
    assert bytes(fdt.getprop(m, "size")) == struct.pack("<Q", 1 << 30)
    assert fdt.getprop(m, "label").as_str() == "guest-ram"
    assert fdt.getprop(fdt.path_offset("/LUO/subsystems"), "compatible").as_str() == "subsystems-v1"
    assert fdt.getprop(fdt.path_offset("/LUO/luo-session"), "compatible").as_str() == "luo-session-v2"


def test_blob_is_packed(blob: bytes) -> None:
    assert len(blob) == libfdt.FdtRo(blob).totalsize()


@pytest.mark.parametrize("name", ["a", "vm@1", "x/y", "_", "__", "a b", "ä", "x" * 63, "-.,+", "\t"])
def test_session_names_are_encoded_injectively(name: str) -> None:
    other = ("_" + name)[:63]
    luo = LuoRecord(1, sessions=(SessionRecord(name), SessionRecord(other)))
    back, _ = parse_tree(build_tree(luo))
    assert [s.name for s in back.sessions] == [name, other]
    assert node_name_for(name) != node_name_for(other)


def test_large_handover_roundtrip() -> None:
    sessions = tuple(
        SessionRecord(
            f"vm{i}", tuple(FileRecord(t, "memfd-v1", t * 4096, i * 128 + t, {"k": "v"}) for t in range(128))
        )
        for i in range(8)
    )
    luo = LuoRecord(3, {f"s{i}": i for i in range(50)}, sessions=sessions)
    memory = [MemoryRange(i, 4096, f"m{i}") for i in range(1024)]
    blob = build_tree(luo, memory)
    assert parse_tree(blob, fd_count=1024) == (luo, memory)


def test_no_limit_on_files_per_session() -> None:
    """v7.2 dropped 6.19's 128 files per session: 500 in one session cross, in order."""
    files = tuple(FileRecord(t, "memfd-v1", t, t) for t in range(500))
    luo = LuoRecord(1, sessions=(SessionRecord("big", files),))
    back, _ = parse_tree(build_tree(luo), fd_count=500)
    assert back == luo


BAD_RECORDS = [
    (LuoRecord(-1), "liveupdate-number"),
    (LuoRecord(2**64), "liveupdate-number"),
    (LuoRecord(1, {"bad name": 1}), "subsystem name"),
    (LuoRecord(1, {"compatible": 1}), "subsystem name"),
    (
        LuoRecord(1, files=(FileRecord(1, "memfd-v1", 0, 0), FileRecord(1, "memfd-v1", 0, 1))),
        "token 1 appears twice",
    ),
    (LuoRecord(1, files=(FileRecord(1, "memfd-v1", 0, 0), FileRecord(2, "memfd-v1", 0, 0))), "fd-index 0"),
    (LuoRecord(1, files=(FileRecord(1, "", 0, 0),)), "compatible"),
    (LuoRecord(1, files=(FileRecord(1, "x" * 49, 0, 0),)), "compatible"),
    (LuoRecord(1, files=(FileRecord(1, "a\0b", 0, 0),)), "NUL"),
    (LuoRecord(1, files=(FileRecord(1, "m", 2**64, 0),)), "data"),
    (LuoRecord(1, files=(FileRecord(1, "m", 0, 2**32),)), "fd-index"),
    (LuoRecord(1, files=(FileRecord(1, "m", 0, 0, {"a b": "x"}),)), "meta key"),
    (LuoRecord(1, sessions=(SessionRecord("s"), SessionRecord("s"))), "session 's' appears twice"),
    (LuoRecord(1, sessions=(SessionRecord(""),)), "session name"),
    (LuoRecord(1, sessions=(SessionRecord("x" * 64),)), "64 bytes"),
]


@pytest.mark.parametrize(("luo", "words"), BAD_RECORDS)
def test_build_refuses_what_parse_would_refuse(luo: LuoRecord, words: str) -> None:
    with pytest.raises(LuoError) as ei:
        build_tree(luo, [])
    assert ei.value.errno == errno.EINVAL
    assert words in ei.value.message


def test_build_refuses_duplicate_memory_range() -> None:
    with pytest.raises(LuoError, match="mem@3 appears twice"):
        build_tree(LuoRecord(1), [MemoryRange(3, 1), MemoryRange(3, 2)])


def test_tokens_may_repeat_across_sessions() -> None:
    luo = LuoRecord(
        1,
        files=(FileRecord(1, "m", 0, 0),),
        sessions=(
            SessionRecord("a", (FileRecord(1, "m", 0, 1),)),
            SessionRecord("b", (FileRecord(1, "m", 0, 2),)),
        ),
    )
    assert parse_tree(build_tree(luo))[0] == luo


def test_fd_count_bounds_fd_indexes(blob: bytes) -> None:
    parse_tree(blob, fd_count=3)
    with pytest.raises(LuoError) as ei:
        parse_tree(blob, fd_count=2)
    assert ei.value.errno == errno.EINVAL
    assert "fd-index 2 is out of range" in ei.value.message


def test_odd_meta_values_are_escaped_not_refused() -> None:
    # Meta is for status only; a process name with stray bytes must not fail an update.
    luo = LuoRecord(1, files=(FileRecord(1, "m", 0, 0, {"comm": "a\0b", "name": "x\udcffy"}),))
    back, _ = parse_tree(build_tree(luo))
    assert back.files[0].meta == {"comm": "a\\0b", "name": "x\\udcffy"}
