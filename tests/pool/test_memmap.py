"""The pool map node: round trip, what the kernel-style bitmaps hold, hostile trees refused."""

from __future__ import annotations

import errno
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import replace

import libfdt
import pytest

from luo.errors import LuoError
from luo.kho.reader import FdtReader
from luo.pool.extents import GIGA_ORDER, Allocator, Extent
from luo.pool.labels import ShardLabel
from luo.pool.memmap import (
    POOL_MAP_COMPATIBLE,
    POOL_MAP_NODE,
    PoolMap,
    parse_pool_map,
    shard_records,
)
from luo.pool.spec import make_layout
from luo.pool.tree import pool_dtb, read_pool_dtb

M, G = 1 << 20, 1 << 30
DTC = shutil.which("dtc")
LAYOUT = make_layout("8G:hugetlb", "2M:devdax,1G:fsdax:1G", "end")  # general area [2G, 8G - 2M)
EXTENTS = (
    Extent(2 * G, 2 * G, GIGA_ORDER, "vm:web1", "preserved"),
    Extent(4 * G, 4 * M, 9, "vm:web1", "preserved"),
    Extent(4 * G + 4 * M, 2 * M, 9, "session:x", "preserved"),
    Extent(5 * G, 2 * M, 9, "client:123", "preserved"),
)
LABELLED = [ShardLabel("db", "fsdax", 6 * G, 2 * M)]


def sample() -> PoolMap:
    shards = shard_records(LAYOUT, LABELLED, {"shard0": "vm:web1", "db": "session:x"})
    return PoolMap(LAYOUT, 3, EXTENTS, shards)


def tree(m: PoolMap) -> bytes:
    """The map on its own, as ``<runtime>/pool.dtb`` holds it."""
    return pool_dtb(m)


def parse(blob: bytes) -> PoolMap:
    return read_pool_dtb(blob)


def mutate(blob: bytes, change: Callable[[libfdt.Fdt], None]) -> bytes:
    fdt = libfdt.Fdt(blob)
    fdt.resize(len(blob) + 4096)
    change(fdt)
    fdt.pack()
    return bytes(fdt.as_bytearray())


def setprop(path: str, name: str, value: bytes) -> Callable[[libfdt.Fdt], None]:
    return lambda fdt: fdt.setprop(fdt.path_offset(path), name, value)


def refused(blob: bytes, says: str) -> LuoError:
    with pytest.raises(LuoError) as info:
        parse(blob)
    assert info.value.errno == errno.EINVAL
    assert says in info.value.message, info.value.message
    assert not re.search(r"\(\w+(Error|Exception):", info.value.message), "a refusal without its own check"
    return info.value


def bitmap(blob: bytes, order: int) -> int:
    reader = FdtReader(blob)
    node = reader.child(reader.child(reader.root, POOL_MAP_NODE), f"order@{order}")
    return int.from_bytes(reader.props(node)["bitmap"], "little")


def test_round_trip() -> None:
    m = sample()
    assert parse(tree(m)) == m
    empty = PoolMap(make_layout("512M:shmem"), 0)
    assert parse(tree(empty)) == empty


def test_fd_index_must_name_a_handed_over_fd() -> None:
    reader = FdtReader(tree(sample()))  # fd-index 3
    node = reader.child(reader.root, POOL_MAP_NODE)
    assert parse_pool_map(reader, node, fd_count=4) == sample()
    with pytest.raises(LuoError) as info:
        parse_pool_map(reader, node, fd_count=3)
    assert info.value.errno == errno.EINVAL and "out of range" in info.value.message


def test_node_contents() -> None:
    blob = tree(sample())
    reader = FdtReader(blob)
    node = reader.child(reader.root, POOL_MAP_NODE)
    props = reader.props(node)
    assert props["compatible"] == POOL_MAP_COMPATIBLE.encode() + b"\0" == b"luo-pool-map-v1\0"
    assert props["layout"] == b"8G:hugetlb shards=2M:devdax,1G:fsdax:1G labels=end\0"
    assert struct.unpack("<Q", props["granule"]) == (2 * M,)
    assert struct.unpack("<I", props["fd-index"]) == (3,)
    names = [c.name for c in reader.children(node)]
    assert names == ["order@9", "order@18", "owner@0", "owner@1", "owner@2", "shard@0", "shard@1", "shard@2"]
    owner0 = reader.props(reader.child(node, "owner@0"))
    assert owner0["owner"] == b"client:123\0"  # owners in name order
    web1 = reader.props(reader.child(node, "owner@2"))
    assert struct.unpack(">4Q", web1["extents"]) == (2 * G, 2 * G, 4 * G, 4 * M)  # big-endian pairs


