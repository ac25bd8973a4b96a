"""The pool's allocator: who owns which extent of the general area, kept in memory only.

Everything here is bookkeeping over offsets into the pool memfd; the one side effect is the
``scrub(offset, length)`` callback, which the caller implements (punch a hole, or zero the pages).
The allocator calls it on a *dirty* range (freed by one owner, or of unknown content after an
update) before handing any of it to another owner, and never on a range it knows to be clean:
no byte ever crosses from one owner to the next, and a fresh pool is not written twice.

An update turns the live extents into the pool map (``preserve_all``); the next host rebuilds
the allocator from it (``from_preserved``), and each owner claims its extents back exactly once,
as the kernel restores a preserved folio exactly once. LUO's finish discards whatever was not
retrieved, and so does ``finish`` here: unclaimed extents become dirty.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from luo.errors import LuoError

PAGE_SHIFT = 12  # 4 KiB pages: orders count in them, as the kernel's do
GRANULE_ORDER = 9
GIGA_ORDER = 18
GRANULE = 1 << (PAGE_SHIFT + GRANULE_ORDER)  # 2 MiB: a hugetlb page, the pool's smallest unit
GIGA = 1 << (PAGE_SHIFT + GIGA_ORDER)  # 1 GiB
ORDERS = (GRANULE_ORDER, GIGA_ORDER)
OWNER_MAX = 64  # bytes of UTF-8

ExtentState = Literal["free", "dirty", "allocated", "preserved", "claimed"]
# An extent in one of these states belongs to an owner and is never cut or merged.
LIVE_STATES: frozenset[str] = frozenset({"allocated", "preserved", "claimed"})
Scrub = Callable[[int, int], None]


def _bad(message: str) -> LuoError:
    return LuoError(errno.EINVAL, message)


def fmt_bytes(n: int) -> str:
    """``n`` in the largest binary unit that divides it exactly: ``2G``, ``6M``, ``4097``."""
    for shift, suffix in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def order_size(order: int) -> int:
    """Bytes in one unit of ``order``; only the orders a 2 MiB-hugetlb pool can keep exist."""
    if order not in ORDERS:
        raise _bad(f"page order {order!r} is not one the pool uses ({', '.join(map(str, ORDERS))}).")
    return 1 << (PAGE_SHIFT + order)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_owner(owner: object) -> str:
    """``owner`` if it is a valid owner name (``vm:web1``, ``session:x``), else EINVAL.

    Names go into the pool map and ``luo status``: printable, so no log or dts line is ever
    broken by one, and bounded, so a hostile map cannot make them grow without limit.
    """
    if not isinstance(owner, str):
        raise _bad(f"an owner name must be a string, not {type(owner).__name__}.")
    if not owner:
        raise _bad("an owner name is empty; use a name like 'vm:web1'.")
    if "\0" in owner or not owner.isprintable():
        raise _bad(f"owner name {owner!r} contains a NUL or a non-printable character.")
    try:
        size = len(owner.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise _bad(f"owner name {owner!r} is not valid UTF-8 text.") from e
    if size > OWNER_MAX:
        raise _bad(f"owner name {owner!r} is {size} bytes long; at most {OWNER_MAX} are allowed.")
    return owner


@dataclass(frozen=True)
class Extent:
    """A run of the pool: ``[offset, offset + length)``, pool offsets in bytes.

    ``order`` is the page order it was allocated at (its offset and length are multiples of
    ``order_size(order)``); free and dirty runs have the granule's order and no owner.
    """

    offset: int
    length: int
    order: int = GRANULE_ORDER
    owner: str = ""
    state: ExtentState = "free"

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass(frozen=True)
class PoolStats:
    """What ``luo status`` shows of the general area; ``free`` counts dirty bytes too (they are
    reusable after a scrub), ``largest_free`` says how fragmented it is."""

    total: int
    free: int
    allocated: dict[str, int]  # per owner: allocated, claimed and still-preserved bytes
    largest_free: int
    dirty_extents: int
    dirty_bytes: int
    preserved: int  # bytes that came through an update and are not yet claimed


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _round_down(n: int, unit: int) -> int:
    return n // unit * unit


def _check_area(area_start: int, area_length: int) -> None:
    if not is_int(area_start) or not is_int(area_length) or area_start < 0 or area_length < 0:
        raise _bad(f"the general area ({area_start!r}, {area_length!r}) is not two non-negative integers.")
    if area_start % GRANULE or area_length % GRANULE:
        raise _bad(
            f"the general area at {area_start:#x}, {area_length:#x} bytes long, is not aligned to the "
            f"{fmt_bytes(GRANULE)} granule."
        )


def _check_preserved(e: object) -> Extent:
    if not isinstance(e, Extent):
        raise _bad(f"a preserved extent must be an Extent, not {type(e).__name__}.")
    if e.state != "preserved":
        raise _bad(f"an extent in state {e.state!r} came through an update; only preserved ones can.")
    validate_owner(e.owner)
    unit = order_size(e.order)
    if not is_int(e.offset) or not is_int(e.length) or e.offset < 0 or e.length <= 0:
        raise _bad(
            f"the preserved extent of {e.owner} ({e.offset!r}, {e.length!r}) has no offset and positive "
            "length."
        )
    if e.offset % unit or e.length % unit:
        raise _bad(
            f"the preserved extent of {e.owner} at {e.offset:#x} ({e.length:#x} bytes) is not aligned to its "
            f"order {e.order} ({fmt_bytes(unit)})."
        )
    return e


def _best_fit(chunks: list[tuple[int, int]], need: int) -> int | None:
    """Start of the smallest chunk (lowest first among equals) that holds ``need`` bytes."""
    fitting = [c for c in chunks if c[1] >= need]
    return min(fitting, key=lambda c: (c[1], c[0]))[0] if fitting else None


def _plan(
    clean: list[tuple[int, int]], holes: list[tuple[int, int]], need: int
) -> list[tuple[int, int]] | None:
    """Where ``need`` bytes go: one clean run if any holds them (nothing to scrub), else one run
    of free and dirty bytes, else the largest runs whole until the rest fits one (again the
    smallest that does). Best fit throughout, so big holes stay whole. None if nothing fits."""
    for chunks in (clean, holes):
        start = _best_fit(chunks, need)
        if start is not None:
            return [(start, need)]
    if sum(length for _, length in holes) < need:
        return None
    unused = sorted(holes, key=lambda c: (-c[1], c[0]))
    pieces: list[tuple[int, int]] = []
    remaining = need
    while remaining:
        start = _best_fit(unused, remaining)
        if start is not None:
            pieces.append((start, remaining))
            break
        start, length = unused.pop(0)
        pieces.append((start, length))
        remaining -= length
    return pieces


class Allocator:
    """Extents of the general area ``[area_start, area_start + area_length)``.

    The area is always covered exactly by a sorted list of extents; neighbouring free runs are
    merged, and so are neighbouring dirty ones, so ``largest_free`` and the plan see whole holes.
    """

    def __init__(self, area_start: int, area_length: int, scrub: Scrub) -> None:
        _check_area(area_start, area_length)
        self.area_start = area_start
        self.area_length = area_length
        self._scrub = scrub
        self._extents: list[Extent] = [Extent(area_start, area_length)] if area_length else []

    @classmethod
    def from_preserved(
        cls, area_start: int, area_length: int, extents: Iterable[Extent], scrub: Scrub
    ) -> Allocator:
        """The allocator a new host starts with: ``extents`` (all ``preserved``) wait to be
        claimed, and every other byte is dirty, since nobody can say what an old host left there."""
        a = cls(area_start, area_length, scrub)
        end = area_start + area_length
        out: list[Extent] = []
        pos = area_start
        for e in sorted((_check_preserved(e) for e in extents), key=lambda e: e.offset):
            where = f"the preserved extent of {e.owner} at {e.offset:#x} ({fmt_bytes(e.length)})"
            if e.offset < area_start or e.end > end:
                raise _bad(f"{where} lies outside the general area ({area_start:#x}..{end:#x}).")
            if e.offset < pos:
                raise _bad(f"{where} overlaps the extent before it.")
            if e.offset > pos:
                out.append(Extent(pos, e.offset - pos, state="dirty"))
            out.append(e)
            pos = e.end
        if pos < end:
            out.append(Extent(pos, end - pos, state="dirty"))
        a._extents = out
        a._normalize()
        return a

    # -- queries ----------------------------------------------------------------------------

    def regions(self) -> tuple[Extent, ...]:
        """Every extent, free and dirty ones included, in offset order: they cover the area."""
        return tuple(self._extents)

    def owners(self) -> list[str]:
        return sorted({e.owner for e in self._extents if e.live})

    def extents_of(self, owner: str) -> list[Extent]:
        validate_owner(owner)
        return [e for e in self._extents if e.live and e.owner == owner]

    def stats(self) -> PoolStats:
        allocated: dict[str, int] = {}
        for e in self._extents:
            if e.live:
                allocated[e.owner] = allocated.get(e.owner, 0) + e.length
        dirty = [e for e in self._extents if e.state == "dirty"]
        return PoolStats(
            total=self.area_length,
            free=sum(e.length for e in self._extents if not e.live),
            allocated=dict(sorted(allocated.items())),
            largest_free=max((end - start for start, end in self._holes()), default=0),
            dirty_extents=len(dirty),
            dirty_bytes=sum(e.length for e in dirty),
            preserved=sum(e.length for e in self._extents if e.state == "preserved"),
        )

    # -- allocation -------------------------------------------------------------------------

    def alloc(self, owner: str, size: int, order: int = GRANULE_ORDER) -> list[Extent]:
        """``size`` bytes (rounded up to the order's unit) for ``owner``: one run if any hole
        holds it (``_plan`` says which), else several, largest first. Dirty bytes among them are
        scrubbed first. ENOMEM, and nothing changed, if the area cannot hold it."""
        validate_owner(owner)
        unit = order_size(order)
        if not is_int(size) or size <= 0:
            raise _bad(f"{owner} asks for {size!r} bytes; the size must be a positive integer.")
        need = _round_up(size, unit)
        chunks = self._chunks(unit)
        pieces = _plan(self._chunks(unit, clean=True), chunks, need)
        if pieces is None:
            s = self.stats()
            usable = (
                ""
                if unit == GRANULE
                else f", {fmt_bytes(sum(n for _, n in chunks))} of it in {fmt_bytes(unit)}-aligned pieces"
            )
            raise LuoError(
                errno.ENOMEM,
                f"{owner} asks for {fmt_bytes(need)} at order {order} but the pool's general area has "
                f"{fmt_bytes(s.free)} free{usable}; the largest free extent is {fmt_bytes(s.largest_free)}. "
                "Free an owner's extents or ask for less.",
            )
        for start, length in pieces:
            self._clean(start, start + length)
        out = [Extent(start, length, order, owner, "allocated") for start, length in pieces]
        for e in out:
            self._replace(e.offset, e.end, [e])
        self._normalize()
        return out

    def free(self, owner: str) -> list[Extent]:
        """Every extent of ``owner`` becomes dirty; returns them as they were (none: [])."""
        validate_owner(owner)
        freed = [e for e in self._extents if e.live and e.owner == owner]
        self._extents = [
            Extent(e.offset, e.length, state="dirty") if e.live and e.owner == owner else e
            for e in self._extents
        ]
        self._normalize()
        return freed

    def scrub_dirty(self, within: Sequence[Extent] | None = None) -> int:
        """Scrub dirty ranges now (not at their next allocation): all, or those inside ``within``
        (say, what was just freed); returns the bytes scrubbed. A failed scrub leaves its range
        dirty (LuoError), to be tried again at allocation."""
        dirty = [(e.offset, e.end) for e in self._extents if e.state == "dirty"]
        if within is not None:
            dirty = [(max(s, w.offset), min(t, w.end)) for s, t in dirty for w in within
                     if max(s, w.offset) < min(t, w.end)]
        for start, end in dirty:
            self._clean(start, end)
        self._normalize()
        return sum(end - start for start, end in dirty)

    def free_extent(self, offset: int) -> Extent:
        """The live extent starting at ``offset`` becomes dirty; ENOENT if none starts there."""
        i = self._live_at(offset)
        if i is None:
            raise LuoError(
                errno.ENOENT, f"no extent of the pool starts at offset {offset!r}; nothing was freed."
            )
        e = self._extents[i]
        self._extents[i] = Extent(e.offset, e.length, state="dirty")
        self._normalize()
        return e

    # -- across an update -------------------------------------------------------------------

    def preserve_all(self) -> list[Extent]:
        """What goes into the pool map at prepare: every live extent, as ``preserved``.

        Pure: the update may still be cancelled, and then every owner keeps what it had. Extents
        preserved by the last update and not yet claimed go too, rather than lose their data.
        """
        return [replace(e, state="preserved") for e in self._extents if e.live]

    def claim(self, owner: str, offset: int) -> Extent:
        """``owner`` takes back the preserved extent starting at ``offset``, once.

        EINVAL if it was claimed already (the kernel restores a folio once), ENOENT if no
        preserved extent starts there, EPERM if it is another owner's.
        """
        validate_owner(owner)
        i = self._live_at(offset)
        e = self._extents[i] if i is not None else None
        if e is None or e.state == "allocated":
            raise LuoError(
                errno.ENOENT,
                f"no preserved extent starts at offset {offset!r}: it was never preserved, or the update "
                "finished and released it.",
            )
        if e.state == "claimed":
            raise _bad(
                f"the extent at offset {offset:#x} was restored once already (by {e.owner}); it cannot be "
                "claimed again."
            )
        if e.owner != owner:
            raise LuoError(
                errno.EPERM, f"the extent at offset {offset:#x} was preserved for {e.owner}, not {owner}."
            )
        assert i is not None
        claimed = replace(e, state="claimed")
        self._extents[i] = claimed
        return claimed

    def claim_all(self, owner: str) -> list[Extent]:
        """Every preserved extent of ``owner``, claimed. EINVAL if it claimed them already,
        ENOENT if none was preserved for it."""
        validate_owner(owner)
        mine = [e for e in self._extents if e.live and e.owner == owner]
        waiting = [e for e in mine if e.state == "preserved"]
        if not waiting:
            if any(e.state == "claimed" for e in mine):
                raise _bad(
                    f"{owner}'s preserved extents were restored once already; they cannot be claimed again."
                )
            raise LuoError(errno.ENOENT, f"no extent of the pool was preserved for {owner}.")
        return [self.claim(owner, e.offset) for e in waiting]

    def finish(self, keep: Callable[[str], bool] = lambda owner: False) -> list[Extent]:
        """LUO finish: every extent nobody claimed is released (dirty), but those of owners ``keep``
        names (they stay preserved, for their owner to claim later); returns the released."""
        released = [e for e in self._extents if e.state == "preserved" and not keep(e.owner)]
        self._extents = [
            Extent(e.offset, e.length, state="dirty") if e.state == "preserved" and not keep(e.owner) else e
            for e in self._extents
        ]
        self._normalize()
        return released

    # -- internals --------------------------------------------------------------------------

    def _live_at(self, offset: object) -> int | None:
        """Index of the live extent starting exactly at ``offset``, if there is one."""
        if not is_int(offset):
            return None
        i = bisect.bisect_left([e.offset for e in self._extents], offset)
        if i < len(self._extents) and self._extents[i].offset == offset and self._extents[i].live:
            return i
        return None

    def _holes(self, clean: bool = False) -> list[tuple[int, int]]:
        """Maximal runs of free or dirty extents (``clean``: free only), as (start, end)."""
        out: list[tuple[int, int]] = []
        for e in self._extents:
            if e.live or (clean and e.state == "dirty"):
                continue
            if out and out[-1][1] == e.offset:
                out[-1] = (out[-1][0], e.end)
            else:
                out.append((e.offset, e.end))
        return out

    def _chunks(self, unit: int, clean: bool = False) -> list[tuple[int, int]]:
        """The holes cut to ``unit`` alignment, as (start, length): what an order can use."""
        out: list[tuple[int, int]] = []
        for start, end in self._holes(clean):
            s, e = _round_up(start, unit), _round_down(end, unit)
            if e > s:
                out.append((s, e - s))
        return out

    def _clean(self, start: int, end: int) -> None:
        """Scrub the dirty parts of ``[start, end)`` and mark them free, one call per dirty run.

        A scrub that fails leaves its run dirty (and the allocation undone): the callback's
        OSError comes back as LuoError with its errno.
        """
        for e in list(self._extents):
            if e.state != "dirty" or e.end <= start or e.offset >= end:
                continue
            s, t = max(e.offset, start), min(e.end, end)
            try:
                self._scrub(s, t - s)
            except OSError as err:
                self._normalize()
                raise LuoError(
                    err.errno or errno.EIO,
                    f"scrubbing the pool at {s:#x} ({fmt_bytes(t - s)}) failed ({err}); the range stays "
                    "dirty and nothing was allocated.",
                ) from err
            self._replace(s, t, [Extent(s, t - s)])

    def _replace(self, start: int, end: int, new: list[Extent]) -> None:
        """Put ``new`` (covering ``[start, end)`` exactly) where free or dirty extents were."""
        i = 0
        while i < len(self._extents) and self._extents[i].end <= start:
            i += 1
        j = i
        left: list[Extent] = []
        right: list[Extent] = []
        while j < len(self._extents) and self._extents[j].offset < end:
            e = self._extents[j]
            assert not e.live, f"cutting a live extent {e}"
            if e.offset < start:
                left.append(replace(e, length=start - e.offset))
            if e.end > end:
                right.append(replace(e, offset=end, length=e.end - end))
            j += 1
        self._extents[i:j] = left + new + right

    def _normalize(self) -> None:
        """Merge neighbouring free extents, and neighbouring dirty ones."""
        out: list[Extent] = []
        for e in self._extents:
            prev = out[-1] if out else None
            if prev is not None and not e.live and prev.state == e.state and prev.end == e.offset:
                out[-1] = replace(prev, length=prev.length + e.length)
            else:
                out.append(e)
        self._extents = out
