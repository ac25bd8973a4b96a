"""The end-label area: the pool describing its own shards, in its last 128 KiB.

With ``--pool-labels end`` shards can be made and deleted at run time, so unlike the command-line
shards they cannot be recomputed from the command line: the pool carries their description, as an
NVDIMM carries its namespace labels. The area is two copies of the same record, 64 KiB each::

    copy:  magic "LUOLABEL" | u32 format | u32 count | u64 generation     (24 bytes)
           count x { name[16] (NUL padded) | u32 mode | u32 0 | u64 offset | u64 size }
           u32 crc32 of everything above | zeros to 64 KiB

little-endian, as every integer luo writes. A writer writes the primary copy (first half) whole
and flushes it, then the backup (second half): a write torn by a crash damages at most one copy,
whose magic or crc then fails, and ``decode_labels`` takes the valid copy with the higher
generation. A copy whose crc is right but whose content is not (overlapping shards, an unknown
mode) was not torn but written wrong, and is refused outright rather than quietly replaced by the
older copy; so is a format this version does not know, written by a newer luo.
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from luo.abi import POOL_LABEL_FORMAT, POOL_LABEL_MAGIC
from luo.errors import LuoError
from luo.pool.extents import GRANULE, fmt_bytes, is_int
from luo.pool.spec import LABEL_AREA_SIZE, SHARD_MODES, ShardMode, shard_name

LABEL_MAGIC = POOL_LABEL_MAGIC

COPY_SIZE = LABEL_AREA_SIZE // 2
PRIMARY_OFFSET = 0
BACKUP_OFFSET = COPY_SIZE
NAME_MAX = 15  # bytes: the name field is 16 with its NUL
_HEADER = struct.Struct("<8sIIQ")
_ENTRY = struct.Struct("<16sIIQQ")
_CRC = struct.Struct("<I")
LABELS_MAX = (COPY_SIZE - _HEADER.size - _CRC.size) // _ENTRY.size
_MODE_CODES: dict[str, int] = {"devdax": 1, "fsdax": 2}
_MODES_BY_CODE = {v: k for k, v in _MODE_CODES.items()}
_U64_MAX = (1 << 64) - 1


def _bad(message: str) -> LuoError:
    return LuoError(errno.EINVAL, message)


@dataclass(frozen=True)
class ShardLabel:
    name: str
    mode: ShardMode
    offset: int  # in the pool
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def check_name(name: object) -> bytes:
    """A shard name's bytes, if it is one: printable, as it is shown by ``luo status`` and dtc."""
    if not isinstance(name, str) or not name or not name.isprintable():
        raise _bad(f"shard name {name!r} is not printable text of 1 to {NAME_MAX} bytes.")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"shard name {name!r} is not valid UTF-8 text.") from e
    if len(raw) > NAME_MAX:
        raise _bad(f"shard name {name!r} is {len(raw)} bytes long; at most {NAME_MAX} fit in a label.")
    return raw


