"""The end-label area: two checksummed copies, the newest valid one wins."""

from __future__ import annotations

import errno
import struct
import zlib

import pytest

from luo.errors import LuoError
from luo.pool.labels import (
    BACKUP_OFFSET,
    COPY_SIZE,
    LABEL_MAGIC,
    LABELS_MAX,
    ShardLabel,
    create_shard,
    decode_labels,
    delete_shard,
    encode_labels,
)
from luo.pool.spec import LABEL_AREA_SIZE

M, G = 1 << 20, 1 << 30
AREA = (2 * G, 6 * G - 2 * M)  # the general area of an 8G pool with labels
TWO = [ShardLabel("shard0", "devdax", 2 * G, G), ShardLabel("db", "fsdax", 4 * G, 512 * M)]


def _err(err: int, call: object, *args: object, **kw: object) -> LuoError:
    with pytest.raises(LuoError) as info:
        call(*args, **kw)  # type: ignore[operator]
    assert info.value.errno == err, info.value
    return info.value


def test_round_trip_and_format() -> None:
    area = encode_labels(TWO, 5)
    assert len(area) == LABEL_AREA_SIZE == 128 << 10
    assert area[:8] == LABEL_MAGIC == b"LUOLABEL"
    assert area[:COPY_SIZE] == area[BACKUP_OFFSET:]  # two copies
    assert struct.unpack_from("<IIQ", area, 8) == (1, 2, 5)  # format, count, generation
    assert decode_labels(area) == (5, TWO)
    assert decode_labels(area, AREA) == (5, TWO)
    assert decode_labels(encode_labels([], 1)) == (1, [])


def test_a_blank_area_has_no_labels() -> None:
    assert decode_labels(bytes(LABEL_AREA_SIZE)) == (0, [])
    _err(errno.EINVAL, decode_labels, bytes(LABEL_AREA_SIZE - 1))


def test_a_torn_primary_falls_back_to_the_backup() -> None:
    old, new = encode_labels(TWO[:1], 6), encode_labels(TWO, 7)
    torn = bytearray(old)
    torn[: COPY_SIZE // 2] = new[: COPY_SIZE // 2]  # the new primary being written, backup still old
    torn[100] ^= 0xFF  # and one of its sectors never made it
    assert decode_labels(bytes(torn)) == (6, TWO[:1])
    # the primary written whole, the backup torn: the newer primary wins
    torn = bytearray(new[:COPY_SIZE] + old[COPY_SIZE:])
    torn[BACKUP_OFFSET + 30] ^= 0x01
    assert decode_labels(bytes(torn)) == (7, TWO)
    # both whole but of different generations: the higher one
    assert decode_labels(new[:COPY_SIZE] + old[COPY_SIZE:]) == (7, TWO)
    assert decode_labels(old[:COPY_SIZE] + new[COPY_SIZE:]) == (7, TWO)
    # a blank primary (never reached) and a good backup
    assert decode_labels(bytes(COPY_SIZE) + new[COPY_SIZE:]) == (7, TWO)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda a: a.__setitem__(slice(0, 8), b"NOTLABEL"), "bad magic"),
        (lambda a: a.__setitem__(40, a[40] ^ 0x10), "bad checksum"),
        (lambda a: struct.pack_into("<I", a, 12, 1 << 20), "count of"),
    ],
)
def test_damage_in_both_copies_is_refused(damage: object, says: str) -> None:
    area = bytearray(encode_labels(TWO, 3))
    for base in (0, BACKUP_OFFSET):
        copy = bytearray(area[base : base + COPY_SIZE])
        damage(copy)  # type: ignore[operator]
        area[base : base + COPY_SIZE] = copy
    e = _err(errno.EINVAL, decode_labels, bytes(area))
    assert (
        "neither copy" in e.message and says in e.message and "primary" in e.message and "backup" in e.message
    )


def _resealed(labels_raw: bytes, version: int = 1, generation: int = 3, count: int | None = None) -> bytes:
    """A copy with a correct checksum around ``labels_raw`` entries: written, not torn."""
    n = len(labels_raw) // 40 if count is None else count
    body = struct.pack("<8sIIQ", LABEL_MAGIC, version, n, generation) + labels_raw
    body += struct.pack("<I", zlib.crc32(body))
    copy = body + bytes(COPY_SIZE - len(body))
    return copy + copy


def _entry(name: bytes, mode: int, offset: int, size: int, reserved: int = 0) -> bytes:
    return struct.pack("<16sIIQQ", name, mode, reserved, offset, size)


