"""memfd-v1 on real memfds: any memfd, no seals added, the size recorded and checked."""

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
from luo.handlers.memfd import is_memfd, memfd_seals

from .conftest import Successor
from .helpers import incoming, preserved

SIZE = 64 * 1024


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
    plain = os.memfd_create("plain")  # no MFD_ALLOW_SEALING: a memfd all the same, as upstream
    r, w = os.pipe()
    sock_a, sock_b = socket.socketpair()
    regular = os.open(tmp_path / "memfd:not-one", os.O_RDWR | os.O_CREAT)
    devnull = os.open("/dev/null", os.O_RDWR)
    try:
        assert h.can_preserve(plain)
        for fd in (r, w, sock_a.fileno(), regular, devnull):
            assert not h.can_preserve(fd)
        assert not h.can_preserve(9999)  # not even open
    finally:
        for fd in (plain, r, w, regular, devnull):
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


def test_preserve_records_the_size_and_adds_no_seal(memfd: int) -> None:
    pf = preserved(memfd, MemfdHandler())
    assert pf.data == SIZE
    assert memfd_seals(memfd) == 0  # seals are permanent: luo adds none


def test_memfd_made_with_flags_0_is_preserved() -> None:
    """As the kernel and its selftests: ``memfd_create(name, 0)`` (carries F_SEAL_SEAL)."""
    fd = os.memfd_create("selftest", 0)
    try:
        os.ftruncate(fd, SIZE)
        h = MemfdHandler()
        pf = preserved(fd, h)
        assert pf.data == SIZE and h.prepare(pf) == SIZE and h.freeze(pf) == SIZE
        assert h.describe(fd)["seals"] == "seal"  # what it had, unchanged
    finally:
        os.close(fd)


def test_seals_a_memfd_had_are_kept(memfd: int) -> None:
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    h = MemfdHandler()
    pf = preserved(memfd, h)
    h.unpreserve(pf)
    assert memfd_seals(memfd) == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def test_size_change_is_refused_at_prepare_and_freeze(memfd: int) -> None:
    """Outside ``luo run`` nothing stops a truncate; the update refuses to carry the file."""
    h = MemfdHandler()
    pf = preserved(memfd, h, token=7)
    os.ftruncate(memfd, SIZE * 2)  # succeeds: no seal
    for step in (h.prepare, h.freeze):
        with pytest.raises(LuoError) as ei:
            step(pf)
        assert ei.value.errno == errno.EIO
        msg = ei.value.message
        assert "'guest ram'" in msg and "token 7" in msg and str(SIZE) in msg and str(SIZE * 2) in msg
    os.ftruncate(memfd, SIZE)  # back to the recorded size: fine again
    assert h.prepare(pf) == SIZE


def test_writes_inside_the_size_still_work(memfd: int) -> None:
    preserved(memfd, MemfdHandler())
    assert os.pwrite(memfd, b"still running", SIZE - 13) == 13
    assert os.pread(memfd, 13, SIZE - 13) == b"still running"
    os.posix_fallocate(memfd, 0, SIZE)
    os.ftruncate(memfd, SIZE)  # same size: no change


def test_identity_is_the_inode_of_every_copy(memfd: int) -> None:
    h = MemfdHandler()
    copy = _pass_fd(memfd)
    reopened = os.open(f"/proc/self/fd/{memfd}", os.O_RDWR)  # a new open file: same inode
    try:
        assert h.identity(memfd) == h.identity(copy) == h.identity(reopened)
        assert h.identity(memfd) == (os.fstat(memfd).st_dev, os.fstat(memfd).st_ino)
        assert h.recorded_size(SIZE) == SIZE
    finally:
        os.close(copy)
        os.close(reopened)


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


def test_after_unpreserve_it_can_grow(memfd: int) -> None:
    """Upstream a memfd whose preservation is cancelled or unpreserved may grow again: no seal."""
    h = MemfdHandler()
    pf = preserved(memfd, h)
    h.unpreserve(pf)
    os.ftruncate(memfd, SIZE * 4)
    assert os.pwrite(memfd, b"more", SIZE * 4) == 4
    assert memfd_size(memfd) == SIZE * 4 + 4


def test_describe_and_helpers(memfd: int) -> None:
    h = MemfdHandler()
    assert h.describe(memfd) == {"size": str(SIZE), "name": "guest ram", "seals": ""}
    preserved(memfd, h)
    assert h.describe(memfd)["seals"] == ""  # preserving adds none
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
