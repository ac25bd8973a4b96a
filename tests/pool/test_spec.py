"""The command-line forms and the layout they determine."""

from __future__ import annotations

import errno

import pytest

from luo.errors import LuoError
from luo.pool.extents import GIGA, GRANULE
from luo.pool.spec import (
    LABEL_AREA_SIZE,
    Layout,
    PoolSpec,
    ShardSpec,
    check_same,
    make_layout,
    parse_labels,
    parse_layout,
    parse_pool,
    parse_shards,
    parse_size,
    shard_name,
)

M, G = 1 << 20, 1 << 30


def _einval(call: object, *args: object) -> LuoError:
    with pytest.raises(LuoError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.errno == errno.EINVAL
    return info.value


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4K", 4 << 10), ("512M", 512 * M), ("8G", 8 * G), ("1T", 1 << 40), ("2g", 2 * G)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "8X", "-2G", "1.5G", "8GB", " 8G", "0x10M", "1" * 21])
def test_bad_sizes(text: str) -> None:
    assert repr(text) in _einval(parse_size, text).message


def test_pool_forms() -> None:
    assert parse_pool("8G:hugetlb") == PoolSpec(8 * G, "hugetlb")
    assert parse_pool("512M") == PoolSpec(512 * M, "hugetlb")
    assert parse_pool("6M:shmem") == PoolSpec(6 * M, "shmem")


@pytest.mark.parametrize("text", ["3M", "0", "0M:shmem", "1K", "8G:tmpfs", "8G:", "8G:hugetlb:x", "huge"])
def test_bad_pools_name_the_value(text: str) -> None:
    e = _einval(parse_pool, text)
    assert text.split(":")[0] in e.message or repr(text) in e.message


def test_pool_size_is_bounded() -> None:
    assert "larger than" in _einval(parse_pool, "8192T").message


def test_shard_forms() -> None:
    assert parse_shards("2G:devdax,2G:devdax,4G:fsdax") == (
        ShardSpec(2 * G, "devdax", GRANULE),
        ShardSpec(2 * G, "devdax", GRANULE),
        ShardSpec(4 * G, "fsdax", GRANULE),
    )
    assert parse_shards("2G:devdax:1G, 4M:fsdax:2M") == (
        ShardSpec(2 * G, "devdax", GIGA),
        ShardSpec(4 * M, "fsdax"),
    )
    assert parse_shards("") == parse_shards("none") == ()
    assert [shard_name(i) for i in range(3)] == ["shard0", "shard1", "shard2"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("2G", "SIZE:MODE"),
        ("2G:pmem", "'pmem'"),
        ("3M:devdax", "multiple of 2M"),
        ("2G:devdax:4K", "2M (default) or 1G"),
        ("3G:devdax:1G,", "SIZE:MODE"),
        ("2G:devdax:1G:x", "SIZE:MODE"),
        ("1026M:devdax:1G", "multiple of its alignment"),
    ],
)
def test_bad_shards(text: str, says: str) -> None:
    assert says in _einval(parse_shards, text).message


def test_labels() -> None:
    assert parse_labels("none") == "none"
    assert parse_labels("end") == "end"
    assert "'start'" in _einval(parse_labels, "start").message


def test_layout_places_shards_in_order() -> None:
    layout = make_layout("8G:hugetlb", "2G:devdax,2G:devdax,4G:fsdax")
    assert [(p.name, p.offset, p.spec.size) for p in layout.placed] == [
        ("shard0", 0, 2 * G),
        ("shard1", 2 * G, 2 * G),
        ("shard2", 4 * G, 4 * G),
    ]
    assert layout.general == (8 * G, 0)
    assert layout.label_granule is None and layout.label_area is None
    assert layout.describe() == "8G:hugetlb shards=2G:devdax,2G:devdax,4G:fsdax labels=none"


def test_alignment_leaves_a_gap_outside_the_general_area() -> None:
    layout = make_layout("4G", "2M:devdax,1G:fsdax:1G")
    assert [p.offset for p in layout.placed] == [0, G]
    assert layout.gaps() == [(2 * M, G - 2 * M)]
    assert layout.general == (2 * G, 2 * G)


def test_label_granule_is_reserved_at_the_end() -> None:
    layout = make_layout("1G:shmem", "512M:devdax", "end")
    assert layout.label_granule == (G - GRANULE, GRANULE)
    assert layout.label_area == (G - LABEL_AREA_SIZE, LABEL_AREA_SIZE) == (G - (128 << 10), 128 << 10)
    assert layout.general == (512 * M, 512 * M - GRANULE)
    assert make_layout("2M", "", "end").general == (0, 0)


def test_shards_that_do_not_fit_say_by_how_much() -> None:
    e = _einval(make_layout, "4G", "2G:devdax,2G:fsdax", "end")
    assert "2M too many" in e.message and "label granule" in e.message
    e = _einval(make_layout, "3G", "2M:devdax,3G:devdax:1G")
    assert "1G too many" in e.message
    make_layout("4G", "2G:devdax,2G:fsdax")  # exactly full: fine


def test_describe_round_trips_and_is_canonical() -> None:
    for args in [("8G",), ("4G:shmem", "2M:devdax,1G:fsdax:1G", "end"), ("1T", "2048M:devdax")]:
        layout = make_layout(*args)
        assert parse_layout(layout.describe()) == layout
    assert make_layout("1T", "2048M:devdax").describe() == "1T:hugetlb shards=2G:devdax labels=none"
    assert "canonical" in _einval(parse_layout, "8192M:hugetlb shards=none labels=none").message
    assert "canonical" in _einval(parse_layout, "8G:hugetlb shards=2G:devdax:2M labels=none").message
    _einval(parse_layout, "8G:hugetlb shards=none")
    _einval(parse_layout, "8G:hugetlb  shards=none labels=none")


def test_check_same_refuses_another_layout() -> None:
    preserved = make_layout("8G:hugetlb", "2G:devdax,2G:devdax,4G:fsdax")
    check_same(preserved, make_layout("8192M", "2G:devdax,2G:devdax,4G:fsdax", "none"))
    for other in [
        make_layout("8G:shmem", "2G:devdax,2G:devdax,4G:fsdax"),
        make_layout("8G:hugetlb", "2G:devdax,4G:fsdax,2G:devdax"),
        make_layout("8G:hugetlb", "2G:devdax,2G:devdax,2G:fsdax", "end"),
        make_layout("16G:hugetlb", "2G:devdax,2G:devdax,4G:fsdax"),
    ]:
        e = _einval(check_same, preserved, other)
        assert preserved.describe() in e.message and other.describe() in e.message
        assert "before touching anything" in e.message


def test_layout_is_a_value() -> None:
    a = Layout(PoolSpec(4 * G), [ShardSpec(2 * M, "devdax")], "none")  # type: ignore[arg-type]
    assert a == make_layout("4G", "2M:devdax") and hash(a) == hash(make_layout("4G", "2M:devdax"))
