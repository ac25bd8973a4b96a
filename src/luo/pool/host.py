"""The pool in a host: where its configuration comes from, how its memfd crosses an update, its
LUO subsystem, and its control-socket ops (docs/pool.md).

Configuration: ``luo host --pool SIZE[:hugetlb|:shmem] [--shards ...] [--labels none|end]``, which
set ``LUO_POOL``, ``LUO_POOL_SHARDS`` and ``LUO_POOL_LABELS`` in the host's environment. That
environment is what every later host inherits (a successor is started by its predecessor), so the
successor is asked for the same layout unless the update says otherwise (``luo update --to
'env LUO_POOL_SHARDS=... python3 -m luo'``); a layout that differs from the preserved one refuses
the update at prepare.

Crossing: the pool's memfd is a memfd-v1 file, token 0, of the host's own session ``luo:pool``;
the pool's map is the tree's ``pool-map`` node. The successor takes both at prepare (it checks the
layout then, before anything is frozen) and, once it serves, retrieves and finishes the incoming
``luo:pool`` session and preserves the memfd anew in an outgoing one, as any client does with its
session.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from luo import abi
from luo.core.participants import Subsystem
from luo.errors import LuoError
from luo.host import fields
from luo.host.wire import ok
from luo.pool.extents import GIGA_ORDER, GRANULE_ORDER, Extent
from luo.pool.spec import Layout, make_layout

if TYPE_CHECKING:
    from luo.core.orchestrator import Orchestrator
    from luo.host.daemon import Conn, Host, Reply
    from luo.pool.service import PoolService

log = logging.getLogger("luod")

ENV_POOL, ENV_SHARDS, ENV_LABELS = "LUO_POOL", "LUO_POOL_SHARDS", "LUO_POOL_LABELS"
POOL_TOKEN = 0
HUGEPAGES_FILE = "pool.hugepages-added"  # in the runtime dir: what the pool's creator added to
# vm.nr_hugepages, for whichever host stops the pool for good (it outlives the host that made it)


def _hugepages_added(runtime_root: Path) -> int:
    try:
        return max(0, int((runtime_root / HUGEPAGES_FILE).read_text()))
    except (OSError, ValueError):
        return 0


def _created(runtime_root: Path, pool: PoolService | None) -> PoolService | None:
    if pool is not None and pool.memory.hugepages_added:
        from luo.host.runtime import write_atomic

        write_atomic(runtime_root / HUGEPAGES_FILE, f"{pool.memory.hugepages_added}\n")
    return pool


def stop_pool(runtime_root: Path, pool: PoolService) -> None:
    """A host that stops for good (not handed over): its fd of the pool goes (VMMs that still map
    it, and the fd store, keep the pages), and of the huge pages the pool's creator added, those
    no longer in use go back; the rest stay recorded for whichever host takes the pool back."""
    from luo.pool.memory import give_back_hugepages

    added = pool.memory.hugepages_added
    pool.memory.close(give_back=False)
    try:
        left = added - give_back_hugepages(added)
    except LuoError as e:
        log.warning("pool: cannot give back huge pages: %s", e)
        left = added
    if left > 0:
        from luo.host.runtime import write_atomic

        write_atomic(runtime_root / HUGEPAGES_FILE, f"{left}\n")
    else:
        (runtime_root / HUGEPAGES_FILE).unlink(missing_ok=True)


def asked_layout(env: dict[str, str] | None = None) -> Layout | None:
    """The layout this host was started with (None: no pool asked). EINVAL for a bad one."""
    env = dict(os.environ) if env is None else env
    pool = env.get(ENV_POOL, "").strip()
    if not pool:
        if env.get(ENV_SHARDS) or env.get(ENV_LABELS):
            raise LuoError(errno.EINVAL, f"{ENV_SHARDS}/{ENV_LABELS} (--shards/--labels) need a pool (--pool)")
        return None
    return make_layout(pool, env.get(ENV_SHARDS, ""), env.get(ENV_LABELS, "") or "none")


def create_pool(layout: Layout | None) -> PoolService | None:
    from luo.pool.service import PoolService

    return None if layout is None else PoolService.create(layout)


def pool_from_handover(blob: bytes, fds: list[int], runtime_root: Path) -> PoolService | None:
    """The outgoing host's pool, from the tree and the handed-over fds, checked against the layout
    this host was asked for; no pool in the tree and one asked: a new pool. Runs at prepare."""
    from luo.kho import parse_pool
    from luo.pool.service import PoolService

    asked = asked_layout()
    pmap = parse_pool(blob, fd_count=len(fds))
    if pmap is None:
        return _created(runtime_root, create_pool(asked))
    fd = os.dup(fds[pmap.fd_index])
    try:
        return PoolService.adopt(pmap, fd, asked, _hugepages_added(runtime_root))
    except BaseException:
        os.close(fd)
        raise


def pool_at_start(runtime_root: Path, orch: Orchestrator, recovered: dict[str, Any]) -> PoolService | None:
    """The first host's pool: a new one as asked, or, after a crash of the previous host (the fd
    store gave back its sessions, ``recovered``), the same memfd with the map it last wrote to
    ``<runtime>/pool.dtb``: every extent then waits, preserved, for its owner to claim it again."""
    from luo.pool.service import PoolService
    from luo.pool.tree import read_pool_dtb

    asked = asked_layout()
    held = recovered.get(abi.POOL_SESSION)
    if held is None:
        pool = _created(runtime_root, create_pool(asked))
        if pool is not None:
            preserve_pool(orch, pool)
        return pool
    fd = held._session.files.get(POOL_TOKEN).fd  # the session stays as it is: preserved, ours
    try:
        pmap = read_pool_dtb((runtime_root / "pool.dtb").read_bytes())
    except (OSError, LuoError) as e:
        raise LuoError(errno.EIO, f"the pool's memfd came back from the fd store, but its map "
                       f"{runtime_root / 'pool.dtb'} cannot be read ({e}); refusing to guess whose memory is "
                       "whose") from None
    mine = os.dup(fd)
    try:
        pool = PoolService.adopt(pmap, mine, asked, _hugepages_added(runtime_root))
    except BaseException:
        os.close(mine)
        raise
    recovered.pop(abi.POOL_SESSION)  # the host's own: no client will claim it
    log.warning("pool: taken back after a crash of the previous host: %d extents wait for their owners",
                len(pmap.extents))
    return pool


def preserve_pool(orch: Orchestrator, pool: PoolService) -> None:
    """The pool's memfd into the host's own session (a new host, or after the takeover)."""
    from luo.core.participants import Owner

    h = orch.create_session(abi.POOL_SESSION, Owner(pid=os.getpid(), comm="luod", program="the memory pool"))
    fd = os.dup(pool.memory.fd)
    try:
        h.preserve_fd(fd, POOL_TOKEN)
    except BaseException:
        os.close(fd)
        raise


def take_over(orch: Orchestrator, pool: PoolService) -> None:
    """After the update: retrieve and finish the incoming ``luo:pool`` session (the pool already
    holds the memfd, from prepare), then preserve it anew for the next update."""
    try:
        h = orch.retrieve_session(abi.POOL_SESSION)
        os.close(h.retrieve_fd(POOL_TOKEN))
        h.finish()
    except LuoError as e:  # a new pool (none was handed over) has no incoming session
        if e.errno != errno.ENOENT:
            raise
    preserve_pool(orch, pool)


def pool_fd_index(orch: Orchestrator) -> int:
    """Which handover fd carries the pool's memfd in the tree this host would write now."""
    record, _ = orch.outgoing_record()
    for s in record.sessions:
        if s.name == abi.POOL_SESSION:
            for f in s.files:
                if f.token == POOL_TOKEN:
                    return f.fd_index
    raise LuoError(errno.ENOENT, f"the pool's memfd is not in session {abi.POOL_SESSION!r}")


