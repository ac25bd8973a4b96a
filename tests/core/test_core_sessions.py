"""6.19 sessions on the shared file machinery."""

from __future__ import annotations

import errno

import pytest
from core_participants import RecHandler, World

from luo.core import Orchestrator, SessionHandle, State
from luo.core.handover import FileRecord, LuoRecord, SessionRecord
from luo.core.participants import Owner
from luo.errors import LuoError


def err(exc: pytest.ExceptionInfo[LuoError]) -> int:
    return exc.value.errno


@pytest.fixture
def orch(world: World) -> Orchestrator:
    return Orchestrator([RecHandler(world)])


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "n" * 63, "é" * 31 + "x", "vm/42 disk"])
def test_names_up_to_63_bytes(orch: Orchestrator, name: str) -> None:
    assert orch.create_session(name).name == name


@pytest.mark.parametrize("name", ["", "n" * 64, "é" * 32, "a\0b"])
def test_bad_names_are_einval(orch: Orchestrator, name: str) -> None:
    with pytest.raises(LuoError) as exc:
        orch.create_session(name)
    assert err(exc) == errno.EINVAL


def test_duplicate_session_is_eexist(orch: Orchestrator) -> None:
    orch.create_session("vm1")
    with pytest.raises(LuoError) as exc:
        orch.create_session("vm1")
    assert err(exc) == errno.EEXIST


def test_name_is_free_again_after_close(orch: Orchestrator) -> None:
    orch.close_session(orch.create_session("vm1"))
    orch.create_session("vm1")


def incoming(world: World, *sessions: tuple[str, tuple[int, ...]]) -> tuple[Orchestrator, RecHandler, list[int]]:
    fds: list[int] = []
    recs = []
    for name, tokens in sessions:
        files = []
        for t in tokens:
            fds.append(world.new_file(content=f"{name}:{t}"))
            files.append(FileRecord(t, "mem-v1", t, len(fds) - 1))
        recs.append(SessionRecord(name, tuple(files), {"pid": "9", "uid": "0", "comm": "vmm"}))
    h = RecHandler(world)
    return Orchestrator([h], incoming=LuoRecord(3, sessions=tuple(recs)), incoming_fds=fds), h, fds


def test_name_unique_against_unretrieved_incoming(world: World) -> None:
    orch, _, _ = incoming(world, ("vm1", (1,)))
    with pytest.raises(LuoError) as exc:
        orch.create_session("vm1")
    assert err(exc) == errno.EEXIST
    orch.retrieve_session("vm1")
    out = orch.create_session("vm1")  # the retrieved one no longer reserves the name
    assert out.direction == "out"


@pytest.mark.parametrize("state", [State.PREPARED, State.FROZEN])
def test_create_session_ebusy_during_update(orch: Orchestrator, state: State) -> None:
    orch.prepare()
    if state is State.FROZEN:
        orch.freeze()
    with pytest.raises(LuoError) as exc:
        orch.create_session("late")
    assert err(exc) == errno.EBUSY


def test_create_session_in_updated(world: World) -> None:
    orch, _, _ = incoming(world)
    orch.create_session("next").preserve_fd(world.new_file(), 1)


# -- preserve -------------------------------------------------------------------------------


def test_session_preserve(world: World, orch: Orchestrator) -> None:
    h = orch.create_session("vm1", owner=Owner(7, 0, "vmm"))
    assert h.preserve_fd(world.new_file(), 42) == 42
    assert world.ops("preserve") == [("file", "preserve", "mem-v1", 42, "vm1")]
    (f,) = orch.status()["files"]  # type: ignore[misc]
    assert f["session"] == "vm1" and f["owner"] == {"pid": 7, "uid": 0, "comm": "vmm"}
    assert h.tokens == [42]


def test_session_token_unique_in_session_only(world: World, orch: Orchestrator) -> None:
    a, b = orch.create_session("a"), orch.create_session("b")
    a.preserve_fd(world.new_file(), 1)
    b.preserve_fd(world.new_file(), 1)
    orch.preserve_fd(world.new_file(), 1)
    with pytest.raises(LuoError) as exc:
        a.preserve_fd(world.new_file(), 1)
    assert err(exc) == errno.EEXIST


