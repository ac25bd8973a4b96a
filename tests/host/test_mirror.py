"""The fd-store mirror writes what changed (a journal over a snapshot) and the store always says
exactly what the orchestrator holds: checked after every step of random operation sequences, on
an in-memory store, then recovered from (luo.host.mirror)."""

from __future__ import annotations

import base64
import errno
import json
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from luo.abi import CRASH_RECORD_FORMAT_V1, CRASH_SNAPSHOT_FORMAT
from luo.core.crash import HEADER
from luo.core.orchestrator import Orchestrator
from luo.core.session import SessionHandle
from luo.core.states import State
from luo.errors import LuoError
from luo.handlers import default_handlers
from luo.host.handover import read_blob
from luo.host.mirror import JOURNAL_BYTES, JOURNAL_MAX, Mirror, recover_host
from luo.host.tree import tree_for


class MemoryStore:
    """An FdStore in this process: dups of what is put, the last metadata."""

    kind = "memory"

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.meta: bytes | None = None
        self.fail_meta = 0  # refuse this many set_meta calls
        self.metas = 0

    def put(self, key: str, fd: int) -> None:
        self.put_many([(key, fd)])

    def put_many(self, items: Iterable[tuple[str, int]]) -> None:
        for key, fd in items:
            old = self.fds.pop(key, None)
            if old is not None:
                os.close(old)
            self.fds[key] = os.dup(fd)

    def drop(self, keys: Iterable[str]) -> None:
        for key in keys:
            fd = self.fds.pop(key, None)
            if fd is not None:
                os.close(fd)

    def set_meta(self, meta: bytes) -> None:
        if self.fail_meta:
            self.fail_meta -= 1
            raise LuoError(errno.EPIPE, "the test's store refuses the metadata")
        self.meta = bytes(meta)
        self.metas += 1

    def load(self) -> tuple[bytes | None, dict[str, int]]:
        return self.meta, {key: os.dup(fd) for key, fd in self.fds.items()}

    def close(self) -> None:
        self.drop(list(self.fds))


def units_in(store: MemoryStore) -> tuple[dict[tuple[Any, ...], dict[str, Any]], dict[str, Any]]:
    """What the store's metadata describes: its snapshot with the journal applied; and the metadata."""
    assert store.meta is not None
    doc = json.loads(store.meta)
    snap = json.loads(read_blob(store.fds[doc["base"]], doc["base_size"]))
    assert snap["format"] == CRASH_SNAPSHOT_FORMAT
    units: dict[tuple[Any, ...], dict[str, Any]] = {}
    for entries in [snap["units"], *doc["journal"]]:
        for key, unit in entries:
            if unit is None:
                units.pop(tuple(key), None)
            else:
                units[tuple(key)] = unit
    return units, doc


def grouped(units: dict[tuple[Any, ...], dict[str, Any]]) -> dict[str, Any]:
    """The order that matters: sessions in creation order, each one's files in preservation order
    (the global table is walked by token anyway)."""
    out: dict[str, Any] = {"h": units.get(HEADER), "gf": sorted(k[1] for k in units if k[0] in ("gf", "igf"))}
    for kind, fkind in (("s", "sf"), ("is", "isf")):
        out[kind] = [(k[1], units[k]["meta"]) for k in units if k[0] == kind]
        files: dict[str, list[Any]] = {}
        for k in units:
            if k[0] == fkind:
                files.setdefault(k[1], []).append((k[2], units[k]["data"], units[k]["compatible"]))
        out[fkind] = files
    return out


def check_store(store: MemoryStore, mirror: Mirror, orch: Orchestrator) -> None:
    units, doc = units_in(store)
    full = orch.crash_units()
    assert grouped(units) == grouped(full)  # type: ignore[arg-type]
    for key, unit in full.items():
        if unit is not None and "fd" in unit:
            stored = units[key]["key"]
            assert os.fstat(store.fds[stored]).st_ino == os.fstat(unit["fd"]).st_ino, key
    named = {u["key"] for u in units.values() if "key" in u} | {doc["base"]}
    assert set(store.fds) == named  # nothing leaked, nothing missing
    assert len(doc["journal"]) <= JOURNAL_MAX and len(store.meta or b"") < JOURNAL_BYTES + 4096
    assert mirror.fd_count == len(named) - 1


