"""The paused VM's record, written into a preserved memfd of fixed size.

The memfd is preserved in the VM's session from the VM's start, so nothing is preserved inside
the blackout (preserving is refused while prepared or frozen, as upstream): freeze only writes
into it, which the frozen size allows.
"""

from __future__ import annotations

import errno
import os
import struct

from luo.abi import VMM_STATEFILE_MAGIC
from luo.errors import LuoError

STATE_BYTES = 4 << 20
HEADER = struct.Struct("<8sQQ")  # magic, record length, pause start (CLOCK_MONOTONIC ns): luo.abi's rule


def create_state_memfd(vm_name: str) -> int:
    fd = os.memfd_create(f"luo-vm:{vm_name}:state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, STATE_BYTES)
    return fd


def write_state(fd: int, record: bytes, paused_at_ns: int) -> None:
    if HEADER.size + len(record) > STATE_BYTES:
        raise LuoError(errno.EFBIG, f"VM state record of {len(record)} bytes exceeds the {STATE_BYTES} reserved")
    os.pwrite(fd, HEADER.pack(VMM_STATEFILE_MAGIC, len(record), paused_at_ns) + record, 0)


def read_state(fd: int) -> tuple[bytes, int]:
    head = os.pread(fd, HEADER.size, 0)
    magic, length, paused_at = HEADER.unpack(head)
    if magic != VMM_STATEFILE_MAGIC or length > STATE_BYTES - HEADER.size:
        raise LuoError(errno.EPROTO, "the preserved VM state memfd holds no valid record")
    data = os.pread(fd, length, HEADER.size)
    if len(data) != length:
        raise LuoError(errno.EPROTO, "the preserved VM state record is truncated")
    return data, paused_at