def test_no_limit_on_files_or_sessions(world: World, orch: Orchestrator) -> None:
    """v7.2 dropped 6.19's 128 files per session (ENOSPC) and its ~744 sessions."""
    h = orch.create_session("big")
    for t in range(1000):
        h.preserve_fd(world.new_file(), t)
    for i in range(2000):
        orch.create_session(f"s{i}").preserve_fd(world.new_file(), 0)
    assert len(h.tokens) == 1000 and len(orch.status()["sessions"]) == 2001  # type: ignore[arg-type]


# -- one file, preserved once (v7.2: EBUSY) --------------------------------------------------


def test_same_file_twice_is_ebusy_anywhere(world: World, orch: Orchestrator) -> None:
    fd = world.new_file()
    a, b = orch.create_session("a"), orch.create_session("b")
    a.preserve_fd(fd, 1)
    world.clear()
    for attempt in (lambda: a.preserve_fd(world.alias(fd), 2),  # same session, other token
                    lambda: b.preserve_fd(world.alias(fd), 1),  # another session
                    lambda: orch.preserve_fd(world.alias(fd))):  # the RFC v2 global table
        with pytest.raises(LuoError) as exc:
            attempt()
        assert err(exc) == errno.EBUSY
        assert "already preserves" in exc.value.message and "session 'a'" in exc.value.message
    assert world.log == []  # refused before the handler's preserve
    assert a.tokens == [1] and b.tokens == []


def test_ebusy_after_eexist_and_enoent(world: World, orch: Orchestrator) -> None:
    """The kernel's order: token in use (EEXIST), then no handler (ENOENT), then EBUSY."""
    fd = world.new_file()
    s = orch.create_session("s")
    s.preserve_fd(fd, 1)
    with pytest.raises(LuoError) as exc:
        s.preserve_fd(world.alias(fd), 1)
    assert err(exc) == errno.EEXIST
    with pytest.raises(LuoError) as exc:
        s.preserve_fd(world.new_file(kind="devnull"), 2)
    assert err(exc) == errno.ENOENT


def test_file_is_free_again_once_unpreserved(world: World, orch: Orchestrator) -> None:
    fd = world.new_file()
    token = orch.preserve_fd(fd)
    s = orch.create_session("s")
    with pytest.raises(LuoError):
        s.preserve_fd(world.alias(fd), 1)
    orch.unpreserve_fd(token)
    s.preserve_fd(world.alias(fd), 1)  # free after unpreserve
    orch.close_session(s)
    orch.create_session("t").preserve_fd(world.alias(fd), 1)  # and after its session closed


def test_failed_preserve_leaves_the_file_free(world: World) -> None:
    h = RecHandler(world)
    h.fail[("preserve", 5)] = errno.EIO
    orch = Orchestrator([h])
    fd = world.new_file()
    with pytest.raises(LuoError):
        orch.create_session("s").preserve_fd(fd, 5)
    orch.create_session("t").preserve_fd(world.alias(fd), 6)


def test_retrieved_file_may_be_preserved_again(world: World) -> None:
    """Incoming files do not count: as in the kernel, where retrieve gives a new struct file."""
    orch, _, fds = incoming(world, ("vm1", (1,)))
    orch.retrieve_session("vm1").retrieve_fd(1)
    nxt = orch.create_session("vm1-next")
    nxt.preserve_fd(world.alias(fds[0]), 1)  # the very file that came in, before vm1 is finished
    with pytest.raises(LuoError) as exc:
        orch.create_session("other").preserve_fd(world.alias(fds[0]), 1)
    assert err(exc) == errno.EBUSY  # but once preserved again, it is preserved


