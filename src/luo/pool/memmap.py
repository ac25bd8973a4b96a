"""The pool's preserved-memory map: one FDT node of luo's KHO tree.

It says what of the pool survives an update, and for whom. It holds both:

- per page order, a ``bitmap`` (child ``order@9``, ``order@18``): one bit per unit of that order
  across the whole pool, set if preserved. This is the kernel's own representation of preserved
  memory (KHO keeps a bitmap per order); it is what says which pages survive, and restore-once is
  checked against it: a page the bitmap does not hold was never preserved.
- per owner, ``extents`` (child ``owner@<n>``): for whom each preserved extent is, which a bitmap
  cannot say, and in a form a person reading ``dtc`` output can follow.

The parser checks that the two agree bit for bit, so neither can be forged alone. Shards
(``shard@<i>``) are preserved whole, claimed or not (their content is their point), and are
marked in the order-9 bitmap too; extents come only from the general area, never from a shard.

::

    pool-map {
        compatible = POOL_MAP_COMPATIBLE (luo.abi);
        size = <u64>; backing = "hugetlb"; layout = "8G:hugetlb shards=2G:devdax labels=none";
        labels = "none"; fd-index = <u32>; granule = <u64 0x200000>;
        order@9 { bitmap = [...]; };          // bit i = [i * 2M, (i + 1) * 2M) of the pool
        owner@0 { owner = "vm:web1"; extents = <offset length ...>; };
        shard@0 { shard-name = "shard0"; mode = "devdax"; offset = <u64>; size = <u64>; owner = ""; };
    };

A shard's name is ``shard-name``, not ``name``: dtc insists that a ``name`` property equal the
node's name. Integers are little-endian like every luo property (``luo.kho.encoding``), except
``extents``, which are big-endian u64 pairs, as in ``reg``, so ``dtc`` prints them as readable
cells (not called ``ranges``: dtc takes that for the standard address-translation property). A bitmap is the kernel's ``unsigned long`` array on a little-endian host: bit i is
bit i % 8 of byte i // 8, padded with zero bits to whole u64 words.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from luo.abi import POOL_MAP_COMPATIBLE
from luo.errors import LuoError
from luo.kho.encoding import U32_MAX
from luo.kho.parser import Props
from luo.kho.reader import FdtReader, Node, bad
from luo.pool.extents import (
    GRANULE,
    GRANULE_ORDER,
    ORDERS,
    Extent,
    fmt_bytes,
    is_int,
    order_size,
    validate_owner,
)
from luo.pool.labels import ShardLabel, check_name
from luo.pool.spec import SHARD_MODES, Layout, ShardMode, parse_layout

POOL_MAP_NODE = "pool-map"

MAP_PROPS = frozenset({"compatible", "size", "backing", "layout", "labels", "fd-index", "granule"})
ORDER_PROPS = frozenset({"bitmap"})
OWNER_PROPS = frozenset({"owner", "extents"})
SHARD_PROPS = frozenset({"shard-name", "mode", "offset", "size", "owner"})
_RANGE = struct.Struct(">QQ")
_CHILD_RE = re.compile(r"(order|owner|shard)@(0|[1-9][0-9]{0,9})")


class FdtWriter(Protocol):
    """What ``write_pool_map`` needs of a writer: ``luo.kho.builder.TreeWriter`` has it."""

    def begin(self, name: str) -> None: ...
    def end(self) -> None: ...
    def prop(self, name: str, value: bytes) -> None: ...
    def string(self, name: str, value: str) -> None: ...
    def u32(self, name: str, value: int) -> None: ...
    def u64(self, name: str, value: int) -> None: ...


@dataclass(frozen=True)
class ShardRecord:
    name: str
    mode: ShardMode
    offset: int
    size: int
    owner: str = ""  # empty: nobody has claimed it

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class PoolMap:
    """What the map node holds. ``extents`` are kept in offset order, all ``preserved``;
    ``shards``: the layout's shards in order, then (labels ``end``) those made in the labels."""

    layout: Layout
    fd_index: int
    extents: tuple[Extent, ...] = ()
    shards: tuple[ShardRecord, ...] = ()

    def __post_init__(self) -> None:
        if all(isinstance(e, Extent) and is_int(e.offset) for e in self.extents):
            object.__setattr__(self, "extents", tuple(sorted(self.extents, key=lambda e: e.offset)))


