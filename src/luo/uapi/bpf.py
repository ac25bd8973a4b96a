"""The seccomp filter of ``luo run``: which system calls the supervisor is asked about.

BPF cannot read memory, so the filter selects by number and register only:

- ``open``, ``openat``, ``openat2``, ``creat``: every one (the path is in the caller's memory; the
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
    NR_CREAT,
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

NOTIFIED = (NR_OPEN, NR_OPENAT, NR_OPENAT2, NR_CREAT, NR_FTRUNCATE, NR_FALLOCATE)


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def program() -> bytes:
    """The filter as packed ``struct sock_filter``s. Jumps are relative (``jt``/``jf`` count the
    instructions skipped), so they are computed from the two return instructions' positions."""
    head = [
        (LD_W_ABS, 0, 0, OFF_ARCH),
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),  # another architecture (i386 compat)
        (LD_W_ABS, 0, 0, OFF_NR),
        (JGE_K, 0, 1, X32_SYSCALL_BIT),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),  # x32
    ]
    n = len(NOTIFIED)
    ioctl_at = len(head) + n  # the ioctl test follows the list of notified calls
    allow_at, notify_at = ioctl_at + 4, ioctl_at + 5
    tests = [(JEQ_K, notify_at - (len(head) + i) - 1, 0, nr) for i, nr in enumerate(NOTIFIED)]
    tail = [
        (JEQ_K, 0, allow_at - ioctl_at - 1, NR_IOCTL),
        (LD_W_ABS, 0, 0, OFF_ARG1_LO),
        (AND_K, 0, 0, 0xFF00),
        (JEQ_K, notify_at - (ioctl_at + 3) - 1, 0, abi.IOCTL_TYPE << 8),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),  # allow_at
        (RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),  # notify_at
    ]
    return b"".join(_insn(*i) for i in (*head, *tests, *tail))