def test_bitmaps_are_per_order_bits_over_the_whole_pool() -> None:
    blob = tree(sample())
    reader = FdtReader(blob)
    node = reader.child(reader.root, POOL_MAP_NODE)
    assert len(reader.props(reader.child(node, "order@9"))["bitmap"]) == 8 * G // (2 * M) // 8  # 4096 bits
    assert len(reader.props(reader.child(node, "order@18"))["bitmap"]) == 8  # 8 bits, one u64 word
    assert bitmap(blob, GIGA_ORDER) == 0b1100  # [2G, 4G) as two 1G units
    want = 1  # shard0 [0, 2M)
    want |= ((1 << 512) - 1) << 512  # shard1 [1G, 2G)
    want |= 0b111 << 2048  # vm:web1 [4G, 4G + 4M) and session:x [4G + 4M, 4G + 6M)
    want |= 1 << 2560  # client:123 at 5G
    want |= 1 << 3072  # the labelled shard db at 6G
    assert bitmap(blob, 9) == want


def test_the_allocator_round_trips_through_the_map() -> None:
    calls: list[tuple[int, int]] = []
    start, length = LAYOUT.general
    pool = Allocator(start, length, lambda o, n: calls.append((o, n)))
    pool.alloc("vm:web1", 2 * G, GIGA_ORDER)
    pool.alloc("vm:web2", 6 * M)
    pool.alloc("session:x", 1)
    m = PoolMap(LAYOUT, 0, tuple(pool.preserve_all()), shard_records(LAYOUT))
    back = parse(tree(m))
    new = Allocator.from_preserved(start, length, back.extents, calls.append)  # type: ignore[arg-type]
    assert [replace(e, state="allocated") for e in new.claim_all("vm:web1")] == pool.extents_of("vm:web1")
    assert "restored once" in pytest.raises(LuoError, new.claim_all, "vm:web1").value.message
    assert [e.owner for e in new.finish()] == ["vm:web2", "session:x"]


@pytest.mark.skipif(DTC is None, reason="dtc is not installed (scripts/setup.sh installs it)")
def test_dtc_decodes_the_node() -> None:
    assert DTC is not None
    out = subprocess.run(
        [DTC, "-q", "-I", "dtb", "-O", "dts", "-"],
        input=tree(sample()),
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    assert "pool-map {" in out and 'compatible = "luo-pool-map-v1";' in out
    assert 'owner = "vm:web1";' in out and 'owner = "client:123";' in out
    assert 'layout = "8G:hugetlb shards=2M:devdax,1G:fsdax:1G labels=end";' in out
    assert "extents = <0x00 0x80000000 0x00 0x80000000 0x01 0x00 0x00 0x400000>;" in out  # readable cells


# -- the writer refuses what the parser would ---------------------------------------------------


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            lambda m: replace(m, extents=(Extent(0, 2 * M, 9, "vm:a", "preserved"),)),
            "outside the pool's general area",
        ),
        (lambda m: replace(m, extents=(Extent(6 * G, 2 * M, 9, "vm:a", "preserved"),)), "overlap"),
        (
            lambda m: replace(m, extents=(*m.extents, Extent(4 * G + 2 * M, 2 * M, 9, "vm:b", "preserved"))),
            "overlap",
        ),
        (lambda m: replace(m, extents=(Extent(2 * G, 2 * M, 9, "vm:a", "allocated"),)), "only preserved"),
        (
            lambda m: replace(m, extents=(Extent(2 * G + 2 * M, G, GIGA_ORDER, "vm:a", "preserved"),)),
            "aligned",
        ),
        (
            lambda m: replace(m, extents=(Extent(8 * G - 2 * M, 2 * M, 9, "vm:a", "preserved"),)),
            "general area",
        ),
        (lambda m: replace(m, extents=(Extent(2 * G, 2 * M, 9, "vm\n", "preserved"),)), "non-printable"),
        (lambda m: replace(m, fd_index=1 << 32), "fd-index"),
        (lambda m: replace(m, shards=m.shards[1:]), "layout places"),
        (lambda m: replace(m, shards=m.shards[:1]), "lists 1 shards"),
        (lambda m: replace(m, shards=(*m.shards, replace(m.shards[2], name="shard0"))), "twice"),
        (lambda m: replace(m, layout=make_layout("8G:hugetlb", "2M:devdax,1G:fsdax:1G")), "no labels"),
    ],
)
def test_write_refuses_a_bad_map(change: Callable[[PoolMap], PoolMap], says: str) -> None:
    with pytest.raises(LuoError) as info:
        tree(change(sample()))
    assert info.value.errno == errno.EINVAL and says in info.value.message, info.value.message