def shard_records(
    layout: Layout, label_shards: Iterable[ShardLabel] = (), owners: Mapping[str, str] | None = None
) -> tuple[ShardRecord, ...]:
    """The shards a map lists: the layout's, then the label area's, with their owners by name."""
    owners = owners or {}
    out = [
        ShardRecord(p.name, p.spec.mode, p.offset, p.spec.size, owners.get(p.name, "")) for p in layout.placed
    ]
    out += [ShardRecord(s.name, s.mode, s.offset, s.size, owners.get(s.name, "")) for s in label_shards]
    return tuple(out)


# -- rules ----------------------------------------------------------------------------------------


def _check_shards(m: PoolMap) -> None:
    layout = m.layout
    for s in m.shards:
        if not isinstance(s, ShardRecord):
            raise bad(f"a pool map's shard must be a ShardRecord, not {type(s).__name__}.")
    n = len(layout.placed)
    head, extra = m.shards[:n], m.shards[n:]
    if len(head) < n:
        raise bad(f"the pool map lists {len(head)} shards; its layout '{layout.describe()}' has {n}.")
    for p, s in zip(layout.placed, head, strict=True):
        want = ShardRecord(p.name, p.spec.mode, p.offset, p.spec.size, s.owner)
        if s != want:
            raise bad(f"the pool map's shard {s.name!r} is {s}; its layout places {want}.")
    if extra and layout.labels != "end":
        raise bad(f"the pool map lists {len(extra)} shards beyond its layout, but the pool has no labels.")
    names = {p.name for p in layout.placed}
    g_start, g_end = layout.general_start, layout.general_start + layout.general_length
    for s in m.shards:
        if s.owner:
            validate_owner(s.owner)
    for s in extra:
        check_name(s.name)
        if s.name in names:
            raise bad(f"the pool map lists shard {s.name!r} twice.")
        names.add(s.name)
        if s.mode not in SHARD_MODES:
            raise bad(
                f"the pool map's shard {s.name!r} has mode {s.mode!r}; one of {', '.join(SHARD_MODES)}."
            )
        if not (
            is_int(s.offset) and is_int(s.size) and s.size > 0 and g_start <= s.offset and s.end <= g_end
        ):
            raise bad(
                f"the pool map's shard {s.name!r} ({s.offset!r}, {s.size!r}) is not a range of the general "
                f"area {g_start:#x}..{g_end:#x}."
            )
        if s.offset % GRANULE or s.size % GRANULE:
            raise bad(
                f"the pool map's shard {s.name!r} at {s.offset:#x} is not aligned to {fmt_bytes(GRANULE)}."
            )


def _check_extents(m: PoolMap) -> None:
    """Extents: preserved, valid owners, aligned to their order, in the general area, disjoint
    from each other and from label shards."""
    layout = m.layout
    g_start, g_end = layout.general_start, layout.general_start + layout.general_length
    spans: list[tuple[int, int, str]] = [(s.offset, s.end, f"shard {s.name!r}") for s in m.shards]
    for e in m.extents:
        if not isinstance(e, Extent) or e.state != "preserved":
            raise bad(f"the pool map holds {e!r}; only preserved extents go into it.")
        validate_owner(e.owner)
        unit = order_size(e.order)
        if not (is_int(e.offset) and is_int(e.length) and e.length > 0):
            raise bad(f"{e.owner}'s range ({e.offset!r}, {e.length!r}) has no positive integer length.")
        where = f"{e.owner}'s range {e.offset:#x}..{e.end:#x}"
        if e.offset % unit or e.length % unit:
            raise bad(f"{where} is not aligned to its order {e.order} ({fmt_bytes(unit)}).")
        if e.offset < g_start or e.end > g_end:
            raise bad(f"{where} lies outside the pool's general area {g_start:#x}..{g_end:#x}.")
        spans.append((e.offset, e.end, where))
    spans.sort()
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:], strict=False):
        if b_start < a_end:
            raise bad(f"in the pool map, {a} and {b} overlap.")


def validate_pool_map(m: PoolMap) -> None:
    """EINVAL naming the first rule ``m`` breaks; the writer checks before writing, the parser
    after reading, so a map that is written also parses."""
    if not isinstance(m.layout, Layout):
        raise bad(f"a pool map's layout must be a Layout, not {type(m.layout).__name__}.")
    if not is_int(m.fd_index) or not 0 <= m.fd_index <= U32_MAX:
        raise bad(f"the pool map's fd-index {m.fd_index!r} is not a u32.")
    _check_shards(m)
    _check_extents(m)


