"""The allocator: placement, scrubbing before reuse, restore-once across an update."""

from __future__ import annotations

import errno
import random
from dataclasses import replace

import pytest

from luo.errors import LuoError
from luo.pool.extents import GIGA, GIGA_ORDER, GRANULE, Allocator, Extent, validate_owner

M, G = 1 << 20, 1 << 30


class Memory:
    """The pool's bytes, and every scrub call: scrub zeroes, as punching a hole does."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.calls: list[tuple[int, int]] = []

    def scrub(self, offset: int, length: int) -> None:
        self.calls.append((offset, length))
        self.data[offset : offset + length] = bytes(length)

    def write(self, extents: list[Extent], byte: int) -> None:
        for e in extents:
            self.data[e.offset : e.end] = bytes([byte]) * e.length

    def clean(self, extents: list[Extent]) -> bool:
        return all(not any(self.data[e.offset : e.end]) for e in extents)


def _err(err: int, call: object, *args: object) -> LuoError:
    with pytest.raises(LuoError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.errno == err, info.value
    return info.value


@pytest.fixture
def mem() -> Memory:
    return Memory(64 * M)


@pytest.fixture
def pool(mem: Memory) -> Allocator:
    return Allocator(8 * M, 32 * M, mem.scrub)  # the general area: [8M, 40M)


def _covers(a: Allocator) -> None:
    pos = a.area_start
    for e in a.regions():
        assert e.offset == pos and e.length > 0
        pos = e.end
    assert pos == a.area_start + a.area_length


def test_fresh_pool_is_never_scrubbed(pool: Allocator, mem: Memory) -> None:
    got = pool.alloc("vm:web1", 5 * M)
    assert got == [Extent(8 * M, 6 * M, 9, "vm:web1", "allocated")]  # rounded up to the granule
    pool.alloc("session:x", 1)
    assert mem.calls == []
    s = pool.stats()
    assert (s.total, s.free, s.allocated) == (32 * M, 24 * M, {"session:x": 2 * M, "vm:web1": 6 * M})
    assert pool.owners() == ["session:x", "vm:web1"]


def test_a_freed_range_is_scrubbed_before_another_owner_gets_it(pool: Allocator, mem: Memory) -> None:
    first = pool.alloc("vm:a", 32 * M)
    mem.write(first, 0xAA)
    assert pool.free("vm:a") == first
    assert pool.stats().dirty_bytes == 32 * M and mem.calls == []  # freeing does not scrub
    second = pool.alloc("vm:b", 4 * M)
    assert mem.calls == [(second[0].offset, 4 * M)]  # just what is handed out, once
    assert mem.clean(second)
    assert pool.stats().dirty_bytes == 28 * M
    mem.calls.clear()
    pool.free("vm:b")
    third = pool.alloc("vm:c", 32 * M)  # all of it again: freed runs merge, one call
    assert mem.clean(third)
    assert mem.calls == [(8 * M, 32 * M)]


def test_clean_space_is_preferred_to_dirty(pool: Allocator, mem: Memory) -> None:
    a = pool.alloc("vm:a", 8 * M)  # [8M, 16M)
    mem.write(a, 1)
    pool.free("vm:a")
    b = pool.alloc("vm:b", 24 * M)  # fits the clean [16M, 40M): nothing to scrub
    assert b[0].offset == 16 * M and mem.calls == []
    pool.free("vm:b")  # [8M, 40M) is now one dirty run, scrubbed in one call
    assert len(pool.regions()) == 1
    c = pool.alloc("vm:c", 32 * M)
    assert mem.calls == [(8 * M, 32 * M)] and mem.clean(c)


def test_only_the_dirty_part_of_a_run_is_scrubbed(pool: Allocator, mem: Memory) -> None:
    x = pool.alloc("vm:x", 4 * M)  # [8M, 12M); [12M, 40M) stays clean
    mem.write(x, 7)
    pool.free_extent(x[0].offset)
    got = pool.alloc("vm:y", 32 * M)  # no clean run holds it: dirty [8M, 12M) + clean
    assert got[0].offset == 8 * M and mem.calls == [(8 * M, 4 * M)] and mem.clean(got)


def test_only_the_dirty_pieces_are_scrubbed(pool: Allocator, mem: Memory) -> None:
    x = pool.alloc("vm:x", 4 * M)  # [8M, 12M)
    pool.alloc("vm:keep", 20 * M)  # [12M, 32M); [32M, 40M) stays clean
    mem.write(x, 7)
    pool.free("vm:x")
    got = pool.alloc("vm:y", 12 * M)  # two pieces: the clean 8M, then the dirty 4M
    assert [(e.offset, e.length) for e in got] == [(32 * M, 8 * M), (8 * M, 4 * M)]
    assert mem.calls == [(8 * M, 4 * M)] and mem.clean(got)


def test_best_fit_then_largest_first(pool: Allocator) -> None:
    for i in range(16):
        pool.alloc(f"vm:{i}", 2 * M)
    for i in (1, 2, 3, 5, 6, 9, 10, 11, 12):  # holes of 6M, 4M and 8M
        pool.free(f"vm:{i}")
    assert pool.stats().largest_free == 8 * M
    assert pool.alloc("vm:fit", 4 * M) == [Extent(18 * M, 4 * M, 9, "vm:fit", "allocated")]
    got = pool.alloc("vm:big", 12 * M)  # 8M and 6M remain: largest first, the last piece fits
    assert [(e.offset, e.length) for e in got] == [(26 * M, 8 * M), (10 * M, 4 * M)]
    assert pool.extents_of("vm:big") == sorted(got, key=lambda e: e.offset)
    _covers(pool)


def test_enomem_says_what_is_free_and_changes_nothing(pool: Allocator, mem: Memory) -> None:
    pool.alloc("vm:a", 10 * M)
    pool.alloc("vm:b", 2 * M)
    pool.free("vm:a")
    before = pool.regions()
    e = _err(errno.ENOMEM, pool.alloc, "vm:c", 31 * M)
    assert (
        "asks for 32M" in e.message and "30M free" in e.message and "largest free extent is 20M" in e.message
    )
    assert pool.regions() == before and mem.calls == []


def test_giga_order() -> None:
    calls: list[tuple[int, int]] = []
    pool = Allocator(G - 4 * M, 3 * G, lambda o, n: calls.append((o, n)))  # 2 aligned 1G runs
    got = pool.alloc("vm:huge", G + 1, order=GIGA_ORDER)
    assert [(e.offset, e.length, e.order) for e in got] == [(G, 2 * G, GIGA_ORDER)]
    pool.free("vm:huge")
    assert pool.alloc("vm:small", 2 * M)[0].offset == G - 4 * M  # clean: the head, not the dirty 1G
    assert calls == []
    got = pool.alloc("vm:huge", G, order=GIGA_ORDER)
    assert got[0].offset % GIGA == 0 and calls == [(G, G)]
    e = _err(errno.ENOMEM, pool.alloc, "vm:more", 2 * G, GIGA_ORDER)
    assert "in 1G-aligned pieces" in e.message
    _err(errno.EINVAL, pool.alloc, "vm:x", G, 10)


def test_free_extent_and_free(pool: Allocator) -> None:
    a = pool.alloc("vm:a", 2 * M) + pool.alloc("vm:a", 2 * M)
    assert pool.free_extent(a[0].offset) == a[0]
    assert pool.extents_of("vm:a") == [a[1]]
    assert "offset" in _err(errno.ENOENT, pool.free_extent, a[0].offset).message  # already free
    _err(errno.ENOENT, pool.free_extent, a[1].offset + GRANULE)  # inside, not a start
    assert pool.free("vm:a") == [a[1]]
    assert pool.free("vm:a") == [] and pool.owners() == []
    assert pool.stats().free == 32 * M


@pytest.mark.parametrize("owner", ["", "vm:\0x", "vm:a\nb", "x" * 65, "é" * 33, "vm:\udc80", 7])
def test_bad_owner_names(pool: Allocator, owner: object) -> None:
    _err(errno.EINVAL, pool.alloc, owner, GRANULE)
    assert pool.owners() == []


def test_good_owner_names() -> None:
    for owner in ["vm:web1", "session:x", "client:123", "x" * 64, "é" * 32, "vm:a b"]:
        assert validate_owner(owner) == owner


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2M"])
def test_bad_sizes(pool: Allocator, size: object) -> None:
    _err(errno.EINVAL, pool.alloc, "vm:a", size)


@pytest.mark.parametrize(("start", "length"), [(1, 2 * M), (0, M), (-2 * M, 2 * M)])
def test_bad_area(start: int, length: int) -> None:
    _err(errno.EINVAL, Allocator, start, length, lambda o, n: None)


def test_failed_scrub_allocates_nothing_and_keeps_the_range_dirty(pool: Allocator, mem: Memory) -> None:
    a = pool.alloc("vm:a", 32 * M)
    mem.write(a, 9)
    pool.free("vm:a")

    def broken(offset: int, length: int) -> None:
        raise OSError(errno.EIO, "punch hole failed")

    pool._scrub = broken  # noqa: SLF001 - a callback that fails once
    e = _err(errno.EIO, pool.alloc, "vm:b", 2 * M)
    assert "stays dirty" in e.message
    assert pool.owners() == [] and pool.stats().dirty_bytes == 32 * M
    pool._scrub = mem.scrub  # noqa: SLF001
    got = pool.alloc("vm:b", 2 * M)
    assert mem.calls == [(8 * M, 2 * M)] and mem.clean(got)


# -- across an update ------------------------------------------------------------------------


def _updated(pool: Allocator, mem: Memory) -> Allocator:
    return Allocator.from_preserved(pool.area_start, pool.area_length, pool.preserve_all(), mem.scrub)


def test_preserve_all_is_pure_and_takes_every_live_extent(pool: Allocator) -> None:
    a = pool.alloc("vm:a", 4 * M)
    pool.alloc("vm:b", 2 * M)
    pool.free("vm:b")
    before = pool.regions()
    kept = pool.preserve_all()
    assert kept == [replace(a[0], state="preserved")]
    assert pool.regions() == before  # a cancelled update leaves every owner its extents


def test_restore_once(pool: Allocator, mem: Memory) -> None:
    a = pool.alloc("vm:a", 4 * M)
    b = pool.alloc("vm:b", 2 * M)
    mem.write(a, 0xA)
    new = _updated(pool, mem)
    assert new.stats().preserved == 6 * M
    assert new.claim("vm:a", a[0].offset) == replace(a[0], state="claimed")
    e = _err(errno.EINVAL, new.claim, "vm:a", a[0].offset)
    assert "restored once already" in e.message
    _err(errno.ENOENT, new.claim, "vm:a", 30 * M)  # never preserved
    _err(errno.ENOENT, new.claim, "vm:a", a[0].offset + GRANULE)  # not an extent's start
    _err(errno.EPERM, new.claim, "vm:a", b[0].offset)
    assert mem.data[a[0].offset] == 0xA and mem.calls == []  # the claimed data is intact


def test_finish_releases_what_nobody_claimed(pool: Allocator, mem: Memory) -> None:
    a = pool.alloc("vm:a", 4 * M)
    b = pool.alloc("vm:b", 2 * M)
    mem.write(b, 0xB)
    new = _updated(pool, mem)
    new.claim_all("vm:a")
    released = new.finish()
    assert released == [replace(b[0], state="preserved")]
    assert new.owners() == ["vm:a"] and new.finish() == []
    _err(errno.ENOENT, new.claim, "vm:b", b[0].offset)  # discarded, as LUO finish does
    got = new.alloc("vm:c", 2 * M)
    assert mem.clean(got)  # vm:b's bytes never reach vm:c
    assert new.extents_of("vm:a") == [replace(a[0], state="claimed")]


def test_unpreserved_space_is_dirty_after_an_update(pool: Allocator, mem: Memory) -> None:
    a = pool.alloc("vm:a", 2 * M)
    mem.data[20 * M] = 0xEE  # whatever an old host left in space it never preserved
    new = _updated(pool, mem)
    assert new.stats().dirty_bytes == 30 * M
    got = new.alloc("vm:b", 30 * M)
    assert mem.calls == [(10 * M, 30 * M)] and mem.clean(got)
    assert new.claim("vm:a", a[0].offset).state == "claimed"


def test_claim_all(pool: Allocator, mem: Memory) -> None:
    pool.alloc("vm:a", 2 * M)
    pool.alloc("vm:b", 2 * M)
    pool.alloc("vm:a", 4 * M)
    new = _updated(pool, mem)
    got = new.claim_all("vm:a")
    assert [e.state for e in got] == ["claimed", "claimed"] and sum(e.length for e in got) == 6 * M
    assert "restored once already" in _err(errno.EINVAL, new.claim_all, "vm:a").message
    _err(errno.ENOENT, new.claim_all, "vm:nobody")
    # claimed extents go into the next update's map, like allocated ones
    assert {e.owner for e in new.preserve_all()} == {"vm:a", "vm:b"}


def test_allocated_after_the_update_is_not_claimable(pool: Allocator, mem: Memory) -> None:
    new = _updated(pool, mem)
    got = new.alloc("vm:a", 2 * M)
    _err(errno.ENOENT, new.claim, "vm:a", got[0].offset)


@pytest.mark.parametrize(
    "bad",
    [
        Extent(8 * M, 2 * M, 9, "vm:a", "allocated"),
        Extent(6 * M, 4 * M, 9, "vm:a", "preserved"),  # starts before the area
        Extent(38 * M, 4 * M, 9, "vm:a", "preserved"),  # runs past it
        Extent(9 * M, 2 * M, 9, "vm:a", "preserved"),  # misaligned
        Extent(G, G, GIGA_ORDER, "vm:a", "preserved"),  # outside
        Extent(8 * M, 2 * M, 9, "", "preserved"),
        Extent(8 * M, 2 * M, 7, "vm:a", "preserved"),
        Extent(8 * M, 0, 9, "vm:a", "preserved"),
    ],
)
def test_from_preserved_refuses(bad: Extent) -> None:
    _err(errno.EINVAL, Allocator.from_preserved, 8 * M, 32 * M, [bad], lambda o, n: None)


def test_from_preserved_refuses_overlaps() -> None:
    a = Extent(8 * M, 4 * M, 9, "vm:a", "preserved")
    b = Extent(10 * M, 2 * M, 9, "vm:b", "preserved")
    e = _err(errno.EINVAL, Allocator.from_preserved, 8 * M, 32 * M, [b, a], lambda o, n: None)
    assert "overlaps" in e.message


# -- the property: no overlap, free + allocated = area, no data across owners -----------------


def test_random_operations_keep_the_invariants() -> None:
    """A seeded random walk (hypothesis is not installed) over alloc/free/update/claim/finish."""
    rng = random.Random(20250611)
    area_start, area_length = 4 * M, 256 * M
    granules = bytearray((area_start + area_length) // GRANULE)  # one byte per granule: who wrote it
    scrubbed: list[tuple[int, int]] = []

    def scrub(offset: int, length: int) -> None:
        assert offset % GRANULE == 0 and length % GRANULE == 0 and length > 0
        scrubbed.append((offset, length))
        granules[offset // GRANULE : (offset + length) // GRANULE] = bytes(length // GRANULE)

    pool = Allocator(area_start, area_length, scrub)
    owners = [f"vm:{i}" for i in range(1, 9)]
    for _step in range(3000):
        op = rng.random()
        owner = rng.choice(owners)
        tag = owners.index(owner) + 1
        if op < 0.5:
            try:
                got = pool.alloc(owner, rng.randint(1, 40 * M), rng.choice([9, 9, 9, GIGA_ORDER]))
            except LuoError as e:
                assert e.errno == errno.ENOMEM
                continue
            for e in got:  # what an owner gets holds nobody's data, then it writes its own
                span = granules[e.offset // GRANULE : e.end // GRANULE]
                assert not any(span), f"{owner} got another owner's bytes at {e.offset:#x}"
                granules[e.offset // GRANULE : e.end // GRANULE] = bytes([tag]) * len(span)
        elif op < 0.75:
            pool.free(owner)
        elif op < 0.85:
            live = [e for e in pool.regions() if e.live]
            if live:
                pool.free_extent(rng.choice(live).offset)
        elif op < 0.9:
            pool = Allocator.from_preserved(area_start, area_length, pool.preserve_all(), scrub)
        elif op < 0.97:
            for e in [e for e in pool.regions() if e.state == "preserved" and rng.random() < 0.7]:
                pool.claim(e.owner, e.offset)
        else:
            pool.finish()
        regions = pool.regions()
        _covers(pool)
        for a, b in zip(regions, regions[1:], strict=False):
            assert not (a.state == b.state and not a.live), "neighbouring free or dirty runs are merged"
        for e in regions:
            if e.live:
                assert e.offset % (4096 << e.order) == 0 and e.length % (4096 << e.order) == 0
                # a live extent still holds its owner's data (nothing scrubbed it)
                assert set(granules[e.offset // GRANULE : e.end // GRANULE]) == {owners.index(e.owner) + 1}
        s = pool.stats()
        assert s.free + sum(s.allocated.values()) == s.total == area_length
        assert s.largest_free <= s.free
    assert scrubbed, "the walk reused freed space at least once"


def test_scrub_dirty_scrubs_every_dirty_range_now_and_only_those() -> None:
    calls: list[tuple[int, int]] = []
    a = Allocator(0, 16 * GRANULE, lambda off, n: calls.append((off, n)))
    a.alloc("vm:a", 2 * GRANULE)
    a.alloc("vm:b", 2 * GRANULE)
    a.free("vm:a")
    assert calls == []  # freeing marks dirty only
    assert a.scrub_dirty() == 2 * GRANULE
    assert calls == [(0, 2 * GRANULE)]
    assert a.stats().dirty_bytes == 0
    a.alloc("vm:c", 2 * GRANULE)  # clean now: no second scrub
    assert calls == [(0, 2 * GRANULE)]


def test_finish_keeps_what_the_caller_says_stays_preserved() -> None:
    a = Allocator.from_preserved(0, 8 * GRANULE, [Extent(0, GRANULE, owner="vm:a", state="preserved"),
                                                  Extent(GRANULE, GRANULE, owner="client:x", state="preserved")],
                                 lambda off, n: None)
    released = a.finish(keep=lambda owner: owner.startswith("vm:"))
    assert [e.owner for e in released] == ["client:x"]
    assert [e.state for e in a.extents_of("vm:a")] == ["preserved"]
    assert a.claim("vm:a", 0).state == "claimed"  # a late VMM still gets its RAM back
