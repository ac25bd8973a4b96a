"""The keeper backend: what it stores comes back as the same files, it outlives its clients, one
keeper per runtime dir, and it reconnects after losing its keeper."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from keeper_helpers import content_of, keeper_pids

from luo.errors import LuoError
from luo.keeper import choose_backend, open_store, validate_key
from luo.keeper.client import KeeperStore
from luo.keeper.server import bind_keeper_socket
from luo.testing.processes import alive


def test_round_trip(store: KeeperStore, memfd: Callable[..., int]) -> None:
    a, b, c = memfd(b"alpha"), memfd(b"bravo" * 1000), memfd(b"")
    store.put("vm/a", a)
    store.put_many([("vm/b", b), ("c@x", c)])
    store.set_meta(b'{"v":1}')
    meta, fds = store.load()
    try:
        assert meta == b'{"v":1}'
        assert sorted(fds) == ["c@x", "vm/a", "vm/b"]
        assert content_of(fds["vm/a"]) == b"alpha" and content_of(fds["vm/b"]) == b"bravo" * 1000
        for key, orig in (("vm/a", a), ("vm/b", b), ("c@x", c)):
            assert os.fstat(fds[key]).st_ino == os.fstat(orig).st_ino
            assert fds[key] != orig
        # the same open file description, not a reopened file: the offset is shared
        os.lseek(a, 3, os.SEEK_SET)
        assert os.lseek(fds["vm/a"], 0, os.SEEK_CUR) == 3
        assert os.get_inheritable(fds["vm/a"]) is False
    finally:
        for fd in fds.values():
            os.close(fd)

    d = memfd(b"delta")
    store.put("vm/a", d)  # replaces
    store.drop(["vm/b", "never-stored"])
    store.set_meta(b"x" * (3 << 20))  # a few MiB travels in the memfd, not the datagram
    meta, fds = store.load()
    try:
        assert meta == b"x" * (3 << 20)
        assert sorted(fds) == ["c@x", "vm/a"]
        assert content_of(fds["vm/a"]) == b"delta"
    finally:
        for fd in fds.values():
            os.close(fd)


def test_empty_store_loads_nothing(store: KeeperStore) -> None:
    assert store.load() == (None, {})
    store.set_meta(b"")
    assert store.load() == (b"", {})


def test_keeper_is_detached_and_named(store: KeeperStore, runtime: Path) -> None:
    [pid] = keeper_pids(runtime)
    assert store.pid == pid
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # a session of its own
    assert os.getsid(pid) != os.getsid(0)
    sock = runtime / "keeper"
    assert sock.stat().st_mode & 0o777 == 0o600
    # its fds: 0 and 1 on /dev/null, 2 on keeper.log, nothing of ours
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null" == os.readlink(f"/proc/{pid}/fd/1")
    assert os.readlink(f"/proc/{pid}/fd/2") == str(runtime / "keeper.log")
    assert "keeper serving" in (runtime / "keeper.log").read_text()


CLIENT = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from luo.keeper import open_store
store = open_store(Path(sys.argv[1]))
sums = {}
for i in range(20):
    fd = os.memfd_create(f"guest-ram-{i}")
    data = os.urandom(256 * 1024 + i)
    os.write(fd, data)
    store.put(f"ram/{i}", fd)
    sums[f"ram/{i}"] = hashlib.sha256(data).hexdigest()
    os.close(fd)  # the keeper now holds the only reference
store.set_meta(json.dumps(sums).encode())
print(json.dumps({"sums": sums, "keeper": store.pid}), flush=True)
time.sleep(3600)
"""