def _bitmap_len(pool_size: int, order: int) -> tuple[int, int]:
    """(bits, bytes) of an order's bitmap: one bit per whole unit, in whole u64 words."""
    bits = pool_size // order_size(order)
    return bits, -(-bits // 64) * 8


def _mask(offset: int, length: int, unit: int) -> int:
    return ((1 << (length // unit)) - 1) << (offset // unit)


def _bitmaps(m: PoolMap) -> dict[int, int]:
    """The bitmaps, as integers (bit i = unit i), of every order: shards are order 9."""
    out = dict.fromkeys(ORDERS, 0)
    for e in m.extents:
        out[e.order] |= _mask(e.offset, e.length, order_size(e.order))
    for s in m.shards:
        out[GRANULE_ORDER] |= _mask(s.offset, s.size, GRANULE)
    return out


# -- writing --------------------------------------------------------------------------------------


def _by_owner(extents: Sequence[Extent]) -> list[tuple[str, list[Extent]]]:
    groups: dict[str, list[Extent]] = {}
    for e in extents:
        groups.setdefault(e.owner, []).append(e)
    return sorted(groups.items())


def write_pool_map(w: FdtWriter, m: PoolMap, name: str = POOL_MAP_NODE) -> None:
    """Write ``m`` as node ``name`` at ``w``'s current place. EINVAL (nothing written) if ``m``
    breaks a rule of the format."""
    validate_pool_map(m)
    layout = m.layout
    w.begin(name)
    w.string("compatible", POOL_MAP_COMPATIBLE)
    w.u64("size", layout.pool.size)
    w.string("backing", layout.pool.backing)
    w.string("layout", layout.describe())
    w.string("labels", layout.labels)
    w.u32("fd-index", m.fd_index)
    w.u64("granule", GRANULE)
    for order, bits in _bitmaps(m).items():
        if bits:
            w.begin(f"order@{order}")
            w.prop("bitmap", bits.to_bytes(_bitmap_len(layout.pool.size, order)[1], "little"))
            w.end()
    for i, (owner, extents) in enumerate(_by_owner(m.extents)):
        w.begin(f"owner@{i}")
        w.string("owner", owner)
        w.prop("extents", b"".join(_RANGE.pack(e.offset, e.length) for e in extents))
        w.end()
    for i, s in enumerate(m.shards):
        w.begin(f"shard@{i}")
        w.string("shard-name", s.name)
        w.string("mode", s.mode)
        w.u64("offset", s.offset)
        w.u64("size", s.size)
        w.string("owner", s.owner)
        w.end()
    w.end()


# -- reading --------------------------------------------------------------------------------------


class _Props(Props):
    """The tree parser's strict property reader, naming nodes as ``Node.where`` does."""

    def __init__(self, reader: FdtReader, node: Node, allowed: frozenset[str]) -> None:
        super().__init__(reader, node)
        self.path = node.where
        self.only(allowed)


def _children(reader: FdtReader, node: Node) -> dict[str, dict[int, Node]]:
    """The map's children by kind and index; refuses unknown names and gaps in the numbering."""
    kids: dict[str, dict[int, Node]] = {"order": {}, "owner": {}, "shard": {}}
    for c in reader.children(node):
        m = _CHILD_RE.fullmatch(c.name)
        if m is None:
            raise bad(f"node {node.where} has an unknown child {c.name!r}.")
        kids[m.group(1)][int(m.group(2))] = c
        if reader.children(c):
            raise bad(f"node {c.where} must have no children.")
    for kind in ("owner", "shard"):
        if sorted(kids[kind]) != list(range(len(kids[kind]))):
            raise bad(f"node {node.where}'s {kind}@ children are not numbered 0, 1, 2, ... without gaps.")
    for order in kids["order"]:
        if order not in ORDERS:
            raise bad(f"node {node.where} has a bitmap for page order {order}; the pool uses {ORDERS}.")
    return kids


def _read_bitmaps(reader: FdtReader, kids: dict[int, Node], pool_size: int) -> dict[int, int]:
    out = dict.fromkeys(ORDERS, 0)
    for order, c in kids.items():
        raw = _Props(reader, c, ORDER_PROPS).get("bitmap")
        bits, size = _bitmap_len(pool_size, order)
        if len(raw) != size:
            raise bad(
                f"property {c.where}:bitmap is {len(raw)} bytes long; a {fmt_bytes(pool_size)} pool's "
                f"order-{order} bitmap is {size} ({bits} bits in u64 words)."
            )
        value = int.from_bytes(raw, "little")
        if value >> bits:
            raise bad(f"property {c.where}:bitmap has bits set past the end of the pool.")
        out[order] = value
    return out


def _read_ranges(p: _Props, owner: str, bitmaps: dict[int, int], pool_size: int) -> list[Extent]:
    """An owner's ranges, each given the order whose bitmap holds it whole (1G first)."""
    raw = p.get("extents")
    if not raw or len(raw) % _RANGE.size:
        raise bad(
            f"property {p.path}:extents is {len(raw)} bytes long; it holds one or more (offset, length) "
            "u64 pairs."
        )
    out: list[Extent] = []
    for offset, length in _RANGE.iter_unpack(raw):
        if offset + length > pool_size:
            raise bad(
                f"{p.path}: {owner}'s range {offset:#x} ({length:#x} bytes) runs past the pool's end "
                f"({pool_size:#x})."
            )
        for order in sorted(ORDERS, reverse=True):
            unit = order_size(order)
            if length and offset % unit == 0 and length % unit == 0:
                mask = _mask(offset, length, unit)
                if bitmaps[order] & mask == mask:
                    out.append(Extent(offset, length, order, owner, "preserved"))
                    break
        else:
            raise bad(
                f"{p.path}: {owner}'s range {offset:#x} ({length:#x} bytes) is not preserved whole at any "
                "page order by the bitmaps (or is not aligned to one)."
            )
    return out


def _read_shard(reader: FdtReader, node: Node) -> ShardRecord:
    p = _Props(reader, node, SHARD_PROPS)
    mode = p.string("mode")
    if mode not in SHARD_MODES:
        raise bad(f"property {node.where}:mode is {mode!r}; a shard is one of {', '.join(SHARD_MODES)}.")
    return ShardRecord(
        p.string("shard-name"), cast(ShardMode, mode), p.u64("offset"), p.u64("size"), p.string("owner")
    )


def _parse(reader: FdtReader, node: Node, fd_count: int | None) -> PoolMap:
    p = _Props(reader, node, MAP_PROPS)
    compatible = p.string("compatible")
    if compatible != POOL_MAP_COMPATIBLE:
        raise bad(
            f"node {node.where} is compatible {compatible!r}; this version reads only "
            f"{POOL_MAP_COMPATIBLE!r}."
        )
    text = p.string("layout")
    try:
        layout = parse_layout(text)
    except LuoError as e:
        raise bad(f"property {node.where}:layout is no pool layout: {e.message}") from e
    size, backing, labels = p.u64("size"), p.string("backing"), p.string("labels")
    if (size, backing, labels) != (layout.pool.size, layout.pool.backing, layout.labels):
        raise bad(
            f"node {node.where} says size {size:#x}, backing {backing!r} and labels {labels!r}, but its "
            f"layout is '{text}'."
        )
    granule = p.u64("granule")
    if granule != GRANULE:
        raise bad(
            f"property {node.where}:granule is {granule:#x}; this version's pool granule is {GRANULE:#x}."
        )
    kids = _children(reader, node)
    bitmaps = _read_bitmaps(reader, kids["order"], size)
    extents: list[Extent] = []
    owners: set[str] = set()
    for i in range(len(kids["owner"])):
        c = kids["owner"][i]
        op = _Props(reader, c, OWNER_PROPS)
        owner = op.string("owner")
        try:
            validate_owner(owner)
        except LuoError as e:
            raise bad(f"node {c.where}: {e.message}") from e
        if owner in owners:
            raise bad(f"node {node.where} lists owner {owner!r} twice.")
        owners.add(owner)
        extents += _read_ranges(op, owner, bitmaps, size)
    shards = tuple(_read_shard(reader, kids["shard"][i]) for i in range(len(kids["shard"])))
    m = PoolMap(layout, p.u32("fd-index"), tuple(extents), shards)
    if fd_count is not None and m.fd_index >= fd_count:
        raise bad(
            f"node {node.where}: fd-index {m.fd_index} is out of range: {fd_count} fds were handed over."
        )
    validate_pool_map(m)
    if _bitmaps(m) != bitmaps:
        raise bad(
            f"node {node.where}'s bitmaps preserve pages that no owner's range or shard accounts for; "
            "the map is inconsistent."
        )
    return m


def parse_pool_map(reader: FdtReader, node: Node, fd_count: int | None = None) -> PoolMap:
    """The map ``write_pool_map`` wrote at ``node``. Everything is checked (unknown properties or
    children, bitmap sizes, ranges against the pool, their order and the bitmaps): a hostile or
    damaged tree gives LuoError(EINVAL) with a sentence, and no other exception leaves here.
    ``fd_count``: how many fds came with the tree, which ``fd-index`` must be below."""
    try:
        return _parse(reader, node, fd_count)
    except LuoError:
        raise
    except Exception as e:  # noqa: BLE001 - the promise is: only LuoError leaves this function
        raise bad(f"the pool map at {node.where} is malformed ({type(e).__name__}: {e}).") from e
