"""Decoding an ioctl on the emulated device or a session, in the kernel's order of checks.

For the v7.3 tables this is ``luo_ioctl``/``luo_session_ioctl`` with ``copy_struct_from_user``:

1. ``nr`` outside the fd's table → EINVAL;
2. the leading ``u32 size`` cannot be read → EFAULT;
3. ``nr`` in the table but the full command differs → ENOTTY;
4. ``size`` below the struct (every op's minimum is its whole struct) → EINVAL;
5. ``size`` above it with any non-zero byte beyond → E2BIG (zero bytes are fine);
6. the answer is copied back over ``min(size, struct)`` bytes.

The RFC v2 global calls have fixed-size arguments and are matched on the full command first.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Protocol

from luo.errors import LuoError
from luo.uapi import abi


class Memory(Protocol):
    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...
    def all_zero(self, addr: int, size: int) -> bool: ...


@dataclass
class Call:
    op: abi.Ioctl
    argp: int
    user_size: int  # what the caller said (v7.3) or the fixed size (RFC v2)
    fields: list[object]

    def answer(self, mem: Memory, **changes: object) -> None:
        """Write the struct back with ``changes`` applied (by field index name ``f0``, ``f1``...)."""
        for key, value in changes.items():
            self.fields[int(key[1:])] = value
        data = struct.pack(self.op.layout, *self.fields)
        mem.write(self.argp, data[: min(self.user_size, len(data))])


def decode(on: abi.On, cmd: int, argp: int, mem: Memory) -> Call:
    """The call a thread made with ``cmd`` (32 bits) and ``argp`` on a device or session fd."""
    if on == "device":
        op = abi.RFC_V2.get(cmd)
        if op is not None:
            fields = list(struct.unpack(op.layout, mem.read(argp, op.size))) if op.layout else []
            return Call(op, argp, op.size, fields)
        table, base = abi.DEVICE_TABLE, abi.DEVICE_BASE
    else:
        table, base = abi.SESSION_TABLE, abi.SESSION_BASE
    nr = abi.ioc_nr(cmd)
    op = table.get(nr)
    if op is None:  # (the filter passes only type 0xBA; the kernel checks the nr alone)
        last = base + len(table) - 1
        raise LuoError(errno.EINVAL, f"ioctl {cmd:#x}: nr {nr:#x} is not in the {on}'s table "
                       f"({base:#04x}..{last:#04x})")
    try:  # one read for the usual case; on a fault, step by step for the kernel's errno
        raw: bytes | None = mem.read(argp, op.size)
    except LuoError:
        raw = None
    (user_size,) = struct.unpack_from("<I", raw if raw is not None else mem.read(argp, 4))
    if cmd != op.cmd:
        raise LuoError(errno.ENOTTY, f"ioctl {cmd:#x} has nr {nr:#x} but is not {op.name} ({op.cmd:#x})")
    if user_size < op.size:
        raise LuoError(errno.EINVAL, f"{op.name}: size {user_size} is below the struct's {op.size} bytes")
    if user_size > op.size and not mem.all_zero(argp + op.size, user_size - op.size):
        raise LuoError(errno.E2BIG, f"{op.name}: bytes beyond the struct's {op.size} (size {user_size}) are "
                       "not zero")
    fields = list(struct.unpack(op.layout, raw if raw is not None else mem.read(argp, op.size)))
    return Call(op, argp, user_size, fields)


def c_name(raw: bytes) -> str:
    """A ``u8 name[64]`` as the kernel takes it: NUL-terminated within 64 bytes, not empty (EINVAL).

    luo's names are text: bytes that are not UTF-8 are refused with EINVAL too (the kernel takes
    any bytes; said in docs/uapi.md)."""
    end = raw.find(b"\0")
    if end < 0:
        raise LuoError(errno.EINVAL, f"the session name has no NUL within its {abi.NAME_LEN} bytes")
    if end == 0:
        raise LuoError(errno.EINVAL, "the session name is empty")
    try:
        return raw[:end].decode()
    except UnicodeDecodeError:
        raise LuoError(errno.EINVAL, f"the session name {raw[:end]!r} is not UTF-8 (luo keeps names as text)") \
            from None


def c_name_bytes(name: str) -> bytes:
    return name.encode()[: abi.NAME_LEN - 1].ljust(abi.NAME_LEN, b"\0")
