"""The pool as a host runs it: its memory, its layout, the allocator, the shards, and the rules
that tie them to the update (docs/pool.md).

One object per host. The first host creates the pool (``create``); every later one takes it over
from the handover (``adopt``): the same memfd, and the map from the tree, every extent then
``preserved`` until its owner claims it back, once (``claim``), or ``finish`` scrubs and frees
what nobody claimed. Between prepare and the end of the update (``frozen``) nothing changes: the
map the successor received at prepare is the map of the final tree, as KHO refuses new
preservations once finalized (EBUSY).

Shards:

- from the command line (``--shards``): the layout places them; label-less, the command line *is*
  the label, and a successor started with another layout is refused at prepare;
- made at run time (``--labels end``): carved from the general area as one contiguous extent of
  owner ``shard:NAME`` (so the allocator never hands it out), and named in the end-label area, two
  checksummed copies in the pool's last 128 KiB, which the next host reads back.

A shard is handed to one owner whole (``shard_open``: the pool fd, its offset and length).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luo.abi import VM_SESSION_PREFIX
from luo.errors import LuoError
from luo.pool import labels as lbl
from luo.pool.extents import GRANULE, GRANULE_ORDER, Allocator, Extent, validate_owner
from luo.pool.memmap import PoolMap, ShardRecord, shard_records
from luo.pool.memory import PoolMemory
from luo.pool.spec import LABEL_AREA_SIZE, Layout

log = logging.getLogger("luod")

SHARD_OWNER_PREFIX = "shard:"
MOUNT_OWNER_PREFIX = "mount:"  # an fsdax shard mounted by the host: its owner is the mount point
VM_OWNER_PREFIX = VM_SESSION_PREFIX  # a VM owns its extents under its session's name


@dataclass
class PoolService:
    memory: PoolMemory
    layout: Layout
    alloc: Allocator
    shard_owners: dict[str, str] = field(default_factory=dict)  # shard name -> its owner
    labels: list[lbl.ShardLabel] = field(default_factory=list)  # run-time shards (--labels end)
    label_generation: int = 0
    frozen: bool = False  # an update is under way: the map is the successor's already
    claimed_at_start: int = 0  # extents taken back at takeover by the host for VMs and shards
    created_here: bool = False  # made by this process (not handed over): its to undo if it never serves

    # -- making one --------------------------------------------------------------------------
    @classmethod
    def create(cls, layout: Layout) -> PoolService:
        memory = PoolMemory.create(layout.pool.size, layout.pool.backing)
        start, length = layout.general
        svc = cls(memory, layout, Allocator(start, length, memory.scrub), created_here=True)
        if layout.labels == "end":
            svc._write_labels()  # an empty, valid label area: what the pool says from the start
        log.info("pool: %s created (%d MiB, %s)", layout.describe(), layout.pool.size >> 20, layout.pool.backing)
        return svc

    @classmethod
    def adopt(cls, pmap: PoolMap, fd: int, asked: Layout | None, hugepages_added: int = 0) -> PoolService:
        """The pool of the outgoing host: the same memfd (``fd``, ours from here) and its map.
        ``asked``: the layout this host was started with, which must be the preserved one."""
        if asked is not None:
            from luo.pool.spec import check_same

            check_same(pmap.layout, asked)
        memory = PoolMemory.adopt(fd, pmap.layout.pool.backing, hugepages_added)
        if memory.size != pmap.layout.pool.size:
            raise LuoError(errno.EINVAL, f"the pool memfd holds {memory.size} bytes, its map says "
                           f"{pmap.layout.pool.size}")
        start, length = pmap.layout.general
        # run-time shards are listed as shards in the map; in the allocator they are extents of
        # owner shard:NAME (so it never hands them out), taken back here at once: shards persist whole
        runtime_shards = [Extent(s.offset, s.size, GRANULE_ORDER, SHARD_OWNER_PREFIX + s.name, "preserved")
                          for s in pmap.shards[len(pmap.layout.placed):]]
        alloc = Allocator.from_preserved(start, length, [*pmap.extents, *runtime_shards], memory.scrub)
        for e in runtime_shards:
            alloc.claim(e.owner, e.offset)
        svc = cls(memory, pmap.layout, alloc, shard_owners={s.name: s.owner for s in pmap.shards if s.owner},
                  claimed_at_start=len(runtime_shards))
        if pmap.layout.labels == "end":
            svc.label_generation, svc.labels = lbl.decode_labels(svc.memory.read(*svc.label_area))
            listed = sorted((s.name, s.offset, s.size) for s in pmap.shards[len(pmap.layout.placed):])
            if sorted((s.name, s.offset, s.size) for s in svc.labels) != listed:
                raise LuoError(errno.EINVAL, "the pool's end labels and its map disagree about the run-time shards; "
                               "refusing to guess which is right")
        return svc

    # -- the map -----------------------------------------------------------------------------
    def map(self, fd_index: int) -> PoolMap:
        """What the tree says of the pool: every live extent, preserved, and every shard."""
        extents = tuple(e for e in self.alloc.preserve_all() if not e.owner.startswith(SHARD_OWNER_PREFIX))
        return PoolMap(self.layout, fd_index, extents, shard_records(self.layout, self.labels, self.shard_owners))

    # -- extents -----------------------------------------------------------------------------
    def _changing(self, what: str) -> None:
        if self.frozen:
            raise LuoError(errno.EBUSY, f"cannot {what} during a live update: the pool's map is handed over "
                           "already; retry after `luo finish` or `luo cancel`")

    def allocate(self, owner: str, size: int, order: int = GRANULE_ORDER) -> list[Extent]:
        self._changing("allocate from the pool")
        validate_owner(owner)
        if owner.startswith(SHARD_OWNER_PREFIX):
            raise LuoError(errno.EINVAL, f"owner {owner!r}: names starting with {SHARD_OWNER_PREFIX!r} are the "
                           "pool's own (run-time shards)")
        return self.alloc.alloc(owner, size, order)

    def claim(self, owner: str, offset: int) -> Extent:
        """Restore one preserved extent, exactly once (``kho_restore_folio``): EINVAL the second
        time, ENOENT for an offset no preserved extent starts at, EPERM for another's."""
        return self.alloc.claim(validate_owner(owner), offset)

    def adopt_vm(self, name: str, extents: list[tuple[int, int]]) -> None:
        """A VM's VMM registered with guest RAM in these extents: after an update (or a crash)
        they are claimed for it; on the host that allocated them they must be its already. Any
        extent that is not the VM's refuses the registration (EPERM/ENOENT): two VMs never share
        memory."""
        owner = VM_OWNER_PREFIX + name
        mine = {e.offset: e for e in self.alloc.extents_of(owner)}
        for off, length in extents:
            e = mine.get(off)
            if e is None or e.length != length:
                raise LuoError(errno.EPERM, f"VM {name!r} registers pool extent {off:#x}+{length:#x}, which is "
                               f"not one of its own ({self._describe(owner)})")
            if e.state == "preserved":
                self.alloc.claim(owner, off)

    def free(self, owner: str) -> list[Extent]:
        """Give back every extent of ``owner``, scrubbed at once: the one who frees pays, not the
        next owner's start (a 1 GiB hugetlb extent takes about 0.1 s). A scrub that fails leaves
        the range dirty, scrubbed again before it is handed out."""
        self._changing("free pool memory")
        if owner.startswith((SHARD_OWNER_PREFIX, MOUNT_OWNER_PREFIX)):
            raise LuoError(errno.EPERM, f"{owner}'s memory is a shard's: `luo pool shard delete` (or umount) it")
        freed = self.alloc.free(validate_owner(owner))
        try:
            self.alloc.scrub_dirty(freed)  # only what was freed: the rest waits for its allocation
        except LuoError as e:
            log.warning("pool: scrubbing what %s freed failed (%s); it is scrubbed before its next use", owner, e)
        return freed

    def finish(self) -> list[Extent]:
        """LUO finish: what no owner claimed is released (scrubbed before its next use), except a
        VM's RAM: its VMM may register late (a fallback, a slow successor), and a guest's memory is
        only ever released by ``luo vm stop`` (or ``luo pool free --force`` once it is surely gone)."""
        released = self.alloc.finish(keep=lambda owner: owner.startswith(VM_OWNER_PREFIX))
        for e in released:
            log.warning("pool: %s of %s was never claimed after the update; released", _span(e), e.owner)
        return released

    def _describe(self, owner: str) -> str:
        es = self.alloc.extents_of(owner)
        return ", ".join(_span(e) for e in es) or "none"

    # -- shards ------------------------------------------------------------------------------
    @property
    def label_area(self) -> tuple[int, int]:
        return self.layout.pool.size - LABEL_AREA_SIZE, LABEL_AREA_SIZE

    def shards(self) -> list[ShardRecord]:
        return list(shard_records(self.layout, self.labels, self.shard_owners))

    def shard(self, name: str) -> ShardRecord:
        for s in self.shards():
            if s.name == name:
                return s
        raise LuoError(errno.ENOENT, f"the pool has no shard {name!r} (it has: "
                       f"{', '.join(s.name for s in self.shards()) or 'none'})")

    def shard_open(self, name: str, owner: str) -> ShardRecord:
        """Hand shard ``name`` to ``owner`` whole; the same owner may open it again (after an
        update, say), anyone else gets EBUSY until it is released."""
        validate_owner(owner)
        s = self.shard(name)
        if s.owner and s.owner != owner:
            raise LuoError(errno.EBUSY, f"shard {name} belongs to {s.owner}")
        if s.owner != owner:
            self._changing("hand out a shard")
            self.shard_owners[name] = owner
        return self.shard(name)

    def shard_mount(self, name: str, target: Path) -> ShardRecord:
        """An fsdax shard as a file system on ``target`` (luo.pool.fsdax); its owner is the mount."""
        from luo.pool import fsdax

        s = self.shard(name)
        if s.mode != "fsdax":
            raise LuoError(errno.EINVAL, f"shard {name} is {s.mode}: only an fsdax shard holds a file system")
        owner = MOUNT_OWNER_PREFIX + str(target)
        if s.owner:
            raise LuoError(errno.EBUSY, f"shard {name} belongs to {s.owner}")
        self._changing("mount a shard")
        validate_owner(owner)
        fsdax.mount(self.memory.fd, self.layout.pool.backing, s.offset, s.size, target)
        self.shard_owners[name] = owner
        return self.shard(name)

    def shard_umount(self, name: str) -> None:
        from luo.pool import fsdax

        s = self.shard(name)
        if not s.owner.startswith(MOUNT_OWNER_PREFIX):
            raise LuoError(errno.EINVAL, f"shard {name} is not mounted (owner: {s.owner or 'nobody'})")
        self._changing("unmount a shard")
        fsdax.umount(Path(s.owner[len(MOUNT_OWNER_PREFIX):]))
        self.shard_owners.pop(name, None)

    def shard_release(self, name: str, owner: str) -> None:
        """``owner`` gives its shard back (EPERM for someone else's; a mount goes by umount)."""
        s = self.shard(name)
        if s.owner.startswith(MOUNT_OWNER_PREFIX):
            raise LuoError(errno.EBUSY, f"shard {name} is mounted ({s.owner[len(MOUNT_OWNER_PREFIX):]}): umount it")
        if s.owner != owner:
            raise LuoError(errno.EPERM, f"shard {name} belongs to {s.owner or 'nobody'}, not {owner}")
        self._changing("release a shard")
        self.shard_owners.pop(name, None)

    def shard_create(self, size: int, mode: str) -> ShardRecord:
        """A run-time shard (``--labels end`` only): one contiguous extent, named in the labels."""
        self._changing("create a shard")
        if self.layout.labels != "end":
            raise LuoError(errno.EOPNOTSUPP, "this pool has no label area (started with --labels none): its "
                           "shards are the command line's; start the first host with --labels end to make "
                           "shards at run time")
        name = _next_name(self.shards())
        owner = SHARD_OWNER_PREFIX + name
        got = self.alloc.alloc(owner, size)
        if len(got) != 1:
            self.alloc.free(owner)
            raise LuoError(errno.ENOSPC, f"no contiguous {size >> 20} MiB run is free in the pool for a shard "
                           f"(largest free extent {self.alloc.stats().largest_free >> 20} MiB)")
        e = got[0]
        try:
            new = [*self.labels, lbl.ShardLabel(name, mode, e.offset, e.length)]  # type: ignore[arg-type]
            lbl.check_labels(new, self.layout.general)
        except LuoError:
            self.alloc.free(owner)
            raise
        self.labels = new
        self._write_labels()
        return self.shard(name)

    def shard_delete(self, name: str) -> None:
        self._changing("delete a shard")
        if not any(s.name == name for s in self.labels):
            if any(p.name == name for p in self.layout.placed):
                raise LuoError(errno.EPERM, f"shard {name} is the command line's (--shards): it is the layout, "
                               "not a label; it can only go with another layout on a new pool")
            raise LuoError(errno.ENOENT, f"no run-time shard {name!r}")
        self.labels = lbl.delete_shard(self.labels, name, claimed=bool(self.shard_owners.get(name)))
        self._write_labels()
        self.alloc.free(SHARD_OWNER_PREFIX + name)  # scrubbed before the space is used again

    def _write_labels(self) -> None:
        """Primary copy, then the backup (each written whole): a torn write leaves one valid."""
        self.label_generation += 1
        area = lbl.encode_labels(self.labels, self.label_generation)
        off, _ = self.label_area
        self.memory.write(off + lbl.PRIMARY_OFFSET, area[: lbl.COPY_SIZE])
        self.memory.write(off + lbl.BACKUP_OFFSET, area[lbl.BACKUP_OFFSET:])

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st = self.alloc.stats()
        shards = self.shards()
        return {
            "layout": self.layout.describe(), "backing": self.layout.pool.backing, "size": self.layout.pool.size,
            "general": {"offset": self.layout.general[0], "size": self.layout.general[1]},
            "free": st.free, "largest_free_extent": st.largest_free, "dirty_bytes": st.dirty_bytes,
            "owners": {o: {"bytes": n, "extents": [[e.offset, e.length, e.state] for e in self.alloc.extents_of(o)]}
                       for o, n in sorted(st.allocated.items())},
            "shards": [{"name": s.name, "mode": s.mode, "offset": s.offset, "size": s.size, "owner": s.owner}
                       for s in shards],
            "labels": self.layout.labels, "label_generation": self.label_generation,
            "memory": self.memory.usage(), "frozen": self.frozen,
        }

    def save_dtb(self, path: Path, fd_index: int = 0) -> None:
        """The map as a standalone DTB (``dtc -I dtb``), rewritten on every change: for the
        operator, and for a host that restarts after a crash (the memfd is in the fd store)."""
        from luo.pool.tree import pool_dtb

        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pool_dtb(self.map(fd_index)))
        os.replace(tmp, path)


def _span(e: Extent) -> str:
    return f"{e.offset:#x}+{e.length >> 20}MiB"


def _next_name(shards: list[ShardRecord]) -> str:
    taken = {s.name for s in shards}
    i = 0
    while f"shard{i}" in taken:
        i += 1
    return f"shard{i}"


__all__ = ["GRANULE", "PoolService"]
