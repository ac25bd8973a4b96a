"""``luo pool ...``: the host's memory pool (docs/pool.md)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from luo.cli_vm import host_client, subcommand
from luo.client import pool as lp


def _mib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def format_pool(p: dict[str, Any]) -> list[str]:
    mem = p.get("memory", {})
    out = [f"pool: {p['layout']}  {_mib(p['size'])} {p['backing']}"
           + (f" ({mem.get('huge_pages')} huge pages of 2 MiB)" if p["backing"] == "hugetlb" else "")
           + ("  [frozen for a live update]" if p.get("frozen") else ""),
           f"  general area {_mib(p['general']['size'])} at {p['general']['offset']:#x}: free {_mib(p['free'])}, "
           f"largest free extent {_mib(p['largest_free_extent'])}"
           + (f", {_mib(p['dirty_bytes'])} to scrub before reuse" if p.get("dirty_bytes") else "")]
    for owner, o in p.get("owners", {}).items():
        states = sorted({e[2] for e in o["extents"]})
        out.append(f"  {owner:<24} {_mib(o['bytes']):>10} in {len(o['extents'])} extent(s) ({', '.join(states)})")
    for s in p.get("shards", []):
        out.append(f"  shard {s['name']:<8} {s['mode']:<7} {_mib(s['size']):>10} at {s['offset']:#x}"
                   f"  {('owner ' + s['owner']) if s['owner'] else 'unclaimed'}")
    if p.get("labels") == "end":
        out.append(f"  labels: at the end of the pool, generation {p.get('label_generation')}")
    return out


def cmd_pool_status(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        p = lp.status(c)
    print(json.dumps(p, indent=2) if args.json else "\n".join(format_pool(p)))
    return 0


def cmd_pool_alloc(args: argparse.Namespace) -> int:
    from luo.host.fields import parse_size

    with host_client(args) as c:
        fd, extents = lp.alloc(c, args.owner, parse_size("size", args.size))
    os.close(fd)
    for e in extents:
        print(f"{e.owner}: {e.offset:#x}+{_mib(e.length)}")
    return 0


def cmd_pool_free(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        freed = lp.free(c, args.owner, args.force)
    print(f"{args.owner}: {len(freed)} extent(s) freed ({_mib(sum(e.length for e in freed))}), scrubbed before reuse")
    return 0


def cmd_shard_list(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        shards = lp.shards(c)
    if args.json:
        print(json.dumps(shards, indent=2))
    for s in [] if args.json else shards:
        print(f"{s['name']:<8} {s['mode']:<7} {_mib(s['size']):>10} at {s['offset']:#x}  {s['owner'] or 'unclaimed'}")
    return 0


def cmd_shard_create(args: argparse.Namespace) -> int:
    from luo.host.fields import parse_size

    with host_client(args) as c:
        s = lp.shard_create(c, parse_size("size", args.size), args.mode)
    print(f"{s['name']}: {s['mode']} {_mib(s['size'])} at {s['offset']:#x} (written to the pool's labels)")
    return 0


def cmd_shard_delete(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        lp.shard_delete(c, args.name)
    print(f"{args.name}: deleted; its memory is scrubbed before reuse")
    return 0


def cmd_shard_mount(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        reply, _ = c.call("pool_shard_mount", name=args.name, dir=os.path.abspath(args.dir), retry=False)
    s = reply["shard"]
    print(f"{s['name']}: ext4 on {_mib(s['size'])} of the pool at {s['offset']:#x}, mounted on {args.dir}")
    return 0


def cmd_shard_umount(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        c.call("pool_shard_umount", name=args.name, retry=False)
    print(f"{args.name}: unmounted; its file system stays in the shard")
    return 0


def add_pool_commands(sub: Any) -> None:
    sp = subcommand

    pool = sub.add_parser("pool", help="the host's memory pool (luo host --pool)")
    psub = pool.add_subparsers(dest="pool_command", required=True)
    s = sp(psub, "status", cmd_pool_status, "total, free, per owner and per shard, huge pages, largest free extent")
    s.add_argument("--json", action="store_true")
    s = sp(psub, "alloc", cmd_pool_alloc, "allocate extents for an owner (they cross updates until freed)")
    s.add_argument("owner")
    s.add_argument("size")
    s = sp(psub, "free", cmd_pool_free, "free every extent of an owner (scrubbed before reuse)")
    s.add_argument("owner")
    s.add_argument("--force", action="store_true",
                   help="also a VM's RAM the host no longer knows (after a crash, a VM whose VMM never came back)")
    shard = psub.add_parser("shard", help="shards of the pool")
    ssub = shard.add_subparsers(dest="shard_command", required=True)
    s = sp(ssub, "list", cmd_shard_list, "list the shards")
    s.add_argument("--json", action="store_true")
    s = sp(ssub, "create", cmd_shard_create, "make a shard at run time (a pool with --labels end)")
    s.add_argument("size")
    s.add_argument("--mode", choices=("devdax", "fsdax"), default="devdax")
    s = sp(ssub, "delete", cmd_shard_delete, "delete a run-time shard")
    s.add_argument("name")
    s = sp(ssub, "mount", cmd_shard_mount, "mount an fsdax shard's file system (ext4, made on first mount)")
    s.add_argument("name")
    s.add_argument("dir")
    s = sp(ssub, "umount", cmd_shard_umount, "unmount an fsdax shard")
    s.add_argument("name")


__all__ = ["add_pool_commands", "format_pool"]