def test_preserved_size(world: World) -> None:
    orch, _, fds = incoming(world, ("vm1", (1,)))
    ident = ("fake", id(world.files[fds[0]]))
    assert orch.preserved_size(ident) == (True, 1)  # incoming, not retrieved: frozen
    h = orch.retrieve_session("vm1")
    h.retrieve_fd(1)
    assert orch.preserved_size(ident) == (True, 1)  # retrieved, not finished: still frozen
    h.finish()
    assert orch.preserved_size(ident) == (False, None)
    fd = world.new_file()
    orch.create_session("out").preserve_fd(fd, 7)
    assert orch.preserved_size(("fake", id(world.files[fd]))) == (True, 1007)  # RecHandler's data
    assert orch.preserved_size(("fake", 0)) == (False, None)


def test_session_preserve_no_handler(world: World, orch: Orchestrator) -> None:
    with pytest.raises(LuoError) as exc:
        orch.create_session("s").preserve_fd(world.new_file(kind="devnull"), 1)
    assert err(exc) == errno.ENOENT


@pytest.mark.parametrize("state", [State.PREPARED, State.FROZEN])
def test_session_preserve_ebusy_during_update(world: World, orch: Orchestrator, state: State) -> None:
    h = orch.create_session("s")
    orch.prepare()
    if state is State.FROZEN:
        orch.freeze()
    with pytest.raises(LuoError) as exc:
        h.preserve_fd(world.new_file(), 1)
    assert err(exc) == errno.EBUSY


def test_failed_session_preserve_keeps_nothing(world: World) -> None:
    h = RecHandler(world)
    h.fail[("preserve", 5)] = errno.EPERM
    orch = Orchestrator([h])
    s = orch.create_session("s")
    with pytest.raises(LuoError) as exc:
        s.preserve_fd(world.new_file(), 5)
    assert err(exc) == errno.EPERM
    assert s.tokens == []


def test_preserve_into_incoming_session_is_einval(world: World) -> None:
    orch, _, _ = incoming(world, ("vm1", (1,)))
    with pytest.raises(LuoError) as exc:
        orch.retrieve_session("vm1").preserve_fd(world.new_file(), 2)
    assert err(exc) == errno.EINVAL


# -- close outgoing ---------------------------------------------------------------------------


def test_close_outgoing_unpreserves_in_reverse(world: World, orch: Orchestrator) -> None:
    h = orch.create_session("vm1")
    fds = [world.new_file() for _ in range(3)]
    for t, fd in zip((7, 3, 9), fds, strict=True):
        h.preserve_fd(fd, t)
    world.clear()
    orch.close_session(h)
    assert world.log == [("file", "unpreserve", "mem-v1", t, "vm1") for t in (9, 3, 7)]
    assert orch.take_released_fds() == fds[::-1]
    assert h.closed and orch.status()["sessions"] == [] and orch.status()["files"] == []


@pytest.mark.parametrize("state", [State.PREPARED, State.FROZEN])
def test_close_outgoing_during_update_is_ebusy(world: World, orch: Orchestrator, state: State) -> None:
    h = orch.create_session("vm1")
    h.preserve_fd(world.new_file(), 1)
    orch.prepare()
    if state is State.FROZEN:
        orch.freeze()
    with pytest.raises(LuoError) as exc:
        orch.close_session(h)
    assert err(exc) == errno.EBUSY
    assert not h.closed
    orch.cancel()
    h.close()  # the host's deferred close
    assert h.closed


def test_closed_handle_is_ebadf(world: World, orch: Orchestrator) -> None:
    h = orch.create_session("vm1")
    orch.close_session(h)
    for attempt in (lambda: h.preserve_fd(world.new_file(), 1), lambda: orch.close_session(h)):
        with pytest.raises(LuoError) as exc:
            attempt()
        assert err(exc) == errno.EBADF
    with pytest.raises(LuoError) as exc:
        h.finish()
    assert err(exc) == errno.EINVAL  # v7.2: the session's type first: finish is never for a created one
    assert h.get_name() == "vm1"


