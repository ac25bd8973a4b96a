"""memfd-v1 on real memfds: the kernel itself enforces the frozen size."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from pathlib import Path

import pytest

from luo.errors import LuoError
from luo.handlers import MemfdHandler, memfd_name, memfd_size
from luo.handlers.memfd import FREEZE_SEALS, is_memfd, memfd_seals

from .conftest import Successor
from .helpers import incoming, preserved

SIZE = 64 * 1024


def _eperm(call: object, *args: object) -> None:
    with pytest.raises(OSError) as ei:
        call(*args)  # type: ignore[operator]
    assert ei.value.errno == errno.EPERM


def _pass_fd(fd: int) -> int:
    """Hand ``fd`` over a socketpair by SCM_RIGHTS, as luod hands fds to its successor."""
    a, b = socket.socketpair()
    with a, b:
        socket.send_fds(a, [b"x"], [fd])
        _msg, fds, _flags, _addr = socket.recv_fds(b, 16, 1)
    return fds[0]


def test_can_preserve_only_memfds(memfd: int, tmp_path: Path) -> None:
    h = MemfdHandler()
    assert h.can_preserve(memfd)
    unsealable = os.memfd_create("plain")
    r, w = os.pipe()
    sock_a, sock_b = socket.socketpair()
    regular = os.open(tmp_path / "memfd:not-one", os.O_RDWR | os.O_CREAT)
    devnull = os.open("/dev/null", os.O_RDWR)
    try:
        assert h.can_preserve(unsealable)  # accepted, then refused by preserve with a reason
        for fd in (r, w, sock_a.fileno(), regular, devnull):
            assert not h.can_preserve(fd)
        assert not h.can_preserve(9999)  # not even open
    finally:
        for fd in (unsealable, r, w, regular, devnull):
            os.close(fd)
        sock_a.close()
        sock_b.close()


def test_hugetlb_memfd_is_a_memfd() -> None:
    try:
        fd = os.memfd_create("huge", os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    except OSError as e:
        pytest.skip(f"no hugetlb memfds here: {e}")
    try:
        assert MemfdHandler().can_preserve(fd)
        assert memfd_name(fd) == "huge"
    finally:
        os.close(fd)


def test_preserve_seals_the_size(memfd: int) -> None:
    pf = preserved(memfd, MemfdHandler())
    assert pf.data == SIZE
    assert memfd_seals(memfd) & FREEZE_SEALS == FREEZE_SEALS


def test_kernel_refuses_size_changes_after_preserve(memfd: int) -> None:
    preserved(memfd, MemfdHandler())
    _eperm(os.ftruncate, memfd, SIZE // 2)  # shrink
    _eperm(os.ftruncate, memfd, SIZE * 2)  # grow
    assert os.pwrite(memfd, b"ab", SIZE - 1) == 1  # a write across the end stops at it
    _eperm(os.pwrite, memfd, b"ab", SIZE)  # a write past the end fails
    os.lseek(memfd, SIZE, os.SEEK_SET)
    _eperm(os.write, memfd, b"x")  # appending
    _eperm(os.posix_fallocate, memfd, SIZE - 4096, 8192)  # fallocate past the end
    assert memfd_size(memfd) == SIZE


def test_writes_inside_the_size_still_work(memfd: int) -> None:
    preserved(memfd, MemfdHandler())
    assert os.pwrite(memfd, b"still running", SIZE - 13) == 13
    assert os.pread(memfd, 13, SIZE - 13) == b"still running"
    os.posix_fallocate(memfd, 0, SIZE)  # inside the size: allowed (see docs/handlers.md)
    os.ftruncate(memfd, SIZE)  # same size: no change, allowed


def test_memfd_without_allow_sealing_is_refused_with_eperm() -> None:
    fd = os.memfd_create("no-seals")
    try:
        h = MemfdHandler()
        with pytest.raises(LuoError) as ei:
            preserved(fd, h)
        assert ei.value.errno == errno.EPERM
        assert "MFD_ALLOW_SEALING" in ei.value.message
        assert "'no-seals'" in ei.value.message
    finally:
        os.close(fd)


def test_preserving_again_after_an_update_is_fine(memfd: int) -> None:
    # A memfd restored by a previous update still carries the seals; even F_SEAL_SEAL on top
    # (which forbids new seals) does not matter, the size is already frozen.
    h = MemfdHandler()
    preserved(memfd, h)
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    assert preserved(memfd, h, token=2).data == SIZE


def test_contents_and_position_cross_an_fd_pass(memfd: int) -> None:
    h = MemfdHandler()
    os.pwrite(memfd, b"guest memory", 4096)
    os.lseek(memfd, 1234, os.SEEK_SET)
    pf = preserved(memfd, h)
    received = _pass_fd(memfd)
    try:
        restored = h.retrieve(incoming(pf, received))
        try:
            assert os.lseek(restored, 0, os.SEEK_CUR) == 1234
            assert os.pread(restored, 12, 4096) == b"guest memory"
            # Same open file description: a move or a write on one is seen on the other.
            os.lseek(restored, 777, os.SEEK_SET)
            assert os.lseek(memfd, 0, os.SEEK_CUR) == 777
            os.pwrite(restored, b"new", 0)
            assert os.pread(memfd, 3, 0) == b"new"
            assert not os.get_inheritable(restored)  # O_CLOEXEC, as the kernel's restore
        finally:
            os.close(restored)
    finally:
        os.close(received)


def test_successor_process_sees_the_same_memory(memfd: int, successor: Successor) -> None:
    h = MemfdHandler()
    os.pwrite(memfd, b"before the update", 0)
    os.lseek(memfd, 4321, os.SEEK_SET)
    pf = preserved(memfd, h)
    body = """
        import struct
        from luo.core.participants import IncomingFile
        from luo.handlers import MemfdHandler
        token, data = struct.unpack("<QQ", payload)
        inc = IncomingFile(token=token, compatible="memfd-v1", data=data, fd=fds[0])
        fd = MemfdHandler().retrieve(inc)
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        seen = os.pread(fd, 17, 0)
        os.pwrite(fd, b"after", 0)
        reply(struct.pack("<Q", pos) + seen)
    """
    out = successor(body, [memfd], struct.pack("<QQ", pf.token, pf.data))
    assert struct.unpack("<Q", out[:8])[0] == 4321
    assert out[8:] == b"before the update"
    assert os.pread(memfd, 5, 0) == b"after"  # the successor wrote to the very same pages


def test_retrieve_checks_the_fd(memfd: int) -> None:
    h = MemfdHandler()
    pf = preserved(memfd, h)
    wrong_size = incoming(pf, memfd)
    wrong_size.data = SIZE + 4096
    with pytest.raises(LuoError) as ei:
        h.retrieve(wrong_size)
    assert ei.value.errno == errno.EIO
    devnull = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(LuoError) as ei:
            h.retrieve(incoming(pf, devnull))
        assert ei.value.errno == errno.EIO
    finally:
        os.close(devnull)


def test_freeze_reports_the_size(memfd: int) -> None:
    h = MemfdHandler()
    pf = preserved(memfd, h)
    assert h.prepare(pf) == SIZE
    assert h.freeze(pf) == SIZE


def test_unpreserve_cannot_lift_the_seals(memfd: int) -> None:
    h = MemfdHandler()
    pf = preserved(memfd, h)
    h.unpreserve(pf)
    assert memfd_seals(memfd) & FREEZE_SEALS == FREEZE_SEALS
    _eperm(os.ftruncate, memfd, 0)


def test_describe_and_helpers(memfd: int) -> None:
    h = MemfdHandler()
    assert h.describe(memfd) == {"size": str(SIZE), "name": "guest ram", "seals": ""}
    preserved(memfd, h)
    assert h.describe(memfd)["seals"] == "shrink,grow"
    assert memfd_name(memfd) == "guest ram"
    assert memfd_size(memfd) == SIZE
    assert is_memfd(memfd)
    assert h.describe(9999) == {}


def test_memfd_name_of_a_non_memfd() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(LuoError) as ei:
            memfd_name(fd)
        assert ei.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_memfd_name_with_stray_bytes_is_escaped() -> None:
    # memfd_create takes bytes; another process may have named it with anything.
    fd = os.memfd_create(os.fsdecode(b"ram-\xff"), os.MFD_ALLOW_SEALING)
    try:
        assert memfd_name(fd) == "ram-\\xff"
        assert MemfdHandler().describe(fd)["name"] == "ram-\\xff"
    finally:
        os.close(fd)
