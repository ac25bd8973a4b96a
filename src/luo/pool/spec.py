"""The pool's command-line forms, and the layout they determine.

``--pool 8G:hugetlb --pool-shards 2G:devdax,4G:fsdax:1G --pool-labels end`` says everything
about where things live in the pool memfd, so the layout is a pure function of those three
values: a host that restarts with the same command line finds its shards where it left them, and
``Layout.describe()`` (the canonical spelling of the command line) is what the pool map keeps to
check that the next host was started with the same one.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from typing import Literal, cast

from luo.errors import LuoError
from luo.pool.extents import GIGA, GRANULE, fmt_bytes

Backing = Literal["hugetlb", "shmem"]
ShardMode = Literal["devdax", "fsdax"]
LabelMode = Literal["none", "end"]
BACKINGS: tuple[Backing, ...] = ("hugetlb", "shmem")
SHARD_MODES: tuple[ShardMode, ...] = ("devdax", "fsdax")
LABEL_MODES: tuple[LabelMode, ...] = ("none", "end")
SHARD_ALIGNS = (GRANULE, GIGA)

LABEL_AREA_SIZE = 128 << 10
# x86-64's physical address limit: no host has more memory to put in a pool.
POOL_SIZE_MAX = 1 << 52

_SIZE_RE = re.compile(r"([0-9]{1,20})([KMGTkmgt]?)")
_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def _bad(message: str) -> LuoError:
    return LuoError(errno.EINVAL, message)


def parse_size(text: str, what: str = "a size") -> int:
    """Bytes in ``512M``, ``8G``, ``1T`` (binary suffixes K/M/G/T; none: bytes)."""
    m = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise _bad(f"{what} {text!r} is not a size: write a number with an optional K, M, G or T, like 8G.")
    return int(m.group(1)) << _SHIFTS[m.group(2).upper()]


def _granular(size: int, text: str, what: str) -> int:
    if size <= 0 or size % GRANULE:
        raise _bad(
            f"{what} {text!r} is not a positive multiple of {fmt_bytes(GRANULE)} (the hugetlb page size)."
        )
    if size > POOL_SIZE_MAX:
        raise _bad(f"{what} {text!r} is larger than {fmt_bytes(POOL_SIZE_MAX)}, the most a host can address.")
    return size


def shard_name(index: int) -> str:
    """Shards are named by their place on the command line, so the names never need storing."""
    return f"shard{index}"


@dataclass(frozen=True)
class PoolSpec:
    size: int
    backing: Backing = "hugetlb"

    def describe(self) -> str:
        return f"{fmt_bytes(self.size)}:{self.backing}"


@dataclass(frozen=True)
class ShardSpec:
    size: int
    mode: ShardMode
    align: int = GRANULE

    def describe(self) -> str:
        base = f"{fmt_bytes(self.size)}:{self.mode}"
        return base if self.align == GRANULE else f"{base}:{fmt_bytes(self.align)}"


def parse_pool(text: str) -> PoolSpec:
    """``8G:hugetlb``, ``512M:shmem`` or ``512M`` (hugetlb)."""
    if not isinstance(text, str):
        raise _bad(f"the pool must be given as text like '8G:hugetlb', not {type(text).__name__}.")
    size_text, sep, backing = text.partition(":")
    if not sep:
        backing = "hugetlb"
    if backing not in BACKINGS:
        raise _bad(f"the pool {text!r} has backing {backing!r}; use one of {', '.join(BACKINGS)}.")
    size = _granular(parse_size(size_text, f"the pool size in {text!r}"), size_text, "the pool size")
    return PoolSpec(size, cast(Backing, backing))


def parse_shard(text: str) -> ShardSpec:
    """``2G:devdax``, ``4G:fsdax`` or ``2G:devdax:1G`` (1 GiB alignment; default 2 MiB)."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3):
        raise _bad(f"shard {text!r} is not SIZE:MODE or SIZE:MODE:ALIGN (like 2G:devdax or 2G:devdax:1G).")
    size_text, mode = parts[0], parts[1]
    if mode not in SHARD_MODES:
        raise _bad(f"shard {text!r} has mode {mode!r}; use one of {', '.join(SHARD_MODES)}.")
    size = _granular(
        parse_size(size_text, f"the size of shard {text!r}"), size_text, f"the size of shard {text!r}"
    )
    align = GRANULE
    if len(parts) == 3:
        align = parse_size(parts[2], f"the alignment of shard {text!r}")
        if align not in SHARD_ALIGNS:
            raise _bad(
                f"shard {text!r} asks for alignment {parts[2]!r}; a shard is aligned to 2M (default) or 1G."
            )
    if size % align:
        # device-dax refuses a device whose size is not a multiple of its alignment.
        raise _bad(f"shard {text!r} is not a multiple of its alignment {fmt_bytes(align)}.")
    return ShardSpec(size, cast(ShardMode, mode), align)


def parse_shards(text: str) -> tuple[ShardSpec, ...]:
    """``2G:devdax,2G:devdax,4G:fsdax`` in order (``shard0``, ``shard1``, ...); ``""`` or
    ``none``: no shards."""
    if not isinstance(text, str):
        raise _bad(f"the shards must be given as text like '2G:devdax,4G:fsdax', not {type(text).__name__}.")
    if text.strip() in ("", "none"):
        return ()
    return tuple(parse_shard(item) for item in text.split(","))