def test_session_type_before_closed(world: World) -> None:
    """v7.2: PRESERVE_FD only on a created session, also once a retrieved one is finished."""
    orch, _, _ = incoming(world, ("vm1", (1,)))
    h = orch.retrieve_session("vm1")
    h.finish()
    with pytest.raises(LuoError) as exc:
        h.preserve_fd(world.new_file(), 2)
    assert err(exc) == errno.EINVAL
    with pytest.raises(LuoError) as exc:
        h.retrieve_fd(1)
    assert err(exc) == errno.EBADF
    assert h.get_name() == "vm1"


def test_handle_of_another_orchestrator(world: World, orch: Orchestrator) -> None:
    other = Orchestrator([RecHandler(world)]).create_session("x")
    with pytest.raises(LuoError) as exc:
        orch.close_session(other)
    assert err(exc) == errno.EINVAL


def test_outgoing_session_has_no_retrieve_or_finish(orch: Orchestrator) -> None:
    h = orch.create_session("vm1")
    for attempt in (lambda: h.retrieve_fd(1), h.finish):
        with pytest.raises(LuoError) as exc:
            attempt()
        assert err(exc) == errno.EINVAL


# -- incoming -----------------------------------------------------------------------------


def test_retrieve_unknown_is_enoent(world: World, orch: Orchestrator) -> None:
    with pytest.raises(LuoError) as exc:
        orch.retrieve_session("nope")
    assert err(exc) == errno.ENOENT
    upd, _, _ = incoming(world, ("vm1", (1,)))
    with pytest.raises(LuoError) as exc:
        upd.retrieve_session("vm2")
    assert err(exc) == errno.ENOENT


def test_retrieve_twice_is_einval(world: World) -> None:
    orch, _, _ = incoming(world, ("vm1", (1,)))
    h = orch.retrieve_session("vm1")
    assert isinstance(h, SessionHandle) and h.direction == "in" and h.tokens == [1]
    with pytest.raises(LuoError) as exc:
        orch.retrieve_session("vm1")
    assert err(exc) == errno.EINVAL


def test_outgoing_session_cannot_be_retrieved(orch: Orchestrator) -> None:
    orch.create_session("vm1")
    with pytest.raises(LuoError) as exc:
        orch.retrieve_session("vm1")
    assert err(exc) == errno.ENOENT


def test_retrieve_fd_any_order_and_idempotent(world: World) -> None:
    orch, _, fds = incoming(world, ("vm1", (1, 2, 3)))
    h = orch.retrieve_session("vm1")
    a = h.retrieve_fd(3)
    b = h.retrieve_fd(1)
    c = h.retrieve_fd(3)
    assert len({a, b, c, *fds}) == 6  # every call makes a new fd
    assert world.files[a].content == world.files[c].content == "vm1:3"
    assert [e[3] for e in world.ops("retrieve")] == [3, 1, 3]


def test_failed_retrieve_fails_the_same_way_again(world: World) -> None:
    """v7.3: a failed RETRIEVE_FD returns the same error every later time, handler not asked again."""
    orch, handler, _ = incoming(world, ("vm1", (1, 2)))
    h = orch.retrieve_session("vm1")
    handler.fail[("retrieve", 1)] = errno.EIO
    with pytest.raises(LuoError) as first:
        h.retrieve_fd(1)
    del handler.fail[("retrieve", 1)]  # the cause is gone; the failure stays
    world.clear()
    for _ in range(2):
        with pytest.raises(LuoError) as again:
            h.retrieve_fd(1)
        assert (again.value.errno, again.value.message) == (first.value.errno, first.value.message)
    assert world.ops("retrieve") == []
    assert h.retrieve_fd(2) >= 0  # the other file is not affected


def test_retrieve_fd_unknown_is_enoent(world: World) -> None:
    orch, _, _ = incoming(world, ("vm1", (1,)))
    with pytest.raises(LuoError) as exc:
        orch.retrieve_session("vm1").retrieve_fd(2)
    assert err(exc) == errno.ENOENT