class PoolSubsystem(Subsystem):
    """``pool``: no change to the pool while an update is under way (its map is the successor's
    from prepare on); on the new host, ``finish`` releases what nobody claimed. Its u64 is the
    pool's size, which the successor checks against the map."""

    name = abi.POOL_SUBSYSTEM

    def __init__(self, host: Host) -> None:
        self.host = host

    @property
    def pool(self) -> PoolService:
        assert self.host.pool is not None
        return self.host.pool

    def prepare(self) -> int:
        self.pool.frozen = True
        return self.pool.layout.pool.size

    def freeze(self, data: int) -> int:
        return data

    def cancel(self, data: int) -> None:
        self.pool.frozen = False

    def finish(self, data: int) -> None:
        self.pool.frozen = False
        if data and data != self.pool.layout.pool.size:
            log.error("pool: the outgoing host's pool was %d bytes, this one is %d", data, self.pool.layout.pool.size)
        if self.pool.finish():
            self.host.pool_changed()


# -- ops ------------------------------------------------------------------------------------------


def _pool(host: Host) -> PoolService:
    if host.pool is None:
        raise LuoError(errno.ENODEV, "this host has no memory pool (start it with --pool SIZE[:hugetlb|:shmem])")
    return host.pool


def _extent(e: Extent) -> dict[str, Any]:
    return {"offset": e.offset, "length": e.length, "order": e.order, "owner": e.owner, "state": e.state}