def parse_labels(text: str) -> LabelMode:
    if text not in LABEL_MODES:
        raise _bad(f"label mode {text!r} is not one of {', '.join(LABEL_MODES)}.")
    return cast(LabelMode, text)


def _align_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass(frozen=True)
class PlacedShard:
    name: str
    spec: ShardSpec
    offset: int

    @property
    def end(self) -> int:
        return self.offset + self.spec.size


@dataclass(frozen=True)
class Layout:
    """Where everything lives in a pool of ``pool.size`` bytes.

    Shards go first, in command-line order from offset 0, each at its alignment (a 1G-aligned
    shard after a 2M one leaves a gap that nothing uses: the general area is one run, after the
    last shard). With labels ``end`` the last 2 MiB granule is reserved: the label area is only
    its final ``LABEL_AREA_SIZE`` bytes, but a hugetlb pool is mapped and handed out in whole 2 MiB
    pages, so the rest of that page cannot go to anyone without sharing the page with the labels.
    The general area, where VMs, sessions and clients get extents, is what is left between the
    shards and the label granule. Shards made later in the label area (``luo.pool.labels``) are
    data on the pool, not layout: they are carved from the general area.
    """

    pool: PoolSpec
    shards: tuple[ShardSpec, ...] = ()
    labels: LabelMode = "none"
    placed: tuple[PlacedShard, ...] = field(init=False)
    general_start: int = field(init=False)
    general_length: int = field(init=False)
    label_granule: tuple[int, int] | None = field(init=False)  # (offset, length) reserved

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))
        if not isinstance(self.pool, PoolSpec) or not all(isinstance(s, ShardSpec) for s in self.shards):
            raise _bad("a layout is built from a PoolSpec and ShardSpecs.")
        parse_labels(self.labels)
        usable = self.pool.size - (GRANULE if self.labels == "end" else 0)
        placed: list[PlacedShard] = []
        pos = 0
        for i, s in enumerate(self.shards):
            offset = _align_up(pos, s.align)
            placed.append(PlacedShard(shard_name(i), s, offset))
            pos = offset + s.size
        if pos > usable:
            room = "" if self.labels == "none" else f" (less the {fmt_bytes(GRANULE)} label granule)"
            raise _bad(
                f"the shards {self.describe_shards()} need {fmt_bytes(pos)} with their alignment, but the "
                f"pool is {fmt_bytes(self.pool.size)}{room}: {fmt_bytes(pos - usable)} too many."
            )
        object.__setattr__(self, "placed", tuple(placed))
        object.__setattr__(self, "general_start", pos)
        object.__setattr__(self, "general_length", usable - pos)
        granule = (usable, GRANULE) if self.labels == "end" else None
        object.__setattr__(self, "label_granule", granule)

    @property
    def label_area(self) -> tuple[int, int] | None:
        """(offset, length) of the label area: the last LABEL_AREA_SIZE bytes, with labels only."""
        if self.labels == "none":
            return None
        return self.pool.size - LABEL_AREA_SIZE, LABEL_AREA_SIZE

    @property
    def general(self) -> tuple[int, int]:
        return self.general_start, self.general_length

    def gaps(self) -> list[tuple[int, int]]:
        """(offset, length) of what alignment leaves unused between shards."""
        out: list[tuple[int, int]] = []
        pos = 0
        for p in self.placed:
            if p.offset > pos:
                out.append((pos, p.offset - pos))
            pos = p.end
        return out

    def describe_shards(self) -> str:
        return ",".join(s.describe() for s in self.shards) or "none"

    def describe(self) -> str:
        """The canonical command line: ``8G:hugetlb shards=2G:devdax,4G:fsdax labels=none``."""
        return f"{self.pool.describe()} shards={self.describe_shards()} labels={self.labels}"


def make_layout(pool: str, shards: str = "", labels: str = "none") -> Layout:
    """The layout of a command line's three values."""
    return Layout(parse_pool(pool), parse_shards(shards), parse_labels(labels))


_DESCRIBED_RE = re.compile(r"(\S+) shards=(\S+) labels=(\S+)")


def parse_layout(text: str) -> Layout:
    """The layout ``describe()`` spelled as ``text``; EINVAL if ``text`` is not such a spelling
    (the canonical one only: a map holds what a host wrote, never a hand-typed variant)."""
    m = _DESCRIBED_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise _bad(f"{text!r} is not a pool layout like '8G:hugetlb shards=2G:devdax labels=none'.")
    layout = make_layout(m.group(1), m.group(2), m.group(3))
    if layout.describe() != text:
        raise _bad(f"pool layout {text!r} is not in canonical form ({layout.describe()!r}).")
    return layout


def check_same(preserved: Layout, asked: Layout) -> None:
    """Refuse (EINVAL) a host whose command line describes another layout than the preserved pool.

    A pool without labels keeps no description of itself in its memory: its layout *is* the
    command line, so a different one would hand one VM's memory to a shard or to another owner.
    """
    if preserved.describe() != asked.describe():
        raise _bad(
            f"the preserved pool is laid out as '{preserved.describe()}' but this host was started with "
            f"'{asked.describe()}'; it refuses the pool before touching anything. Start it with the "
            "preserved layout, or discard the pool."
        )