def test_keeper_outlives_its_client(runtime: Path) -> None:
    """A client stores fds it then closes and is SIGKILLed: a new client loads them bit-exact."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(runtime)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        got = json.loads(line)
    finally:
        proc.kill()
        proc.wait()
    assert alive(got["keeper"])
    with open_store(runtime) as store:  # type: ignore[attr-defined]
        assert store.pid == got["keeper"]
        meta, fds = store.load()
        try:
            assert meta is not None and json.loads(meta) == got["sums"]
            assert {k: hashlib.sha256(content_of(fd)).hexdigest() for k, fd in fds.items()} == got["sums"]
        finally:
            for fd in fds.values():
                os.close(fd)
    assert keeper_pids(runtime) == [got["keeper"]]


STARTER = r"""
import sys
from pathlib import Path
from luo.keeper import open_store
sys.stdin.read(1)
store = open_store(Path(sys.argv[1]))
print(store.pid, flush=True)
"""


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_starts_make_one_keeper(runtime: Path, round_: int) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(runtime)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(0.3)  # let them all import, then release them at once
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("g")
        p.stdin.flush()
    outs = [p.communicate(timeout=30) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    pids = {int(out) for out, _ in outs}
    assert len(pids) == 1
    deadline = time.monotonic() + 5
    while len(keeper_pids(runtime)) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the losers exit at once; wait for their exit to be visible
    assert keeper_pids(runtime) == list(pids)
    assert (runtime / "keeper.log").read_text().count("keeper serving") == 1  # one ever served


def test_bind_is_refused_while_a_keeper_answers(store: KeeperStore, runtime: Path) -> None:
    """The keeper's own check, for a starter that got past the lock (e.g. a lock file removed by
    hand): a socket that answers is never unlinked."""
    assert bind_keeper_socket(runtime / "keeper") is None
    assert store.ping()["pid"] == store.pid


def test_second_keeper_exits_zero(store: KeeperStore, runtime: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "luo", "--runtime-dir", str(runtime), "keeper"],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0
    assert keeper_pids(runtime) == [store.pid]


def test_stale_socket_file_is_replaced(runtime: Path, memfd: Callable[..., int]) -> None:
    runtime.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(runtime / "keeper"))
    stale.close()  # the file stays, nobody listens: a crashed keeper's leftover
    with KeeperStore(runtime) as store:
        store.put("k", memfd(b"1"))
        assert list(store.load()[1]) == ["k"]


def test_keeper_that_cannot_start_is_reported(runtime: Path) -> None:
    runtime.mkdir(mode=0o700)
    (runtime / "keeper.lock").mkdir()  # the keeper cannot open its lock file
    t0 = time.monotonic()
    with pytest.raises(LuoError) as ei:
        KeeperStore(runtime)
    assert time.monotonic() - t0 < 8  # noticed the exit, did not wait for the deadline
    assert ei.value.errno == errno.ESRCH
    assert "keeper.lock" in ei.value.message


def test_no_start_when_asked_not_to(runtime: Path) -> None:
    with pytest.raises(LuoError) as ei:
        KeeperStore(runtime, start=False)
    assert ei.value.errno == errno.ECONNREFUSED
    assert keeper_pids(runtime) == []


def test_reconnects_to_a_new_keeper_and_says_so(store: KeeperStore, runtime: Path,
                                                memfd: Callable[..., int]) -> None:
    lost: list[str] = []
    store.on_lost = lambda: lost.append(store.instance or "")
    store.put("old", memfd(b"old"))
    first = store.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(first) and time.monotonic() < deadline:
        time.sleep(0.01)
    store.put("new", memfd(b"new"))  # the connection broke: reconnect, start a keeper, retry
    assert store.pid != first and len(lost) == 1
    meta, fds = store.load()
    try:
        assert meta is None and sorted(fds) == ["new"]  # the dead keeper took "old" with it
    finally:
        for fd in fds.values():
            os.close(fd)
    # a keeper killed between calls: the next load starts over on a fresh one
    second = store.pid
    assert second is not None
    os.kill(second, signal.SIGKILL)
    while alive(second) and time.monotonic() < deadline + 5:
        time.sleep(0.01)
    assert store.load() == (None, {})
    assert len(lost) == 2


def test_validate_key() -> None:
    for good in ("a", "vm/guest-1/ram.0", "x" * 200, "A.Z_0-9/@+=", "session=7"):
        assert validate_key(good) == good
    for bad in ("", "x" * 201, "a:b", "a b", "a\nFDSTORE=1", "é", "luo-meta", None, 7, b"a"):
        with pytest.raises(LuoError) as ei:
            validate_key(bad)
        assert ei.value.errno == errno.EINVAL


def test_bad_keys_refused_before_sending(store: KeeperStore, memfd: Callable[..., int]) -> None:
    fd = memfd(b"")
    with pytest.raises(LuoError):
        store.put("a:b", fd)
    with pytest.raises(LuoError):
        store.put_many([("ok", fd), ("luo-meta", fd)])
    with pytest.raises(LuoError):
        store.drop(["ok", "a b"])
    assert store.load() == (None, {})


def test_choose_backend() -> None:
    assert choose_backend({}) == "keeper"
    assert choose_backend({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "keeper"  # no fd store configured
    assert choose_backend({"NOTIFY_SOCKET": "/run/systemd/notify", "FDSTORE": "0"}) == "keeper"
    assert choose_backend({"NOTIFY_SOCKET": "/run/systemd/notify", "FDSTORE": "4096"}) == "systemd"
    assert choose_backend({"NOTIFY_SOCKET": "@x", "FDSTORE": "4096", "LUO_FDSTORE": "keeper"}) == "keeper"
    assert choose_backend({"NOTIFY_SOCKET": "@x", "LUO_FDSTORE": "systemd"}) == "systemd"
    for env in ({"LUO_FDSTORE": "systemd"}, {"LUO_FDSTORE": "disk"}):
        with pytest.raises(LuoError) as ei:
            choose_backend(env)
        assert ei.value.errno == errno.EINVAL


def test_open_store_honours_luo_fdstore(runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    monkeypatch.setenv("FDSTORE", "16")
    monkeypatch.setenv("LUO_FDSTORE", "keeper")
    store = open_store(runtime)
    try:
        assert store.kind == "keeper"
        assert "NOTIFY_SOCKET" not in open(f"/proc/{store.pid}/environ").read()  # type: ignore[attr-defined]
    finally:
        store.close()
    monkeypatch.delenv("LUO_FDSTORE")
    store = open_store(runtime)
    assert store.kind == "systemd"
    store.close()


def test_relative_runtime_dir(runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keeper runs in /, so it is given the absolute path (which kill_all also finds it by)."""
    monkeypatch.chdir(runtime.parent)
    with KeeperStore(Path(runtime.name)) as store:
        assert store.root == runtime
        assert (runtime / "keeper").is_socket()
        assert keeper_pids(runtime) == [store.pid]
