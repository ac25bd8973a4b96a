"""The session rules of v7.2/v7.3 through a real luod's socket and libluo (docs/uapi.md, "Session
rules"), and the ops ``luo run`` builds /dev/liveupdate on: open_device, close_device,
preserved_size, and the ``program`` a client names."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

import pytest

from luo.client import Client, LuoError
from luo.testing.host import HostProcess
from luo.testing.wait import wait_for

SIZE = 8192


def refused(call: Callable[[], object]) -> LuoError:
    with pytest.raises(LuoError) as ei:
        call()
    return ei.value


def memfd(name: str, size: int = SIZE, flags: int = 0) -> int:
    fd = os.memfd_create(name, flags)  # flags 0 by default: any memfd, as the upstream selftests
    os.ftruncate(fd, size)
    os.pwrite(fd, name.encode(), 0)
    return fd


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# -- create and retrieve ------------------------------------------------------------------------


def test_create_session_names(host: HostProcess) -> None:
    c = host.client()
    for bad in ("", "x" * 64, "é" * 32, "a\0b"):  # empty, no NUL within 64 bytes, a NUL inside
        assert refused(lambda b=bad: c.create_session(b)).errno == errno.EINVAL, bad
    held = c.create_session("n" * 63)
    assert refused(lambda: c.create_session("n" * 63)).errno == errno.EEXIST
    held.close()
    wait_for(lambda: not host.client().status()["sessions"], 10, "luod to see the session closed")
    c.create_session("n" * 63)  # the name is free once its session is closed


def test_retrieve_session_unknown_twice_and_outgoing(host: HostProcess) -> None:
    c = host.client()
    assert refused(lambda: c.retrieve_session("vm1")).errno == errno.ENOENT  # nothing came in
    s = c.create_session("vm1")
    s.preserve_fd(memfd("vm1-ram"), 1)
    host.update()
    c2 = host.client()
    assert refused(lambda: c2.retrieve_session("nope")).errno == errno.ENOENT
    got = c2.retrieve_session("vm1")
    assert refused(lambda: c2.retrieve_session("vm1")).errno == errno.EINVAL  # retrieved already
    c2.create_session("made-here")
    assert refused(lambda: c2.retrieve_session("made-here")).errno == errno.ENOENT  # only the predecessor's
    got.finish()


def test_session_types_and_get_name(host: HostProcess) -> None:
    """v7.2: PRESERVE_FD only on a created session, RETRIEVE_FD and FINISH only on a retrieved one
    (EINVAL); GET_NAME on both."""
    c = host.client()
    out = c.create_session("typed")
    assert out.get_name() == "typed"
    out.preserve_fd(memfd("typed-ram"), 1)
    assert refused(lambda: out.retrieve_fd(1)).errno == errno.EINVAL
    assert refused(out.finish).errno == errno.EINVAL
    host.update()
    inc = host.client().retrieve_session("typed")
    assert inc.get_name() == "typed"
    assert refused(lambda: inc.preserve_fd(memfd("late"), 2)).errno == errno.EINVAL
    fd = inc.retrieve_fd(1)
    assert os.pread(fd, 9, 0) == b"typed-ram"
    inc.finish()
    assert inc.get_name() == "typed"  # still answers once finished
    assert refused(lambda: inc.preserve_fd(memfd("later"), 3)).errno == errno.EINVAL  # the type, first


# -- one file, preserved once -------------------------------------------------------------------


def test_a_file_preserved_anywhere_is_ebusy(host: HostProcess) -> None:
    c = host.client()
    a, b = c.create_session("a"), c.create_session("b")
    fd = memfd("once")
    a.preserve_fd(fd, 1)
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # a second struct file: the kernel would take it
    for attempt in (lambda: a.preserve_fd(fd, 2), lambda: b.preserve_fd(os.dup(fd), 1),
                    lambda: b.preserve_fd(reopened, 1), lambda: c.preserve_fd(fd)):
        e = refused(attempt)
        assert e.errno == errno.EBUSY and "already preserves" in e.message, e
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(b"\0luo-test-ebusy-%d" % os.getpid())
    ls.listen(1)
    b.preserve_fd(ls.fileno(), 1)
    assert refused(lambda: a.preserve_fd(ls.fileno(), 3)).errno == errno.EBUSY  # sockets too
    a.close()
    wait_for(lambda: [s["name"] for s in host.client().status()["sessions"]] == ["b"], 10, "session a closed")
    b.preserve_fd(fd, 2)  # free again once its session closed


def test_a_retrieved_file_may_be_preserved_again(host: HostProcess) -> None:
    """Incoming files do not count (the kernel's retrieve gives a new struct file): a VMM moves its
    RAM into a new session before it finishes the old one."""
    c = host.client()
    held = c.create_session("old")  # a session lives as long as its fd
    held.preserve_fd(memfd("ram"), 1)
    host.update()
    c2 = host.client()
    old = c2.retrieve_session("old")
    ram = old.retrieve_fd(1)
    new = c2.create_session("new")
    new.preserve_fd(ram, 1)
    assert refused(lambda: c2.create_session("newer").preserve_fd(ram, 1)).errno == errno.EBUSY
    old.finish()


# -- retrieve and finish --------------------------------------------------------------------------


def test_a_failed_retrieve_fails_the_same_way_again(host: HostProcess) -> None:
    """v7.3: once RETRIEVE_FD failed, every later call returns that error, even if its cause went."""
    c = host.client()
    mine = memfd("shrinks")
    held = [c.create_session("s"), c.create_session("t")]
    held[0].preserve_fd(mine, 1)
    held[1].preserve_fd(memfd("fine"), 1)
    host.update()
    os.ftruncate(mine, SIZE // 2)  # the very file, still open here: nothing stops it outside luo run
    s = host.client().retrieve_session("s")
    first = refused(lambda: s.retrieve_fd(1))
    assert first.errno == errno.EIO and str(SIZE) in first.message
    os.ftruncate(mine, SIZE)  # the cause is gone
    again = refused(lambda: s.retrieve_fd(1))
    assert (again.errno, again.message) == (first.errno, first.message)
    os.close(host.client().retrieve_session("t").retrieve_fd(1))  # other sessions are not affected
    s.finish()


def test_finish_reserved_must_be_zero(host: HostProcess) -> None:
    c = host.client()
    held = c.create_session("r")
    held.preserve_fd(memfd("r-ram"), 1)
    host.update()
    s = host.client().retrieve_session("r")
    for bad in (1, 1 << 32, (1 << 64) - 1):
        e = refused(lambda b=bad: s.finish(reserved=b))
        assert e.errno == errno.EINVAL and "reserved" in e.message
    assert refused(lambda: s._call({"op": "finish", "reserved": "0"})).errno == errno.EINVAL
    os.close(s.retrieve_fd(1))  # nothing was finished
    s.finish(reserved=0)
    assert host.client().status()["sessions"] == []


# -- memfd-v1: any memfd, size checked ------------------------------------------------------------


def test_size_change_refuses_the_update_then_it_goes(host: HostProcess) -> None:
    c = host.client()
    fd = memfd("grows", flags=0)
    held = c.create_session("g")
    held.preserve_fd(fd, 1)
    os.ftruncate(fd, SIZE * 2)  # luod cannot stop it (under luo run: EPERM)
    cp = host.luo("update", "--json", check=False)
    assert cp.returncode == 1 and "EIO" in cp.stderr and "'grows'" in cp.stderr and "preserved" in cp.stderr
    assert host.state() == "normal"
    os.ftruncate(fd, SIZE)
    host.update()
    got = host.client().retrieve_session("g")
    assert os.fstat(got.retrieve_fd(1)).st_size == SIZE
    got.finish()


# -- for luo run: the device, preserved_size, program -------------------------------------------


def test_open_device_is_exclusive(host: HostProcess) -> None:
    one, two = host.client(), host.client()
    got = one.open_device("selftest pid 123")
    assert got == {"pid": host.pid, "liveupdate_number": 0}
    e = refused(lambda: two.open_device("other"))
    assert e.errno == errno.EBUSY and f"pid {os.getpid()}" in e.message and "selftest pid 123" in e.message
    assert one.open_device("selftest pid 123, again") == got  # the holder asking again keeps it
    st = two.status()
    assert st["device"] == {"pid": os.getpid(), "program": "selftest pid 123, again"}
    assert "/dev/liveupdate: held by pid" in host.luo("status").stdout
    assert refused(two.close_device).errno == errno.EINVAL  # not the holder
    one.close_device()
    assert two.status()["device"] is None
    two.open_device("two")
    two.close()  # closing the connection lets it go, as closing /dev/liveupdate does
    three = host.client()
    wait_for(lambda: three.status()["device"] is None, 10, "luod to see the holder's connection close")
    three.open_device()


def test_device_is_released_by_an_update(host: HostProcess) -> None:
    c = host.client()
    c.open_device("before")
    host.update()
    other = Client(host.root)
    assert other.open_device("after")["liveupdate_number"] == 1  # the new host has no holder


def test_preserved_size(host: HostProcess) -> None:
    c = host.client()
    fd = memfd("sized", SIZE)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(b"\0luo-test-size-%d" % os.getpid())
    ls.listen(1)
    assert c.preserved_size(*inode(fd)) == (False, None)
    s = c.create_session("sized")
    s.preserve_fd(fd, 1)
    s.preserve_fd(ls.fileno(), 2)
    assert c.preserved_size(*inode(fd)) == (True, SIZE)
    assert c.preserved_size(*inode(ls.fileno())) == (True, None)  # preserved, but no size to freeze
    assert c.preserved_size(0, 1) == (False, None)
    host.update()
    c2 = host.client()
    assert c2.preserved_size(*inode(fd)) == (True, SIZE)  # incoming: frozen until finish
    got = c2.retrieve_session("sized")
    os.close(got.retrieve_fd(1))
    assert c2.preserved_size(*inode(fd)) == (True, SIZE)  # retrieved, not finished
    got.finish()
    assert c2.preserved_size(*inode(fd)) == (False, None)
    for bad in ({"dev": -1, "ino": 1}, {"dev": 1}, {"dev": 1, "ino": "2"}, {"dev": True, "ino": 2}):
        assert refused(lambda b=bad: c2.call("preserved_size", **b)).errno == errno.EINVAL


def test_program_is_shown_as_the_clients_claim(host: HostProcess) -> None:
    c = host.client()
    s = c.create_session("claimed", program="selftest pid 123")
    s.preserve_fd(memfd("claimed-ram"), 1)
    (entry,) = c.status()["sessions"]
    assert entry["owner"]["program"] == "selftest pid 123" and entry["owner"]["pid"] == os.getpid()
    assert "(for selftest pid 123, its claim)" in host.luo("status").stdout
    assert refused(lambda: c.create_session("long", program="x" * 201)).errno == errno.EINVAL
    plain = c.create_session("plain")
    assert "program" not in [x for x in c.status()["sessions"] if x["name"] == "plain"][0]["owner"]
    plain.close()
    host.update()
    c2 = host.client()
    back = c2.retrieve_session("claimed", program="luo-run for stage 2")  # closing it would finish it
    (entry,) = c2.status()["sessions"]
    assert entry["owner"]["program"] == "selftest pid 123"  # crossed the update with the session
    assert entry["retrieved_by"]["program"] == "luo-run for stage 2"
    assert "retrieved by" in host.luo("status").stdout
    back.finish()


def test_the_device_holder_may_only_do_what_the_ioctls_do(host: HostProcess) -> None:
    """Under `luo run` the holder's connection is the program's own fd, made with the supervisor's
    credentials: writing to it must not reach an update, the VMs or a KHO dump."""
    c = host.client()
    c.open_device("a program")
    for op in ("status", "update", "kho_dump", "vm_list"):
        e = refused(lambda op=op: c.call(op))
        assert e.errno == errno.EPERM and "not a /dev/liveupdate operation" in e.message, (op, e)
    assert c.state.label == "normal"  # get_state is an ioctl (RFC v2 GET_STATE)
    s = c.create_session("held-device")
    assert s.get_name() == "held-device"
    c.close_device()
    assert "state" in c.status()  # released: an ordinary connection again