def test_resealed_helper_matches_the_encoder() -> None:
    raw = _entry(b"shard0", 1, 2 * G, G) + _entry(b"db", 2, 4 * G, 512 * M)
    assert _resealed(raw) == encode_labels(TWO, 3)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (_entry(b"a", 1, 0, 4 * M) + _entry(b"b", 1, 2 * M, 4 * M), "overlap"),
        (_entry(b"a", 1, 0, 4 * M) + _entry(b"a", 2, 8 * M, 4 * M), "twice"),
        (_entry(b"a", 3, 0, 4 * M), "unknown shard mode"),
        (_entry(b"a", 1, M, 4 * M), "aligned"),
        (_entry(b"a", 1, 0, 0), "not a range"),
        (_entry(b"a\0x", 1, 0, 4 * M), "padding"),
        (_entry(b"a", 1, 0, 4 * M, reserved=1), "padding"),
        (_entry(b"", 1, 0, 4 * M), "shard name"),
        (_entry(b"\xff", 1, 0, 4 * M), "not UTF-8"),
        (_entry(b"a", 1, (1 << 64) - 2 * M, 4 * M), "not a range"),
    ],
)
def test_an_intact_copy_with_bad_content_is_refused_not_skipped(raw: bytes, says: str) -> None:
    area = _resealed(raw)
    e = _err(errno.EINVAL, decode_labels, area)
    assert says in e.message
    # even with a valid older backup: a copy written wrong is not a torn write
    mixed = area[:COPY_SIZE] + encode_labels(TWO, 1)[COPY_SIZE:]
    _err(errno.EINVAL, decode_labels, mixed)


def test_a_newer_format_is_refused_not_skipped() -> None:
    area = _resealed(b"", version=2)[:COPY_SIZE] + encode_labels(TWO, 1)[COPY_SIZE:]
    e = _err(errno.EINVAL, decode_labels, area)
    assert "format 2" in e.message


def test_copies_that_disagree_at_one_generation_are_refused() -> None:
    area = encode_labels(TWO, 4)[:COPY_SIZE] + encode_labels(TWO[:1], 4)[COPY_SIZE:]
    assert "same generation" in _err(errno.EINVAL, decode_labels, area).message
    assert "generation 0" in _err(errno.EINVAL, decode_labels, _resealed(b"", generation=0)).message


def test_labels_outside_the_area_are_refused() -> None:
    area = encode_labels([ShardLabel("a", "devdax", 0, 2 * M)], 1)
    assert "outside" in _err(errno.EINVAL, decode_labels, area, AREA).message


@pytest.mark.parametrize(
    "labels",
    [
        [ShardLabel("x" * 16, "devdax", 0, 2 * M)],
        [ShardLabel("a\n", "devdax", 0, 2 * M)],
        [ShardLabel("a", "pmem", 0, 2 * M)],  # type: ignore[arg-type]
        [ShardLabel("a", "devdax", 0, 2 * M), ShardLabel("b", "devdax", 0, 2 * M)],
        [ShardLabel(f"s{i}", "devdax", 2 * M * i, 2 * M) for i in range(LABELS_MAX + 1)],
    ],
)
def test_encode_refuses_what_decode_would(labels: list[ShardLabel]) -> None:
    _err(errno.EINVAL, encode_labels, labels, 1)


def test_encode_refuses_generation_zero() -> None:
    _err(errno.EINVAL, encode_labels, TWO, 0)
    _err(errno.EINVAL, encode_labels, TWO, 1 << 64)


def test_the_most_labels_fit() -> None:
    many = [ShardLabel(f"s{i}", "devdax", 2 * M * i, 2 * M) for i in range(LABELS_MAX)]
    assert decode_labels(encode_labels(many, 9)) == (9, many)


def test_create_shard_first_fit() -> None:
    labels = create_shard([], G, "devdax", AREA)
    assert labels == [ShardLabel("shard0", "devdax", 2 * G, G)]
    labels = create_shard(labels, 4 * M, "fsdax", AREA, busy=[(3 * G, 2 * M)])  # the allocator's
    assert labels[-1] == ShardLabel("shard1", "fsdax", 3 * G + 2 * M, 4 * M)
    labels = delete_shard(labels, "shard0")
    labels = create_shard(labels, 2 * M, "devdax", AREA)  # the first hole again, first free name
    assert labels[-1] == ShardLabel("shard0", "devdax", 2 * G, 2 * M)
    labels = create_shard(labels, 2 * M, "devdax", AREA, name="db")
    assert labels[-1] == ShardLabel("db", "devdax", 2 * G + 2 * M, 2 * M)
    assert decode_labels(encode_labels(labels, 2), AREA) == (2, labels)


def test_create_shard_aligns_in_an_unaligned_area() -> None:
    labels = create_shard([], 2 * M, "devdax", (G + 2 * M, 6 * M), busy=[(G + 2 * M, M)])
    assert labels == [ShardLabel("shard0", "devdax", G + 4 * M, 2 * M)]


def test_create_shard_refusals() -> None:
    e = _err(errno.ENOSPC, create_shard, TWO, 6 * G, "devdax", AREA)
    assert "largest is" in e.message
    _err(errno.EINVAL, create_shard, TWO, 3 * M, "devdax", AREA)
    _err(errno.EINVAL, create_shard, TWO, 2 * M, "pmem", AREA)
    _err(errno.EEXIST, create_shard, TWO, 2 * M, "devdax", AREA, name="db")
    _err(errno.EINVAL, create_shard, TWO, 2 * M, "devdax", AREA, name="x" * 16)
    _err(errno.EINVAL, create_shard, TWO, 2 * M, "devdax", (0, G))  # TWO lie outside that area


def test_delete_shard() -> None:
    assert delete_shard(TWO, "db") == TWO[:1]
    _err(errno.ENOENT, delete_shard, TWO, "nope")
    assert "in use" in _err(errno.EBUSY, delete_shard, TWO, "db", claimed=True).message