# -- hostile trees --------------------------------------------------------------------------------

N = "/" + POOL_MAP_NODE


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _ranges(*pairs: int) -> bytes:
    return struct.pack(f">{len(pairs)}Q", *pairs)


def _without_bit(blob: bytes, order: int, bit: int) -> bytes:
    bits = bitmap(blob, order) & ~(1 << bit)
    size = len(bits.to_bytes(8 * 64 if order == 9 else 8, "little"))
    return mutate(blob, setprop(f"{N}/order@{order}", "bitmap", bits.to_bytes(size, "little")))


def _with_bit(blob: bytes, order: int, bit: int) -> bytes:
    size = 8 * G // (4096 << order) // 8
    bits = bitmap(blob, order) | (1 << bit)
    return mutate(blob, setprop(f"{N}/order@{order}", "bitmap", bits.to_bytes(max(size, 8), "little")))


HOSTILE: list[tuple[str, Callable[[libfdt.Fdt], None], str]] = [
    ("unknown property", setprop(N, "color", b"red\0"), "unknown property 'color'"),
    ("unknown child property", setprop(f"{N}/owner@0", "pid", b"\0\0\0\0"), "unknown property 'pid'"),
    ("compatible", setprop(N, "compatible", b"luo-pool-map-v2\0"), "reads only 'luo-pool-map-v1'"),
    ("size disagrees", setprop(N, "size", _u64(16 * G)), "but its layout is"),
    ("backing disagrees", setprop(N, "backing", b"shmem\0"), "but its layout is"),
    ("labels disagree", setprop(N, "labels", b"none\0"), "but its layout is"),
    (
        "layout not canonical",
        setprop(N, "layout", b"8192M:hugetlb shards=2M:devdax,1G:fsdax:1G labels=end\0"),
        "canonical",
    ),
    ("layout garbage", setprop(N, "layout", b"\xff\0"), "not valid UTF-8"),
    ("granule", setprop(N, "granule", _u64(4096)), "granule"),
    ("fd-index size", setprop(N, "fd-index", b"\0\0\0\0\0\0\0\0"), "a u32 is 4"),
    ("bitmap length", setprop(f"{N}/order@18", "bitmap", bytes(16)), "bitmap is 16 bytes long"),
    ("bits past the end", setprop(f"{N}/order@18", "bitmap", _u64(0b1100 | 1 << 8)), "past the end"),
    ("ranges length", setprop(f"{N}/owner@0", "extents", b"\0" * 15), "u64 pairs"),
    ("ranges empty", setprop(f"{N}/owner@0", "extents", b""), "u64 pairs"),
    (
        "range past the pool",
        setprop(f"{N}/owner@0", "extents", _ranges(5 * G, (1 << 64) - 5 * G)),
        "past the pool's end",
    ),
    (
        "range in a shard",
        setprop(f"{N}/owner@0", "extents", _ranges(0, 2 * M)),
        "outside the pool's general area",
    ),
    ("range misaligned", setprop(f"{N}/owner@0", "extents", _ranges(5 * G + M, 2 * M)), "not preserved whole"),
    ("range of no length", setprop(f"{N}/owner@0", "extents", _ranges(5 * G, 0)), "not preserved whole"),
    ("ranges overlap", setprop(f"{N}/owner@0", "extents", _ranges(4 * G + 4 * M, 2 * M)), "overlap"),
    ("owner NUL", setprop(f"{N}/owner@0", "owner", b"vm\0x\0"), "single NUL-terminated"),
    ("owner unprintable", setprop(f"{N}/owner@0", "owner", b"vm\x1b[2J\0"), "non-printable"),
    ("owner too long", setprop(f"{N}/owner@0", "owner", b"v" * 65 + b"\0"), "at most 64"),
    ("owner twice", setprop(f"{N}/owner@0", "owner", b"vm:web1\0"), "twice"),
    ("owner gap", lambda f: f.set_name(f.path_offset(f"{N}/owner@1"), "owner@7"), "without gaps"),
    ("unknown child", lambda f: f.add_subnode(f.path_offset(N), "extra"), "unknown child 'extra'"),
    ("leading zero", lambda f: f.set_name(f.path_offset(f"{N}/owner@1"), "owner@01"), "unknown child"),
    ("order 10", lambda f: f.set_name(f.path_offset(f"{N}/order@18"), "order@10"), "page order 10"),
    ("grandchild", lambda f: f.add_subnode(f.path_offset(f"{N}/shard@0"), "x"), "no children"),
    ("shard moved", setprop(f"{N}/shard@1", "offset", _u64(2 * G)), "layout places"),
    ("shard mode", setprop(f"{N}/shard@0", "mode", b"pmem\0"), "'pmem'"),
    ("label shard outside", setprop(f"{N}/shard@2", "offset", _u64(8 * G - 2 * M)), "general area"),
    ("shard owner", setprop(f"{N}/shard@0", "owner", b"\t\0"), "non-printable"),
    ("shard name", setprop(f"{N}/shard@2", "shard-name", b"d\x7fb\0"), "not printable"),
    ("shard name long", setprop(f"{N}/shard@2", "shard-name", b"d" * 16 + b"\0"), "at most 15"),
    ("shard name taken", setprop(f"{N}/shard@2", "shard-name", b"shard1\0"), "twice"),
    ("missing property", lambda f: f.delprop(f.path_offset(f"{N}/shard@0"), "owner"), "no 'owner' property"),
    ("dtc's name", setprop(f"{N}/shard@0", "name", b"shard@0\0"), "unknown property 'name'"),
]


