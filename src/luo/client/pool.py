"""libluo's memory pool calls (docs/pool.md): extents and shards of the host's pool.

Each call that hands out memory returns the pool's memfd (a new fd, the caller's to close) with
what to map of it: ``mmap(fd, length, offset=offset)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from luo.client.client import Client


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    order: int
    owner: str
    state: str


def _extent(d: dict[str, Any]) -> Extent:
    return Extent(int(d["offset"]), int(d["length"]), int(d["order"]), str(d["owner"]), str(d["state"]))


def status(c: Client) -> dict[str, Any]:
    reply, _ = c.call("pool_status")
    return dict(reply["pool"])


def alloc(c: Client, owner: str, size: int, giga: bool = False) -> tuple[int, list[Extent]]:
    """Extents of ``size`` bytes (2 MiB pages; 1 GiB with ``giga``) for ``owner``: (pool fd, extents).
    They cross every update with the pool until ``free``; after one, ``claim`` each back once."""
    reply, fds = c.call("pool_alloc", owner=owner, size=int(size), giga=giga, retry=False)
    return fds[0], [_extent(e) for e in reply["extents"]]


def claim(c: Client, owner: str, offset: int) -> tuple[int, Extent]:
    """After an update: the preserved extent at ``offset``, once (EINVAL the second time, ENOENT
    for an offset no preserved extent starts at). Unclaimed at ``luo finish``: released."""
    reply, fds = c.call("pool_claim", owner=owner, offset=int(offset), retry=False)
    return fds[0], _extent(reply["extent"])


def free(c: Client, owner: str, force: bool = False) -> list[Extent]:
    """Give back ``owner``'s extents (scrubbed at once). A VM's RAM needs ``force`` (and is refused
    while the host knows the VM: ``luo vm stop`` frees it)."""
    reply, _ = c.call("pool_free", owner=owner, force=force, retry=False)
    return [_extent(e) for e in reply["freed"]]


def shards(c: Client) -> list[dict[str, Any]]:
    reply, _ = c.call("pool_shard_list")
    return list(reply["shards"])


def shard_create(c: Client, size: int, mode: str = "devdax") -> dict[str, Any]:
    reply, _ = c.call("pool_shard_create", size=int(size), mode=mode, retry=False)
    return dict(reply["shard"])


def shard_delete(c: Client, name: str) -> None:
    c.call("pool_shard_delete", name=name, retry=False)


def shard_open(c: Client, name: str, owner: str) -> tuple[int, dict[str, Any]]:
    """Shard ``name`` whole for ``owner``: (pool fd, {offset, size, mode, ...})."""
    reply, fds = c.call("pool_shard_open", name=name, owner=owner, retry=False)
    return fds[0], dict(reply["shard"])


def shard_release(c: Client, name: str) -> None:
    c.call("pool_shard_release", name=name, retry=False)