def check_labels(labels: Sequence[ShardLabel], area: tuple[int, int] | None = None) -> None:
    """EINVAL naming the first label that is malformed, repeats a name or overlaps another,
    or (with ``area``, (offset, length)) lies outside the area shards may be made in."""
    if len(labels) > LABELS_MAX:
        raise _bad(f"{len(labels)} shard labels do not fit in the label area; at most {LABELS_MAX} do.")
    names: set[str] = set()
    for s in labels:
        if not isinstance(s, ShardLabel):
            raise _bad(f"a shard label must be a ShardLabel, not {type(s).__name__}.")
        check_name(s.name)
        if s.name in names:
            raise _bad(f"shard name {s.name!r} is used twice.")
        names.add(s.name)
        if s.mode not in SHARD_MODES:
            raise _bad(f"shard {s.name!r} has mode {s.mode!r}; a shard is one of {', '.join(SHARD_MODES)}.")
        if not is_int(s.offset) or not is_int(s.size) or s.offset < 0 or s.size <= 0 or s.end > _U64_MAX:
            raise _bad(
                f"shard {s.name!r} has offset {s.offset!r} and size {s.size!r}: not a range of the pool."
            )
        if s.offset % GRANULE or s.size % GRANULE:
            raise _bad(
                f"shard {s.name!r} at {s.offset:#x} ({s.size:#x} bytes) is not aligned to "
                f"{fmt_bytes(GRANULE)}."
            )
        if area is not None and (s.offset < area[0] or s.end > area[0] + area[1]):
            raise _bad(
                f"shard {s.name!r} at {s.offset:#x}..{s.end:#x} lies outside the pool's general area "
                f"{area[0]:#x}..{area[0] + area[1]:#x}."
            )
    ordered = sorted(labels, key=lambda s: s.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.offset < a.end:
            raise _bad(
                f"shards {a.name!r} ({a.offset:#x}..{a.end:#x}) and {b.name!r} "
                f"({b.offset:#x}..{b.end:#x}) overlap."
            )


def _encode_copy(labels: Sequence[ShardLabel], generation: int) -> bytes:
    body = bytearray(_HEADER.pack(LABEL_MAGIC, POOL_LABEL_FORMAT, len(labels), generation))
    for s in labels:
        body += _ENTRY.pack(check_name(s.name), _MODE_CODES[s.mode], 0, s.offset, s.size)
    body += _CRC.pack(zlib.crc32(body))
    return bytes(body) + bytes(COPY_SIZE - len(body))


def encode_labels(shards: Sequence[ShardLabel], generation: int) -> bytes:
    """The whole label area (LABEL_AREA_SIZE bytes): both copies, at ``generation``.

    Write ``[PRIMARY_OFFSET:COPY_SIZE]`` and flush it before the backup copy (module docstring).
    The generation must grow with every write (0 means "no labels"), so the reader can tell the
    newer copy from the older.
    """
    if not is_int(generation) or not 1 <= generation <= _U64_MAX:
        raise _bad(f"label generation {generation!r} is not an integer in 1..2^64-1 (0 means no labels).")
    check_labels(shards)
    copy = _encode_copy(shards, generation)
    return copy + copy


def _decode_copy(raw: bytes, which: str) -> tuple[int, list[ShardLabel]] | str | None:
    """A copy's (generation, labels); None if it is blank; a reason if it is damaged (torn).
    Raises EINVAL for a copy that is intact but wrong: a newer format, or bad content."""
    if not any(raw):
        return None
    magic, version, count, generation = _HEADER.unpack_from(raw)
    if magic != LABEL_MAGIC:
        return f"bad magic {magic!r}"
    if version != POOL_LABEL_FORMAT:
        raise _bad(
            f"the {which} copy of the pool's labels is format {version}; this version reads only format "
            f"{POOL_LABEL_FORMAT}. Use the luo that wrote them."
        )
    if count > LABELS_MAX:
        return f"a count of {count} labels (at most {LABELS_MAX} fit)"
    end = _HEADER.size + count * _ENTRY.size
    (crc,) = _CRC.unpack_from(raw, end)
    if crc != zlib.crc32(raw[:end]):
        return f"a bad checksum ({crc:#010x}, the content sums to {zlib.crc32(raw[:end]):#010x})"
    labels: list[ShardLabel] = []
    for i in range(count):
        name_raw, code, reserved, offset, size = _ENTRY.unpack_from(raw, _HEADER.size + i * _ENTRY.size)
        name_bytes, _, pad = name_raw.partition(b"\0")
        where = f"label {i} of the {which} copy"
        if any(pad) or reserved:
            raise _bad(f"{where} has non-zero padding; it was not written by this format.")
        if code not in _MODES_BY_CODE:
            raise _bad(f"{where} has an unknown shard mode {code}.")
        try:
            name = name_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(f"{where} has a name that is not UTF-8 ({name_bytes!r}).") from e
        labels.append(ShardLabel(name, _MODES_BY_CODE[code], offset, size))  # type: ignore[arg-type]
    try:
        check_labels(labels)
    except LuoError as e:
        raise _bad(f"the {which} copy of the pool's labels is intact but invalid: {e.message}") from e
    if generation == 0:
        raise _bad(f"the {which} copy of the pool's labels has generation 0, which no writer uses.")
    return generation, labels


def decode_labels(
    data: bytes | bytearray | memoryview, area: tuple[int, int] | None = None
) -> tuple[int, list[ShardLabel]]:
    """(generation, labels) of a label area; (0, []) if it was never written.

    The valid copy with the higher generation wins, so a torn write falls back to the other one.
    ``area`` (offset, length): the general area, which every shard must lie in. EINVAL with the
    reason if no copy is valid, or if the copies disagree at the same generation.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _bad(f"the label area must be bytes, not {type(data).__name__}.")
    raw = bytes(data)
    if len(raw) != LABEL_AREA_SIZE:
        raise _bad(f"the label area is {len(raw)} bytes; it is {LABEL_AREA_SIZE}.")
    if not any(raw):
        return 0, []
    copies = {
        "primary": _decode_copy(raw[PRIMARY_OFFSET : PRIMARY_OFFSET + COPY_SIZE], "primary"),
        "backup": _decode_copy(raw[BACKUP_OFFSET : BACKUP_OFFSET + COPY_SIZE], "backup"),
    }
    valid = [c for c in copies.values() if isinstance(c, tuple)]
    if not valid:
        why = "; ".join(f"{k}: {'blank' if v is None else v}" for k, v in copies.items())
        raise _bad(
            f"neither copy of the pool's label area is valid ({why}); its shards cannot be found. "
            "Recreate them, or discard the pool."
        )
    if len(valid) == 2 and valid[0][0] == valid[1][0] and valid[0][1] != valid[1][1]:
        raise _bad(
            f"the two copies of the pool's labels differ at the same generation {valid[0][0]}; "
            "no writer does that, so neither is trusted."
        )
    generation, labels = max(valid, key=lambda c: c[0])
    if area is not None:
        check_labels(labels, area)
    return generation, labels


def _align_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def create_shard(
    labels: Sequence[ShardLabel],
    size: int,
    mode: ShardMode,
    area: tuple[int, int],
    *,
    name: str | None = None,
    busy: Iterable[tuple[int, int]] = (),
) -> list[ShardLabel]:
    """``labels`` plus a new shard of ``size`` bytes: the first 2 MiB-aligned run of the general
    ``area`` (offset, length) free of other shards and of ``busy`` ranges (offset, length; what
    the allocator has handed out). Named ``name``, or the first free ``shardN``. ENOSPC if no run
    is long enough."""
    check_labels(labels, area)
    if mode not in SHARD_MODES:
        raise _bad(f"shard mode {mode!r} is not one of {', '.join(SHARD_MODES)}.")
    if not is_int(size) or size <= 0 or size % GRANULE:
        raise _bad(f"a shard of {size!r} bytes is not a positive multiple of {fmt_bytes(GRANULE)}.")
    taken = {s.name for s in labels}
    if name is None:
        name = next(shard_name(i) for i in range(len(labels) + 1) if shard_name(i) not in taken)
    check_name(name)
    if name in taken:
        raise LuoError(errno.EEXIST, f"a shard named {name!r} exists already.")
    if len(labels) >= LABELS_MAX:
        raise LuoError(errno.ENOSPC, f"the label area holds {LABELS_MAX} shards already; delete one first.")
    start, end = area[0], area[0] + area[1]
    occupied = sorted([(s.offset, s.end) for s in labels] + [(o, o + n) for o, n in busy])
    pos, largest = _align_up(start, GRANULE), 0
    for o, e in [*occupied, (end, end)]:
        if min(o, end) - pos >= size:
            new = ShardLabel(name, mode, pos, size)
            return [*labels, new]
        largest = max(largest, min(o, end) - pos)
        pos = max(pos, _align_up(e, GRANULE))
    raise LuoError(
        errno.ENOSPC,
        f"no free run of {fmt_bytes(size)} is left in the pool's general area for a new shard; "
        f"the largest is {fmt_bytes(largest)}.",
    )


def delete_shard(labels: Sequence[ShardLabel], name: str, *, claimed: bool = False) -> list[ShardLabel]:
    """``labels`` without shard ``name``: ENOENT if there is none, EBUSY if it is claimed (an owner
    still uses it; the caller knows, the labels do not)."""
    if not any(s.name == name for s in labels):
        raise LuoError(errno.ENOENT, f"the pool has no shard named {name!r}.")
    if claimed:
        raise LuoError(errno.EBUSY, f"shard {name!r} is in use; release it before deleting it.")
    return [s for s in labels if s.name != name]