class _Status:
    """``luo status`` (and its JSON) carries the pool's."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def status(self) -> dict[str, Any]:
        return {"pool": self.host.pool.status()} if self.host.pool is not None else {}


def install(host: Host) -> None:
    def pool_status(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "pool_status")
        return ok(pool=_pool(host).status()), []

    def pool_alloc(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Extents for ``owner``, and the pool's memfd to map them from."""
        fields.no_fds(fds, "pool_alloc")
        pool = _pool(host)
        owner = fields.text(msg, "owner", 64)
        size = fields.size(msg, "size", 1, 1 << 52)
        order = GIGA_ORDER if fields.boolean(msg, "giga", False) else GRANULE_ORDER
        got = pool.allocate(owner, size, order)
        host.pool_changed()
        return ok(extents=[_extent(e) for e in got], size=pool.layout.pool.size), [os.dup(pool.memory.fd)]

    def pool_claim(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Restore one preserved extent after an update, exactly once (EINVAL the second time)."""
        fields.no_fds(fds, "pool_claim")
        pool = _pool(host)
        e = pool.claim(fields.text(msg, "owner", 64), fields.u64(msg, "offset"))
        host.pool_changed()
        return ok(extent=_extent(e)), [os.dup(pool.memory.fd)]

    def pool_free(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Free an owner's extents. A VM's RAM only with ``force``, and never while its VM is known
        (``luo vm stop`` frees it): after a crash or an update its VMM may not have registered yet."""
        fields.no_fds(fds, "pool_free")
        pool = _pool(host)
        owner = fields.text(msg, "owner", 64)
        force = fields.boolean(msg, "force", False)
        if owner.startswith(abi.VM_SESSION_PREFIX):
            name = owner[len(abi.VM_SESSION_PREFIX):]
            if host.vms is not None and (name in host.vms.vms or name in host.vms.expected):
                raise LuoError(errno.EBUSY, f"{owner} is the RAM of VM {name!r}: `luo vm stop {name}` frees it")
            if not force:
                raise LuoError(errno.EBUSY, f"{owner} is a VM's RAM, whose VMM may still run and register again; "
                               "free it with --force only once that VM is surely gone")
        freed = pool.free(owner)
        if not freed:
            raise LuoError(errno.ENOENT, f"{owner} holds nothing in the pool")
        host.pool_changed()
        return ok(freed=[_extent(e) for e in freed]), []

    def pool_shard_list(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "pool_shard_list")
        return ok(shards=_pool(host).status()["shards"]), []

    def pool_shard_create(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "pool_shard_create")
        s = _pool(host).shard_create(fields.size(msg, "size", 1, 1 << 52),
                                      fields.choice(msg, "mode", ("devdax", "fsdax"), "devdax"))
        host.pool_changed()
        return ok(shard={"name": s.name, "mode": s.mode, "offset": s.offset, "size": s.size}), []

    def pool_shard_delete(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "pool_shard_delete")
        _pool(host).shard_delete(fields.text(msg, "name", 15))
        host.pool_changed()
        return ok(), []

    def pool_shard_open(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """A shard, whole, for one owner: the pool's memfd with the shard's offset and size."""
        fields.no_fds(fds, "pool_shard_open")
        pool = _pool(host)
        s = pool.shard_open(fields.text(msg, "name", 15), fields.text(msg, "owner", 64))
        host.pool_changed()
        return ok(shard={"name": s.name, "mode": s.mode, "offset": s.offset, "size": s.size, "owner": s.owner}), \
            [os.dup(pool.memory.fd)]

    def pool_shard_mount(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """An fsdax shard's file system mounted on ``dir`` (made on first mount)."""
        fields.no_fds(fds, "pool_shard_mount")
        s = _pool(host).shard_mount(fields.text(msg, "name", 15), Path(fields.text(msg, "dir", 48)))
        host.pool_changed()
        return ok(shard={"name": s.name, "mode": s.mode, "offset": s.offset, "size": s.size, "owner": s.owner}), []

    def pool_shard_umount(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "pool_shard_umount")
        _pool(host).shard_umount(fields.text(msg, "name", 15))
        host.pool_changed()
        return ok(), []

    def pool_shard_release(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "pool_shard_release")
        _pool(host).shard_release(fields.text(msg, "name", 15), fields.text(msg, "owner", 64))
        host.pool_changed()
        return ok(), []

    host.extensions.append(_Status(host))
    host.ops.update({
        "pool_status": (pool_status, False), "pool_alloc": (pool_alloc, True), "pool_claim": (pool_claim, True),
        "pool_free": (pool_free, True), "pool_shard_list": (pool_shard_list, False),
        "pool_shard_create": (pool_shard_create, True), "pool_shard_delete": (pool_shard_delete, True),
        "pool_shard_open": (pool_shard_open, True), "pool_shard_release": (pool_shard_release, True),
        "pool_shard_mount": (pool_shard_mount, True), "pool_shard_umount": (pool_shard_umount, True),
    })
