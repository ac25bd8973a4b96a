"""The seccomp filter of ``luo run``: which system calls the supervisor is asked about.

BPF cannot read memory, so the filter selects by number and register only:

- ``open``, ``openat``, ``openat2``: every one (the path is in the caller's memory; the
  supervisor reads it and lets every other path go on with ``SECCOMP_USER_NOTIF_FLAG_CONTINUE``);
- ``ioctl`` whose command has type 0xBA (the low 32 bits of ``args[1]``, as the kernel
  truncates ``unsigned int cmd``): a LUO ioctl, or one on an fd that is not ours (continued);
- ``ftruncate`` and ``fallocate``: so a preserved memfd can refuse them with EPERM, as the
  kernel's memfd-v1 does between preserve and finish.

Everything else, x32 calls and other architectures (i386 compat) are allowed untouched; they
cannot reach ``/dev/liveupdate`` through this filter (said in docs/uapi.md).
"""

from __future__ import annotations

import struct

from luo.uapi import abi
from luo.uapi.seccomp import (
    AUDIT_ARCH_X86_64,
    NR_FALLOCATE,
    NR_FTRUNCATE,
    NR_IOCTL,
    NR_OPEN,
    NR_OPENAT,
    NR_OPENAT2,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_USER_NOTIF,
    X32_SYSCALL_BIT,
)

# classic BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
AND_K = 0x54
RET_K = 0x06

# offsets in struct seccomp_data
OFF_NR, OFF_ARCH, OFF_ARG1_LO = 0, 4, 16 + 8 * 1

NOTIFIED = (NR_OPEN, NR_OPENAT, NR_OPENAT2, NR_FTRUNCATE, NR_FALLOCATE)


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def program() -> bytes:
    """The filter as packed ``struct sock_filter``s."""
    ins: list[bytes] = [
        _insn(LD_W_ABS, 0, 0, OFF_ARCH),
        _insn(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
        _insn(LD_W_ABS, 0, 0, OFF_NR),
        _insn(JGE_K, 0, 1, X32_SYSCALL_BIT),
        _insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    # nr in NOTIFIED -> notify: each test jumps to the "notify" return placed after the list
    n = len(NOTIFIED)
    for i, nr in enumerate(NOTIFIED):
        ins.append(_insn(JEQ_K, n - i + 4, 0, nr))
    # ioctl with type 0xBA -> notify; anything else -> allow
    ins += [
        _insn(JEQ_K, 0, 3, NR_IOCTL),  # not an ioctl: skip to allow
        _insn(LD_W_ABS, 0, 0, OFF_ARG1_LO),
        _insn(AND_K, 0, 0, 0xFF00),
        _insn(JEQ_K, 1, 0, abi.IOCTL_TYPE << 8),
        _insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
        _insn(RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
    ]
    return b"".join(ins)
