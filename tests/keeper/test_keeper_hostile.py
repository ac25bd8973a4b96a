"""Whatever a client sends, the keeper answers with an error, keeps every fd it holds, leaks none
of the fds that came with a refused message, and goes on serving; a non-root stranger is refused."""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from keeper_helpers import content_of

from luo.host.handover import blob_memfd
from luo.keeper.client import KeeperStore
from luo.keeper.proto import recv


def raw_conn(runtime: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.connect(str(runtime / "keeper"))
    return s


def send_raw(s: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    s.sendmsg([data], anc)


def ask(s: socket.socket, data: bytes | dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    send_raw(s, data if isinstance(data, bytes) else json.dumps(data).encode(), fds)
    got = recv(s)
    assert got is not None, "the keeper closed the connection"
    reply, rfds = got
    for fd in rfds:
        os.close(fd)
    return reply


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fd_count(pid: int, want: int, timeout: float = 3.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := fd_count(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def test_hostile_messages_refused_and_nothing_lost(store: KeeperStore, runtime: Path,
                                                   memfd: Callable[..., int]) -> None:
    kept = {f"kept/{i}": memfd(f"content {i}".encode()) for i in range(5)}
    store.put_many(kept.items())
    store.set_meta(b'{"meta":1}')
    pid = store.pid
    assert pid is not None
    baseline = fd_count(pid)

    scratch = memfd(b"abc")
    sealed3 = blob_memfd(b"abc")
    sealed3b = blob_memfd(b"xyz")
    r, w = os.pipe()
    many = [os.dup(scratch) for _ in range(253)]
    try:
        cases: list[tuple[bytes | dict[str, Any], list[int], int]] = [
            (b"garbage", [scratch], errno.EINVAL),
            (b"\xff\xfe{}", [], errno.EINVAL),
            (b"[1,2]", [scratch], errno.EINVAL),
            (b"[" * 5000, [], errno.EINVAL),
            (b'{"op":"meta","size":NaN}', [sealed3], errno.EINVAL),
            (b"{" * 100_000, [scratch, scratch], errno.EMSGSIZE),  # longer than any keeper message
            ({"op": "nope"}, [scratch], errno.ENOTTY),
            ({"op": 5}, [], errno.ENOTTY),
            ({}, [], errno.ENOTTY),
            ({"op": "put", "key": "a"}, [], errno.EINVAL),
            ({"op": "put", "key": "a"}, [scratch, scratch], errno.EINVAL),
            ({"op": "put", "key": "kept/0"}, [scratch, scratch], errno.EINVAL),
            ({"op": "put", "key": "a:b"}, [scratch], errno.EINVAL),
            ({"op": "put", "key": "é"}, [scratch], errno.EINVAL),
            ({"op": "put", "key": "luo-meta"}, [scratch], errno.EINVAL),
            ({"op": "put", "key": ["a"]}, [scratch], errno.EINVAL),
            ({"op": "put", "keys": ["a", "b"]}, [scratch], errno.EINVAL),
            ({"op": "put", "keys": ["a", "a"]}, [scratch, scratch], errno.EINVAL),
            ({"op": "put", "keys": ["kept/1", "x y"]}, [scratch, scratch], errno.EINVAL),
            ({"op": "put", "keys": "ab"}, [scratch, scratch], errno.EINVAL),
            ({"op": "put", "key": "a", "keys": ["a"]}, [scratch], errno.EINVAL),
            ({"op": "put", "key": "x"}, many, errno.EINVAL),
            ({"op": "put", "keys": [f"k{i}" for i in range(254)]}, many, errno.EINVAL),
            ({"op": "drop", "keys": ["kept/0"]}, [scratch], errno.EINVAL),
            ({"op": "drop", "keys": "kept/0"}, [], errno.EINVAL),
            ({"op": "drop", "keys": ["kept/0", "bad key"]}, [], errno.EINVAL),
            ({"op": "drop", "keys": [None]}, [], errno.EINVAL),
            ({"op": "meta", "size": 1 << 40}, [sealed3], errno.EINVAL),
            ({"op": "meta", "size": -1}, [sealed3], errno.EINVAL),
            ({"op": "meta", "size": 5}, [sealed3], errno.EINVAL),
            ({"op": "meta", "size": 3}, [scratch], errno.EINVAL),  # not sealed: could change later
            ({"op": "meta", "size": 0}, [r], errno.EINVAL),
            ({"op": "meta", "size": 3}, [], errno.EINVAL),
            ({"op": "meta", "size": 3}, [sealed3, sealed3b], errno.EINVAL),
            ({"op": "meta", "size": True}, [sealed3], errno.EINVAL),
            ({"op": "meta", "size": "3"}, [sealed3], errno.EINVAL),
            ({"op": "meta", "size": 3.0}, [sealed3], errno.EINVAL),
            ({"op": "load"}, [scratch], errno.EINVAL),
            ({"op": "ping"}, [w], errno.EINVAL),
        ]
        s = raw_conn(runtime)
        for data, fds, want in cases:
            reply = ask(s, data, fds)
            assert reply["errno"] == want, (data if isinstance(data, dict) else data[:40], reply)
            assert reply["error"]
        assert ask(s, {"op": "ping"})["pid"] == pid  # the same connection still works

        # a zero-length datagram reads as EOF: that connection ends, the keeper does not
        z = raw_conn(runtime)
        send_raw(z, b"")
        assert z.recv(10) == b""
        z.close()
        s.close()
    finally:
        for fd in (sealed3, sealed3b, r, w, *many):
            os.close(fd)

    assert wait_fd_count(pid, baseline) == baseline  # nothing that came with a refusal was kept
    assert store.pid == pid and store.ping()["pid"] == pid
    meta, fds = store.load()
    try:
        assert meta == b'{"meta":1}'
        assert sorted(fds) == sorted(kept)
        for key, fd in fds.items():
            assert os.fstat(fd).st_ino == os.fstat(kept[key]).st_ino
            assert content_of(fd) == content_of(kept[key])
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_client_that_never_reads_does_not_block_others(store: KeeperStore, runtime: Path,
                                                         memfd: Callable[..., int]) -> None:
    """Replies the socket has no room for wait in a queue, and the keeper serves other clients
    meanwhile (a blocking send would hang it for everyone)."""
    fd = memfd(b"x")
    store.put_many((f"key/{'k' * 150}/{i}", fd) for i in range(1000))
    pid = store.pid
    assert pid is not None
    baseline = fd_count(pid)
    greedy = raw_conn(runtime)
    for _ in range(20):
        send_raw(greedy, b'{"op":"load"}')  # 20 x 1000 fds and keys: far beyond the socket buffer
    t0 = time.monotonic()
    assert store.ping()["count"] == 1000
    assert time.monotonic() - t0 < 2
    meta, fds = store.load()
    assert len(fds) == 1000
    for f in fds.values():
        os.close(f)
    greedy.close()  # its queued replies (and their dups) are released
    assert wait_fd_count(pid, baseline) == baseline


def test_client_gone_mid_load(store: KeeperStore, runtime: Path, memfd: Callable[..., int]) -> None:
    fd = memfd(b"x")
    store.put_many((f"k{i}", fd) for i in range(600))
    for _ in range(5):
        c = raw_conn(runtime)
        send_raw(c, b'{"op":"load"}')
        recv(c)  # only the head
        c.close()
    assert store.ping()["count"] == 600


def as_nobody(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child that became uid/gid 65534; its JSON result comes back by pipe.
    The child never returns to pytest."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(wfd, (json.dumps(fn()) + "\n").encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        line = f.readline()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(line)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_other_users_are_refused(store: KeeperStore, runtime: Path, memfd: Callable[..., int]) -> None:
    """uid 65534 cannot connect (socket mode 0600); with the mode opened up by hand, SO_PEERCRED
    still refuses every request with EPERM, and an fd it sends is not kept."""
    store.put("mine", memfd(b"root's"))
    os.chmod(runtime.parent, 0o711)
    os.chmod(runtime, 0o711)

    def connect() -> dict[str, Any]:
        try:
            raw_conn(runtime).close()
            return {"closed": "connected"}
        except PermissionError:
            return {"closed": "EACCES"}

    assert as_nobody(connect) == {"closed": "EACCES"}

    os.chmod(runtime / "keeper", 0o666)

    def requests() -> list[dict[str, Any]]:
        s = raw_conn(runtime)
        mine = os.memfd_create("nobody's")
        return [ask(s, {"op": op, **extra}, fds) for op, extra, fds in
                (("ping", {}, []), ("load", {}, []), ("put", {"key": "theirs"}, [mine]), ("drop", {"keys": ["mine"]}, []))]

    replies = as_nobody(requests)
    assert [r["errno"] for r in replies] == [errno.EPERM] * 4
    assert "65534" in replies[0]["error"]
    meta, fds = store.load()
    try:
        assert sorted(fds) == ["mine"] and content_of(fds["mine"]) == b"root's"
    finally:
        for fd in fds.values():
            os.close(fd)
