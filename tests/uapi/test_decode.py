"""The kernel's ioctl argument rules (luo.uapi.ioctls), checked against a caller's memory image.

The C programs prove the same rules end to end; these name each rule and its errno on its own,
including the order of the checks (an unreadable size is EFAULT even for a wrong command).
"""

from __future__ import annotations

import errno
import struct

import pytest

from luo.errors import LuoError
from luo.uapi import abi
from luo.uapi.ioctls import c_name, decode

BASE = 0x10000


class Image:
    """``size`` readable bytes at BASE; everything else faults, as unmapped memory does."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def _check(self, addr: int, size: int) -> int:
        off = addr - BASE
        if off < 0 or off + size > len(self.data):
            raise LuoError(errno.EFAULT, "fault")
        return off

    def read(self, addr: int, size: int) -> bytes:
        off = self._check(addr, size)
        return bytes(self.data[off:off + size])

    def write(self, addr: int, data: bytes) -> None:
        off = self._check(addr, len(data))
        self.data[off:off + len(data)] = data

    def all_zero(self, addr: int, size: int) -> bool:
        return not any(self.read(addr, size))


def session_arg(size: int = 72, name: bytes = b"s", tail: bytes = b"") -> Image:
    return Image(struct.pack("<Ii64s", size, -1, name) + tail)


def errno_of(on: abi.On, cmd: int, mem: Image, argp: int = BASE) -> int:
    with pytest.raises(LuoError) as e:
        decode(on, cmd, argp, mem)
    return e.value.errno


def test_numbers_follow_the_uapi() -> None:
    assert [hex(i.cmd) for i in (abi.CREATE_SESSION, abi.RETRIEVE_SESSION, abi.PRESERVE_FD, abi.RETRIEVE_FD,
                                 abi.FINISH, abi.GET_NAME)] == ["0xba00", "0xba01", "0xba40", "0xba41", "0xba42",
                                                                "0xba43"]
    assert [i.size for i in (abi.CREATE_SESSION, abi.PRESERVE_FD, abi.FINISH, abi.GET_NAME)] == [72, 16, 8, 72]
    assert [hex(i.cmd) for i in (abi.FD_PRESERVE, abi.FD_UNPRESERVE, abi.FD_RESTORE, abi.GET_STATE)] == [
        "0xc010ba00", "0x4008ba01", "0xc010ba02", "0x8004ba03"]
    assert sorted(hex(c) for c in abi.EVENTS) == ["0xba04", "0xba05", "0xba06", "0xba07"]


def test_a_whole_struct_decodes_and_answers_within_the_callers_size() -> None:
    mem = session_arg(name=b"vm1")
    call = decode("device", abi.CREATE_SESSION.cmd, BASE, mem)
    assert call.op is abi.CREATE_SESSION and c_name(call.fields[2]) == "vm1"
    call.answer(mem, f1=7)
    assert struct.unpack_from("<Ii", mem.data) == (72, 7)


def test_a_larger_size_with_a_zero_tail_is_accepted_and_the_tail_left_alone() -> None:
    mem = session_arg(size=80, tail=bytes(8))
    call = decode("device", abi.CREATE_SESSION.cmd, BASE, mem)
    call.answer(mem, f1=3)
    assert len(mem.data) == 80 and mem.data[72:] == bytes(8)


@pytest.mark.parametrize("case,expected", [
    ("non-zero tail", errno.E2BIG),
    ("short size", errno.EINVAL),
    ("tail unreadable", errno.EFAULT),
    ("size unreadable", errno.EFAULT),
    ("struct unreadable", errno.EFAULT),
])
def test_size_rules(case: str, expected: int) -> None:
    mem, argp = {
        "non-zero tail": (session_arg(size=80, tail=b"\0\0\0\1\0\0\0\0"), BASE),
        "short size": (session_arg(size=71), BASE),
        "tail unreadable": (session_arg(size=4096), BASE),
        "size unreadable": (session_arg(), BASE - 4096),
        "struct unreadable": (Image(struct.pack("<I", 72)), BASE),
    }[case]
    assert errno_of("device", abi.CREATE_SESSION.cmd, mem, argp) == expected


def test_the_order_of_the_checks() -> None:
    """nr outside the table beats everything; then the size must be readable; then the command."""
    assert errno_of("device", abi.io(0x02), Image(b"")) == errno.EINVAL  # nr 2: not a device ioctl
    assert errno_of("device", 0x4048BA00, Image(b"")) == errno.EFAULT  # nr 0, size unreadable
    assert errno_of("device", 0x4048BA00, session_arg()) == errno.ENOTTY  # nr 0, another command
    assert errno_of("session", abi.io(0x44), Image(b"")) == errno.EINVAL
    assert errno_of("session", abi.CREATE_SESSION.cmd, session_arg()) == errno.EINVAL  # nr 0 on a session
    assert errno_of("session", 0xC010BA40, Image(struct.pack("<IiQ", 16, 0, 1))) == errno.ENOTTY


def test_rfc_v2_calls_are_told_apart_by_the_full_command() -> None:
    mem = Image(struct.pack("<iIQ", 5, 0, 0))
    call = decode("device", abi.FD_PRESERVE.cmd, BASE, mem)
    assert call.op is abi.FD_PRESERVE and call.fields == [5, 0, 0]
    call.answer(mem, f2=9)
    assert struct.unpack("<iIQ", mem.data) == (5, 0, 9)
    assert decode("device", abi.EVENT_PREPARE.cmd, 0, Image(b"")).op is abi.EVENT_PREPARE
    assert errno_of("device", abi.FD_PRESERVE.cmd, Image(b"")) == errno.EFAULT
    # on a session fd the RFC v2 numbers are outside the table
    assert errno_of("session", abi.FD_PRESERVE.cmd, mem) == errno.EINVAL


@pytest.mark.parametrize("raw,ok", [
    (b"x" * 63 + b"\0", True),
    (b"x" * 64, False),  # no NUL within 64 bytes
    (b"\0" + b"x" * 63, False),  # empty
    (b"\xff\0".ljust(64, b"\0"), False),  # not UTF-8: luo keeps names as text
])
def test_session_names(raw: bytes, ok: bool) -> None:
    if ok:
        assert c_name(raw) == raw[:-1].decode()
    else:
        with pytest.raises(LuoError) as e:
            c_name(raw)
        assert e.value.errno == errno.EINVAL


def run_filter(arch: int, nr: int, arg1: int) -> int:
    """Interpret luo run's seccomp filter (the few classic BPF opcodes it uses) for one call."""
    from luo.uapi import bpf

    prog = bpf.program()
    data = struct.pack("<iIQ6Q", nr, arch, 0, 0, arg1, 0, 0, 0, 0)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = struct.unpack_from("<HBBI", prog, pc * 8)
        pc += 1
        if code == bpf.LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == bpf.AND_K:
            acc &= k
        elif code in (bpf.JEQ_K, bpf.JGE_K):
            taken = acc == k if code == bpf.JEQ_K else acc >= k
            pc += jt if taken else jf
        elif code == bpf.RET_K:
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")


def test_the_filter_selects_exactly_the_calls_luo_run_serves() -> None:
    from luo.uapi import seccomp as sc

    notify, allow = sc.SECCOMP_RET_USER_NOTIF, sc.SECCOMP_RET_ALLOW
    x86 = sc.AUDIT_ARCH_X86_64
    for nr in (sc.NR_OPEN, sc.NR_OPENAT, sc.NR_OPENAT2, sc.NR_CREAT, sc.NR_FTRUNCATE, sc.NR_FALLOCATE):
        assert run_filter(x86, nr, 0) == notify, nr
    assert run_filter(x86, sc.NR_IOCTL, 0xBA00) == notify
    assert run_filter(x86, sc.NR_IOCTL, 0xFFFF_FFFF_C010_BA43) == notify  # only the low 32 bits count
    assert run_filter(x86, sc.NR_IOCTL, 0x541B) == allow  # FIONREAD
    for nr in (0, 1, 3, 59, 231):  # read, write, close, execve, exit_group
        assert run_filter(x86, nr, 0xBA00) == allow, nr
    assert run_filter(x86, sc.X32_SYSCALL_BIT | sc.NR_OPENAT, 0) == allow
    assert run_filter(0x40000003, 5, 0) == allow  # i386: open is 5 there