class World:
    """An orchestrator with the real handlers on real memfds, and the fds a host would close."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.orch = Orchestrator(default_handlers())
        self.handles: list[SessionHandle] = []
        self.mine: list[int] = []  # fds the test got back (retrieve/restore)

    def memfd(self) -> int:
        fd = os.memfd_create(f"m{self.r.randrange(1000)}", 0)
        os.ftruncate(fd, self.r.choice([0, 4096, 8192]))
        return fd

    def settle(self) -> None:
        for fd in self.orch.take_released_fds():
            os.close(fd)

    def step(self) -> None:
        o, r = self.orch, self.r
        op = r.choice(["session", "session", "spreserve", "spreserve", "spreserve", "close", "preserve", "unpreserve",
                       "prepare", "handover", "retrieve", "rfd", "rfd", "sfinish", "restore", "finish"])
        fd = -1
        try:
            if op == "session":
                self.handles.append(o.create_session(r.choice("abcdefgh")))
            elif op == "spreserve" and self.handles:
                fd = self.memfd()
                r.choice(self.handles).preserve_fd(fd, r.randrange(6))
                fd = -1
            elif op == "close" and self.handles:
                o.close_session(r.choice(self.handles))
            elif op == "preserve":
                fd = self.memfd()
                o.preserve_fd(fd, r.choice([None, r.randrange(6)]))
                fd = -1
            elif op == "unpreserve":
                o.unpreserve_fd(r.randrange(6))
            elif op == "prepare":
                o.prepare()
                o.cancel()
            elif op == "handover" and r.random() < 0.3:
                self.handover()
            elif op == "retrieve":
                self.handles.append(o.retrieve_session(r.choice("abcdefgh")))
            elif op == "rfd" and self.handles:
                self.mine.append(r.choice(self.handles).retrieve_fd(r.randrange(6)))
            elif op == "sfinish" and self.handles:
                r.choice(self.handles).finish()
            elif op == "restore":
                self.mine.append(o.restore_fd(r.randrange(6)))
            elif op == "finish":
                o.finish()
        except LuoError:
            pass
        finally:
            if fd >= 0:
                os.close(fd)
        self.settle()

    def handover(self) -> None:
        o = self.orch
        o.prepare()
        o.freeze()
        record, fds = o.outgoing_record()
        o.handover_complete()  # the fds now belong to the successor: the same numbers, in this process
        self.orch = Orchestrator(default_handlers(), incoming=record, incoming_fds=fds)
        self.handles = []

    def close(self) -> None:
        for fd in self.mine:
            os.close(fd)
        if self.orch.state is State.UPDATED:
            self.orch.finish()
        for h in list(self.orch.sessions()):
            self.orch.close_session(h)
        for pf in list(self.orch.status()["files"]):  # type: ignore[union-attr]
            self.orch.unpreserve_fd(pf["token"])  # type: ignore[index]
        self.settle()


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    s = MemoryStore()
    yield s
    s.close()


@pytest.mark.parametrize("seed", range(12))
def test_store_says_what_the_orchestrator_holds(seed: int, store: MemoryStore) -> None:
    world = World(seed)
    mirror = Mirror(store)
    try:
        for _ in range(250):
            world.step()
            mirror.sync(world.orch)
            assert mirror.failed is None, mirror.failed
            check_store(store, mirror, world.orch)
    finally:
        world.close()


def test_a_request_writes_what_it_changed(store: MemoryStore) -> None:
    """300 sessions in, one more preserve writes one unit, not the record of everything."""
    orch = Orchestrator(default_handlers())
    mirror = Mirror(store)
    fds = []
    for i in range(300):
        fds.append(fd := os.memfd_create(f"m{i}", 0))
        orch.create_session(f"s{i}").preserve_fd(os.dup(fd), 1)
        mirror.sync(orch)
    try:
        h = orch.create_session("one-more")
        mirror.sync(orch)
        h.preserve_fd(os.memfd_create("last", 0), 1)
        before = store.metas
        mirror.sync(orch)
        assert store.metas == before + 1
        _units, doc = units_in(store)
        if doc["journal"]:  # else this write happened to store a snapshot
            assert doc["journal"][-1] == [[["sf", "one-more", 1], doc["journal"][-1][0][1]]]
            assert len(json.dumps(doc["journal"][-1])) < 1000
        assert mirror.snapshots >= 300 // JOURNAL_MAX
        check_store(store, mirror, orch)
    finally:
        for h in orch.sessions():
            orch.close_session(h)
        for fd in [*orch.take_released_fds(), *fds]:
            os.close(fd)


def test_a_failed_write_is_redone_and_leaks_nothing(store: MemoryStore) -> None:
    orch = Orchestrator(default_handlers())
    mirror = Mirror(store)
    a = orch.create_session("a")
    a.preserve_fd(os.memfd_create("a", 0), 1)
    mirror.sync(orch)
    store.fail_meta = 1
    b = orch.create_session("b")
    b.preserve_fd(os.memfd_create("b", 0), 1)
    mirror.sync(orch)
    assert mirror.failed is not None and "refuses" in mirror.failed
    orch.close_session(b)  # gone before the next write: its fd, put by the failed one, must go too
    for fd in orch.take_released_fds():
        os.close(fd)
    mirror.sync(orch)
    assert mirror.failed is None
    check_store(store, mirror, orch)
    orch.close_session(a)
    for fd in orch.take_released_fds():
        os.close(fd)


def test_a_lost_store_gets_everything_again(store: MemoryStore) -> None:
    orch = Orchestrator(default_handlers())
    mirror = Mirror(store)
    s = orch.create_session("s")
    s.preserve_fd(os.memfd_create("s", 0), 1)
    mirror.sync(orch)
    store.close()  # a keeper died; the new one holds nothing
    store.meta = None
    mirror.lost = True
    mirror.sync(orch)
    check_store(store, mirror, orch)
    orch.close_session(s)
    for fd in orch.take_released_fds():
        os.close(fd)


def test_recovered_from_the_journal(store: MemoryStore) -> None:
    orch = Orchestrator(default_handlers())
    mirror = Mirror(store)
    sessions = []
    for i in range(JOURNAL_MAX + 20):  # a snapshot and a journal over it
        sessions.append(h := orch.create_session(f"vm{i}", ))
        fd = os.memfd_create(f"ram{i}", 0)
        os.ftruncate(fd, 4096 * (i + 1))
        h.preserve_fd(fd, i)
        mirror.sync(orch)
    g = os.memfd_create("global", 0)
    token = orch.preserve_fd(g)
    orch.close_session(sessions[3])
    mirror.sync(orch)
    meta, fds = store.load()
    assert meta is not None and json.loads(meta)["journal"]
    rec = recover_host(meta, fds, default_handlers(), [])
    try:
        st = rec.orch.status()
        names = [s["name"] for s in st["sessions"]]  # type: ignore[index,union-attr]
        assert names == [f"vm{i}" for i in range(JOURNAL_MAX + 20) if i != 3]
        assert rec.report["fds"] == JOURNAL_MAX + 20 and rec.report["refused_fds"] == 0
        sizes = {f["session"]: int(f["size"]) for f in st["files"] if f["session"]}  # type: ignore[index,union-attr]
        assert sizes["vm7"] == 4096 * 8
        assert any(f["token"] == token and f["session"] is None for f in st["files"])  # type: ignore[index,union-attr]
    finally:
        for h in rec.sessions:
            rec.orch.close_session(h)
        rec.orch.unpreserve_fd(token)
        for fd in rec.orch.take_released_fds():
            os.close(fd)
        for h in orch.sessions():
            orch.close_session(h)
        orch.unpreserve_fd(token)
        for fd in orch.take_released_fds():
            os.close(fd)


def test_recovered_from_a_v1_record(store: MemoryStore) -> None:
    """The whole-record format of hosts before the journal is still read."""
    orch = Orchestrator(default_handlers())
    fd = os.memfd_create("old-format", 0)
    orch.create_session("old").preserve_fd(fd, 9)
    cr = orch.crash_record()
    keys = [f"k.{i}" for i in range(len(cr.outgoing_fds))]
    store.put_many(zip(keys, cr.outgoing_fds, strict=True))
    meta = json.dumps({"format": CRASH_RECORD_FORMAT_V1, "state": "normal", "liveupdate_number": 4, "pid": 1,
                       "outgoing": base64.b64encode(tree_for(cr.outgoing)).decode(), "outgoing_keys": keys,
                       "incoming": None, "incoming_keys": []}).encode()
    _, fds = store.load()
    rec = recover_host(meta, fds, default_handlers(), [])
    try:
        assert rec.orch.liveupdate_number == 4
        assert [(f["token"], f["session"]) for f in rec.orch.status()["files"]] == [(9, "old")]  # type: ignore[index,union-attr]
    finally:
        for h in rec.sessions:
            rec.orch.close_session(h)
        for x in [*rec.orch.take_released_fds()]:
            os.close(x)
        for h in orch.sessions():
            orch.close_session(h)
        for x in orch.take_released_fds():
            os.close(x)


@pytest.mark.parametrize("damage", ["snapshot key", "file key", "unit", "journal"])
def test_damaged_metadata_is_refused_cleanly(store: MemoryStore, damage: str) -> None:
    orch = Orchestrator(default_handlers())
    mirror = Mirror(store)
    h = orch.create_session("s")
    h.preserve_fd(os.memfd_create("s", 0), 1)
    mirror.sync(orch)
    h2 = orch.create_session("t")
    mirror.sync(orch)
    meta, fds = store.load()
    assert meta is not None
    doc = json.loads(meta)
    if damage == "snapshot key":
        doc["base"] = "nowhere"
    elif damage == "file key":
        fds = {k: v for k, v in fds.items() if ".snap" in k or os.close(v)}  # type: ignore[func-returns-value]
    elif damage == "unit":
        doc["journal"] = [[[["sf", "s", 2], 5]]]
    else:
        doc["journal"] = "x"
    before, given = len(os.listdir("/proc/self/fd")), len(fds)
    with pytest.raises(LuoError) as ei:
        recover_host(json.dumps(doc).encode(), fds, default_handlers(), [])
    assert ei.value.errno in (errno.EINVAL, errno.ENOENT, errno.EPROTO)
    assert len(os.listdir("/proc/self/fd")) == before - given  # every fd it was given is closed
    for x in (h, h2):
        orch.close_session(x)
    for fd in orch.take_released_fds():
        os.close(fd)