@pytest.mark.parametrize(("change", "says"), [(c, s) for _, c, s in HOSTILE], ids=[n for n, _, _ in HOSTILE])
def test_hostile_trees_are_refused(change: Callable[[libfdt.Fdt], None], says: str) -> None:
    refused(mutate(tree(sample()), change), says)


def test_bitmap_and_ranges_must_agree() -> None:
    blob = tree(sample())
    refused(_without_bit(blob, 9, 2560), "not preserved whole")  # client:123's page, unmarked
    refused(_without_bit(blob, 9, 0), "no owner's range or shard")  # shard0's page, unmarked
    refused(_with_bit(blob, 9, 4000), "no owner's range or shard")  # a page nobody owns, marked
    refused(_with_bit(blob, 18, 5), "no owner's range or shard")
    # vm:web1's [2G, 4G) marked at order 9 instead of 18: the bitmaps say which order it is
    moved = _without_bit(_without_bit(blob, 18, 2), 18, 3)
    bits = bitmap(moved, 9) | ((1 << 1024) - 1) << 1024
    m = parse(mutate(moved, setprop(f"{N}/order@9", "bitmap", bits.to_bytes(512, "little"))))
    assert m.extents[0] == replace(EXTENTS[0], order=9)
    # half of it marked at each order: no order holds the range whole
    half = bitmap(moved, 9) | ((1 << 512) - 1) << 1024
    blob = mutate(moved, setprop(f"{N}/order@9", "bitmap", half.to_bytes(512, "little")))
    refused(mutate(blob, setprop(f"{N}/order@18", "bitmap", _u64(0b1000))), "not preserved whole")


def test_byte_flips_give_only_luo_errors() -> None:
    blob = tree(sample())
    rng = random.Random(20250611)
    accepted = 0
    for _ in range(1500):
        bad = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        try:
            reader = FdtReader(bytes(bad))
            m = parse_pool_map(reader, reader.child(reader.root, POOL_MAP_NODE))
        except LuoError as e:
            assert e.errno == errno.EINVAL
            assert not re.search(r"\(\w+(Error|Exception):", e.message), e.message
            continue
        accepted += 1
        assert parse(tree(m)) == m  # whatever is accepted is a valid map
    assert accepted < 1500
