"""The systemd backend, against the test playing systemd for real: a SOCK_DGRAM socket as
$NOTIFY_SOCKET receiving the datagrams and their fds, and a child process started the way systemd
starts a service with a non-empty fd store (fds from 3, LISTEN_PID set to the child's own pid)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from keeper_helpers import WRAPPER, FakeSystemd, content_of

from luo.errors import LuoError
from luo.keeper import open_store
from luo.keeper.systemd import SystemdStore, notify_address, passed_fds

F_GET_SEALS = 1034


@pytest.fixture
def systemd(short_dir: Path) -> Iterator[tuple[FakeSystemd, dict[str, str]]]:
    path = str(short_dir / "notify")
    fake = FakeSystemd(path)
    yield fake, {"NOTIFY_SOCKET": path, "FDSTORE": "16"}
    fake.close()


def test_put_drop_meta_datagrams(systemd: tuple[FakeSystemd, dict[str, str]], memfd: Callable[..., int]) -> None:
    fake, env = systemd
    a = memfd(b"alpha")
    with SystemdStore(env) as store:
        assert store.kind == "systemd"
        store.put("vm/a", a)
        (remove, no_fds), (stored, fds) = fake.apply(2)
        assert remove == "FDSTOREREMOVE=1\nFDNAME=vm/a" and no_fds == []
        assert stored == "FDSTORE=1\nFDNAME=vm/a\nFDPOLL=0"
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(a).st_ino
        assert content_of(fds[0]) == b"alpha"
        for fd in fds:
            os.close(fd)

        store.set_meta(b'{"v":2}')
        (remove, _), (stored, fds) = fake.apply(2)
        assert remove == "FDSTOREREMOVE=1\nFDNAME=luo-meta"
        assert stored == "FDSTORE=1\nFDNAME=luo-meta\nFDPOLL=0"
        assert content_of(fds[0]) == b'{"v":2}'
        assert fcntl.fcntl(fds[0], F_GET_SEALS) & 0xF == 0xF  # sealed: immutable in the store
        os.close(fds[0])

        store.drop(["vm/a", "vm/never"])
        got = fake.apply(2)
        assert [t for t, _ in got] == ["FDSTOREREMOVE=1\nFDNAME=vm/a", "FDSTOREREMOVE=1\nFDNAME=vm/never"]
        assert [name for name, _ in fake.store] == ["luo-meta"]

        with pytest.raises(LuoError) as ei:
            store.put("a:b", a)  # ':' would corrupt $LISTEN_FDNAMES
        assert ei.value.errno == errno.EINVAL


def test_abstract_notify_socket(memfd: Callable[..., int]) -> None:
    name = f"@luo-test-{uuid.uuid4().hex}"
    assert notify_address(name) == "\0" + name[1:]
    fake = FakeSystemd("\0" + name[1:])
    try:
        with SystemdStore({"NOTIFY_SOCKET": name}) as store:
            fd = memfd(b"abstract")
            store.put("k", fd)
            _, (text, fds) = fake.apply(2)
            assert text.startswith("FDSTORE=1\nFDNAME=k\n")
            assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
            for f in fds:
                os.close(f)
    finally:
        fake.close()


def test_full_store_refused_not_silently_dropped(systemd: tuple[FakeSystemd, dict[str, str]],
                                                 memfd: Callable[..., int]) -> None:
    fake, env = systemd
    fd = memfd(b"")
    with SystemdStore({**env, "FDSTORE": "2"}) as store:
        store.put("a", fd)
        store.put("b", fd)
        store.put("a", fd)  # a replacement needs no room
        fake.apply(6)
        with pytest.raises(LuoError) as ei:
            store.put("c", fd)
        assert ei.value.errno == errno.ENOSPC
        store.drop(["b"])
        fake.apply(1)
        store.put("c", fd)
        fake.apply(2)


def test_unreachable_notify_socket_raises(short_dir: Path, memfd: Callable[..., int]) -> None:
    with SystemdStore({"NOTIFY_SOCKET": str(short_dir / "nobody")}) as store:
        with pytest.raises(LuoError) as ei:
            store.put("a", memfd(b""))
        assert ei.value.errno == errno.ENOENT


def test_open_store_chooses_systemd(systemd: tuple[FakeSystemd, dict[str, str]], short_dir: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, env = systemd
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LUO_FDSTORE", raising=False)
    store = open_store(short_dir / "rt")
    assert store.kind == "systemd"
    store.close()
    assert not (short_dir / "rt").exists()  # no keeper was started


def test_inherited_listen_vars_of_another_process_are_ignored() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "LISTEN_PID": str(os.getppid()), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:b:c"}
    assert passed_fds(env) is None
    store = SystemdStore(env)
    assert store.load() == (None, {})  # and fds 3.. of this process were not touched
    assert not any(k.startswith("LISTEN_") for k in env)  # removed all the same
    store.close()


CHILD = r"""
import errno, fcntl, json, os
from luo.errors import LuoError
from luo.keeper.systemd import SystemdStore