def test_session_finish_reverse_order(world: World) -> None:
    orch, _, fds = incoming(world, ("vm1", (1, 2, 3)), ("vm2", (4,)))
    h = orch.retrieve_session("vm1")
    h.retrieve_fd(2)
    world.clear()
    h.finish()
    assert world.ops("can_finish") == [("file", "can_finish", "mem-v1", t, "vm1") for t in (1, 2, 3)]
    assert world.ops("finish") == [
        ("file", "finish", "mem-v1", 3, "vm1", False),
        ("file", "finish", "mem-v1", 2, "vm1", True),
        ("file", "finish", "mem-v1", 1, "vm1", False),
    ]
    assert orch.take_released_fds() == fds[2::-1]
    assert h.closed and orch.state is State.UPDATED
    for attempt in (lambda: h.retrieve_fd(1), h.finish):
        with pytest.raises(LuoError) as exc:
            attempt()
        assert err(exc) == errno.EBADF
    # the other session is untouched
    assert orch.retrieve_session("vm2").retrieve_fd(4) >= 0


def test_can_finish_veto(world: World) -> None:
    orch, handler, _ = incoming(world, ("vm1", (1, 2, 3)))
    h = orch.retrieve_session("vm1")
    handler.veto.add(2)
    world.clear()
    with pytest.raises(LuoError) as exc:
        h.finish()
    assert err(exc) == errno.EBUSY
    assert world.ops("finish") == [] and orch.take_released_fds() == []
    assert not h.closed
    h.retrieve_fd(1)  # still usable
    handler.veto.clear()
    h.finish()
    assert h.closed


def test_close_incoming_is_finish(world: World) -> None:
    orch, handler, fds = incoming(world, ("vm1", (1, 2)))
    h = orch.retrieve_session("vm1")
    h.retrieve_fd(1)
    world.clear()
    orch.close_session(h)
    assert world.ops("finish") == [("file", "finish", "mem-v1", 2, "vm1", False), ("file", "finish", "mem-v1", 1, "vm1", True)]
    assert orch.take_released_fds() == fds[::-1]
    assert h.closed


def test_close_incoming_vetoed_keeps_session(world: World) -> None:
    orch, handler, _ = incoming(world, ("vm1", (1,)))
    h = orch.retrieve_session("vm1")
    handler.veto.add(1)
    with pytest.raises(LuoError) as exc:
        h.close()
    assert err(exc) == errno.EBUSY
    assert not h.closed


def test_global_finish_discards_unretrieved_sessions(world: World) -> None:
    orch, _, fds = incoming(world, ("vm1", (1, 2)), ("vm2", (3,)))
    orch.finish()
    assert world.ops("finish") == [
        ("file", "finish", "mem-v1", 2, "vm1", False),
        ("file", "finish", "mem-v1", 1, "vm1", False),
        ("file", "finish", "mem-v1", 3, "vm2", False),
    ]
    assert sorted(orch.take_released_fds()) == sorted(fds)
    with pytest.raises(LuoError) as exc:
        orch.retrieve_session("vm1")
    assert err(exc) == errno.ENOENT
    orch.create_session("vm1")  # the name is free


def test_outgoing_sessions_live_through_cancel(world: World, orch: Orchestrator) -> None:
    h = orch.create_session("vm1")
    h.preserve_fd(world.new_file(), 1)
    orch.prepare()
    orch.cancel()
    assert h.tokens == [1] and not h.closed


def test_session_status(world: World) -> None:
    orch, _, _ = incoming(world, ("in1", (1,)), ("in2", (2,)))
    orch.retrieve_session("in1")
    orch.create_session("out1", owner=Owner(5, 6, "agent")).preserve_fd(world.new_file(), 9)
    sessions = orch.status()["sessions"]
    assert sessions == [
        {"name": "out1", "direction": "out", "owner": {"pid": 5, "uid": 6, "comm": "agent"}, "files": [9], "retrieved": False},
        {"name": "in1", "direction": "in", "owner": {"pid": 9, "uid": 0, "comm": "vmm"}, "files": [1], "retrieved": True},
        {"name": "in2", "direction": "in", "owner": {"pid": 9, "uid": 0, "comm": "vmm"}, "files": [2], "retrieved": False},
    ]
