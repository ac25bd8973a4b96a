"""An fsdax shard as a file system: its range of the pool attached to a loop device and mounted.

Why this way: what a user of an fsdax namespace expects is a file system at a path, not an API.
The kernel's loop driver attaches any part of a file (``--offset``, ``--sizelimit``), and the pool
is a file; the file system (ext4, made on first mount when the shard holds none) then lives in the
shard's own bytes, so it crosses every update with the pool, and stays mounted across them (the
mount and its loop device belong to the kernel, not to a luo process).

Only a shmem pool: the loop driver writes through ``write_iter``, which hugetlbfs does not have, so
a hugetlb pool's fsdax shard is refused (EOPNOTSUPP) with that reason; its devdax use (the
pool's fd with offset and size) works on both.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from luo.errors import LuoError

EXT4_MAGIC_AT = 1024 + 56  # the superblock's s_magic, 0xEF53 little-endian
EXT4_MAGIC = b"\x53\xef"


def _run(argv: list[str], what: str) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LuoError(errno.EIO, f"{what}: {argv[0]} failed ({e})") from None
    if cp.returncode != 0:
        raise LuoError(errno.EIO, f"{what}: {' '.join(argv[:2])} exited {cp.returncode}: {cp.stderr.strip()[:300]}")
    return cp.stdout.strip()


def mount(pool_fd: int, backing: str, offset: int, size: int, target: Path) -> str:
    """Attach [offset, offset+size) of the pool to a loop device, make ext4 on it if it holds none,
    mount it on ``target`` (created if missing, must be empty); returns the loop device."""
    if backing != "shmem":
        raise LuoError(errno.EOPNOTSUPP, "an fsdax shard of a hugetlb pool cannot be mounted: the loop driver "
                       "writes with write_iter, which hugetlbfs lacks; use a shmem pool (--pool SIZE:shmem) for "
                       "fsdax shards, or use the shard as devdax (pool_shard_open)")
    if not target.is_absolute():
        raise LuoError(errno.EINVAL, f"the mount point must be an absolute path, not {str(target)!r}")
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise LuoError(errno.ENOTEMPTY, f"{target} is not empty: mount an fsdax shard on an empty directory")
    dev = _run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size),
                f"/proc/{os.getpid()}/fd/{pool_fd}"], "attaching the shard")
    try:
        if os.pread(pool_fd, 2, offset + EXT4_MAGIC_AT) != EXT4_MAGIC:
            _run(["mkfs.ext4", "-q", "-F", "-L", "luo-fsdax", dev], "making its file system")
        _run(["mount", "-t", "ext4", dev, str(target)], "mounting it")
    except LuoError:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
        raise
    return dev


def umount(target: Path) -> None:
    """Unmount and detach the loop device (the file system stays in the shard's bytes)."""
    dev = _run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(target)], f"finding the mount on {target}")
    _run(["umount", str(target)], "unmounting the shard")
    if dev.startswith("/dev/loop"):
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