def is_open(fd):
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return True
    except OSError:
        return False

n = int(os.environ["LISTEN_FDS"])
store = SystemdStore()
meta, fds = store.load()
still_open = [fd for fd in range(3, 3 + n) if is_open(fd)]
out = {
    "meta": meta.decode() if meta is not None else None,
    "fds": {k: {"content": os.pread(fd, 100, 0).decode(), "ino": os.fstat(fd).st_ino,
                "inheritable": os.get_inheritable(fd)} for k, fd in fds.items()},
    "still_open": still_open,
    "env": [v for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if v in os.environ],
}
try:
    store.load()
    out["again"] = 0
except LuoError as e:
    out["again"] = e.errno
print(json.dumps(out))
"""


def start_like_systemd(passed: list[tuple[str, int]], env: dict[str, str]) -> dict:
    child_env = {**os.environ, **env, "LISTEN_FDS": str(len(passed)),
                 "LISTEN_FDNAMES": ":".join(name for name, _ in passed)}
    child_env.pop("LISTEN_PID", None)
    fds = [fd for _, fd in passed]
    cp = subprocess.run([sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), CHILD], pass_fds=fds,
                        env=child_env, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_restart_gets_the_store_back(systemd: tuple[FakeSystemd, dict[str, str]],
                                     memfd: Callable[..., int]) -> None:
    """Round trip through the fake manager: what a store put comes back, by name, in a process
    started with the manager's fds; a name holding two fds yields one, the other closed."""
    fake, env = systemd
    a, b, extra = memfd(b"alpha"), memfd(b"bravo"), memfd(b"second")
    with SystemdStore(env) as store:
        store.put("vm/a", a)
        store.put("vm/b", b)
        store.put("vm/b", b)  # replaced, not doubled
        store.set_meta(b'{"keys":["vm/a","vm/b"]}')
        fake.apply(8)
    fake.store.append(("vm/a", os.dup(extra)))  # a second fd under one name (as an FDSTORE=1 without removal)
    names = [name for name, _ in fake.store]
    assert names == ["vm/a", "vm/b", "luo-meta", "vm/a"]

    out = start_like_systemd(fake.store, env)
    assert out["meta"] == '{"keys":["vm/a","vm/b"]}'
    assert sorted(out["fds"]) == ["vm/a", "vm/b"]
    assert out["fds"]["vm/a"] == {"content": "alpha", "ino": os.fstat(a).st_ino, "inheritable": False}
    assert out["fds"]["vm/b"] == {"content": "bravo", "ino": os.fstat(b).st_ino, "inheritable": False}
    assert out["still_open"] == [3, 4]  # the meta memfd (5) and the duplicate (6) were closed
    assert out["env"] == []
    assert out["again"] == errno.EALREADY
