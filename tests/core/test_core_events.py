"""Callback order of prepare/freeze/cancel/finish and rollback order on failure."""

from __future__ import annotations

import errno

import pytest
from core_participants import Entry, RecHandler, RecSubsystem, World

from luo.core import Orchestrator, State
from luo.core.handover import FileRecord, LuoRecord, SessionRecord
from luo.errors import LuoError

# Files in walk order: the global table by token (preserved 5, 1, 3), then session "a"
# (created first; preserved 20 then 10), then session "b".
WALK: list[tuple[int, str | None]] = [(1, None), (3, None), (5, None), (20, "a"), (10, "a"), (30, "b")]
SUBS = ["x", "y", "z"]
VALUE = {"x": 100, "y": 200, "z": 300}


class Setup:
    def __init__(self, world: World) -> None:
        self.world = world
        self.handler = RecHandler(world)
        self.subs = [RecSubsystem(world, n, VALUE[n]) for n in SUBS]
        self.orch = Orchestrator([self.handler], self.subs)
        for t in (5, 1, 3):
            self.orch.preserve_fd(world.new_file(), token=t)
        a = self.orch.create_session("a")
        b = self.orch.create_session("b")
        a.preserve_fd(world.new_file(), 20)
        a.preserve_fd(world.new_file(), 10)
        b.preserve_fd(world.new_file(), 30)
        world.clear()


def f(op: str, walk: list[tuple[int, str | None]]) -> list[Entry]:
    return [("file", op, "mem-v1", t, s) for t, s in walk]


def s(op: str, names: list[str], data: dict[str, int] | None = None) -> list[Entry]:
    if op == "prepare":
        return [("sub", "prepare", n) for n in names]
    assert data is not None
    return [("sub", op, n, data[n]) for n in names]


@pytest.fixture
def setup(world: World) -> Setup:
    return Setup(world)


def test_prepare_order(setup: Setup) -> None:
    setup.orch.prepare()
    assert setup.world.log == f("prepare", WALK) + s("prepare", SUBS)
    assert setup.orch.state is State.PREPARED
    files = setup.orch.status()["files"]
    assert [(x["token"], x["data"], x["prepared"]) for x in files] == [(t, 2000 + t, True) for t, _ in WALK]  # type: ignore[index,union-attr]


def test_freeze_order_and_data(setup: Setup) -> None:
    setup.orch.prepare()
    setup.world.clear()
    setup.orch.freeze()
    assert setup.world.log == f("freeze", WALK) + s("freeze", SUBS, VALUE)
    record, fds = setup.orch.outgoing_record()
    assert record.subsystems == {n: VALUE[n] + 1 for n in SUBS}
    assert [r.data for r in record.all_files()] == [3000 + t for t, _ in WALK]


@pytest.mark.parametrize("frozen", [False, True])
def test_cancel_order(setup: Setup, frozen: bool) -> None:
    setup.orch.prepare()
    if frozen:
        setup.orch.freeze()
    setup.world.clear()
    setup.orch.cancel()
    data = {n: VALUE[n] + (1 if frozen else 0) for n in SUBS}
    assert setup.world.log == f("cancel", WALK) + s("cancel", SUBS, data)
    assert setup.orch.state is State.NORMAL
    # tokens stay; a new prepare works
    assert len(setup.orch.status()["files"]) == len(WALK)  # type: ignore[arg-type]
    setup.world.clear()
    setup.orch.prepare()
    assert setup.world.log == f("prepare", WALK) + s("prepare", SUBS)


def test_cancel_keeps_going_when_a_callback_raises(setup: Setup) -> None:
    setup.orch.prepare()
    setup.handler.raise_plain.add(("cancel", 3))
    setup.subs[0].fail["cancel"] = errno.EIO
    setup.world.clear()
    setup.orch.cancel()
    assert setup.world.log == f("cancel", WALK) + s("cancel", SUBS, VALUE)
    assert setup.orch.state is State.NORMAL


# -- prepare rollback ---------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 2, len(WALK) - 1], ids=["first", "middle", "last"])
def test_prepare_rollback_on_file_n(setup: Setup, n: int) -> None:
    setup.handler.fail[("prepare", WALK[n][0])] = errno.ENOMEM
    with pytest.raises(LuoError) as exc:
        setup.orch.prepare()
    assert exc.value.errno == errno.ENOMEM
    assert setup.world.log == f("prepare", WALK[: n + 1]) + f("cancel", WALK[:n])
    assert setup.orch.state is State.NORMAL
    assert not any(x["prepared"] for x in setup.orch.status()["files"])  # type: ignore[index,union-attr]


@pytest.mark.parametrize("n", [0, 1, 2], ids=["first", "middle", "last"])
def test_prepare_rollback_on_subsystem_n(setup: Setup, n: int) -> None:
    setup.subs[n].fail["prepare"] = errno.EAGAIN
    with pytest.raises(LuoError) as exc:
        setup.orch.prepare()
    assert exc.value.errno == errno.EAGAIN
    assert setup.world.log == (
        f("prepare", WALK) + s("prepare", SUBS[: n + 1]) + s("cancel", SUBS[:n], VALUE) + f("cancel", WALK)
    )
    assert setup.orch.state is State.NORMAL


def test_prepare_failure_with_plain_exception_is_eio(setup: Setup) -> None:
    setup.handler.raise_plain.add(("prepare", 3))
    with pytest.raises(LuoError) as exc:
        setup.orch.prepare()
    assert exc.value.errno == errno.EIO
    assert isinstance(exc.value.__cause__, RuntimeError)


# -- freeze failure: the update is abandoned --------------------------------------------


@pytest.mark.parametrize("n", [0, 2, len(WALK) - 1], ids=["first", "middle", "last"])
def test_freeze_failure_on_file_n_returns_to_normal(setup: Setup, n: int) -> None:
    setup.orch.prepare()
    setup.world.clear()
    setup.handler.fail[("freeze", WALK[n][0])] = errno.EBUSY
    with pytest.raises(LuoError) as exc:
        setup.orch.freeze()
    assert exc.value.errno == errno.EBUSY
    # those that froze are unfrozen first (forward), then the rest of the prepared ones
    assert setup.world.log == f("freeze", WALK[: n + 1]) + f("cancel", WALK) + s("cancel", SUBS, VALUE)
    assert setup.orch.state is State.NORMAL
    assert len(setup.orch.status()["files"]) == len(WALK)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1, 2], ids=["first", "middle", "last"])
def test_freeze_failure_on_subsystem_n_returns_to_normal(setup: Setup, n: int) -> None:
    setup.orch.prepare()
    setup.world.clear()
    setup.subs[n].fail["freeze"] = errno.EIO
    with pytest.raises(LuoError) as exc:
        setup.orch.freeze()
    assert exc.value.errno == errno.EIO
    data = {name: VALUE[name] + (1 if i < n else 0) for i, name in enumerate(SUBS)}
    assert setup.world.log == (
        f("freeze", WALK) + s("freeze", SUBS[: n + 1], VALUE) + f("cancel", WALK) + s("cancel", SUBS, data)
    )
    assert setup.orch.state is State.NORMAL


def test_handler_sees_what_cancel_undoes(world: World) -> None:
    seen: list[tuple[int, bool, bool]] = []

    class Watch(RecHandler):
        def cancel(self, pf):  # type: ignore[no-untyped-def]
            seen.append((pf.token, pf.prepared, pf.frozen))

    h = Watch(world)
    orch = Orchestrator([h])
    for t in range(3):
        orch.preserve_fd(world.new_file(), token=t)
    orch.prepare()
    h.fail[("freeze", 1)] = errno.EIO
    with pytest.raises(LuoError):
        orch.freeze()
    assert seen == [(0, True, True), (1, True, False), (2, True, False)]


# -- begin_update (the kexec moment) -----------------------------------------------------


def test_begin_update_from_prepared_freezes(setup: Setup) -> None:
    setup.orch.prepare()
    setup.world.clear()
    setup.orch.begin_update()
    assert setup.orch.state is State.FROZEN
    assert setup.world.log == f("freeze", WALK) + s("freeze", SUBS, VALUE)


def test_begin_update_from_frozen_calls_nobody(setup: Setup) -> None:
    setup.orch.prepare()
    setup.orch.freeze()
    setup.world.clear()
    setup.orch.begin_update()
    assert setup.orch.state is State.FROZEN and setup.world.log == []


def test_begin_update_failure_returns_to_normal(setup: Setup) -> None:
    setup.orch.prepare()
    setup.subs[2].fail["freeze"] = errno.ETIMEDOUT
    with pytest.raises(LuoError) as exc:
        setup.orch.begin_update()
    assert exc.value.errno == errno.ETIMEDOUT
    assert setup.orch.state is State.NORMAL


@pytest.mark.parametrize("updated", [False, True])
def test_begin_update_from_normal_or_updated_is_einval(world: World, updated: bool) -> None:
    orch = Orchestrator(incoming=LuoRecord(0)) if updated else Orchestrator()
    with pytest.raises(LuoError) as exc:
        orch.begin_update()
    assert exc.value.errno == errno.EINVAL


# -- finish -----------------------------------------------------------------------------


def finish_setup(world: World, subs: list[RecSubsystem], handler: RecHandler) -> tuple[Orchestrator, list[int]]:
    fds = [world.new_file(content=str(i)) for i in range(6)]
    record = LuoRecord(
        liveupdate_number=7,
        subsystems={"x": 5, "ghost": 9, "z": 6},
        files=(FileRecord(0, "mem-v1", 0, 0), FileRecord(2, "mem-v1", 0, 1)),
        sessions=(
            SessionRecord("a", (FileRecord(1, "mem-v1", 0, 2), FileRecord(2, "mem-v1", 0, 3), FileRecord(3, "mem-v1", 0, 4))),
            SessionRecord("b", (FileRecord(7, "mem-v1", 0, 5),)),
        ),
    )
    return Orchestrator([handler], subs, incoming=record, incoming_fds=fds), fds


def test_finish_order(world: World) -> None:
    handler = RecHandler(world)
    subs = [RecSubsystem(world, "z"), RecSubsystem(world, "y"), RecSubsystem(world, "x")]
    orch, fds = finish_setup(world, subs, handler)
    orch.restore_fd(0)
    a = orch.retrieve_session("a")
    a.retrieve_fd(2)
    world.clear()
    orch.finish()
    finishes = [e for e in world.log if e[1] == "finish"]
    assert finishes == [
        ("file", "finish", "mem-v1", 0, None, True),
        ("file", "finish", "mem-v1", 2, None, False),
        ("file", "finish", "mem-v1", 3, "a", False),
        ("file", "finish", "mem-v1", 2, "a", True),
        ("file", "finish", "mem-v1", 1, "a", False),
        ("file", "finish", "mem-v1", 7, "b", False),
        ("sub", "finish", "z", 6),  # registration order; y has no data; ghost is not registered
        ("sub", "finish", "x", 5),
    ]
    # can_finish was asked of every file before any finish
    first_finish = next(i for i, e in enumerate(world.log) if e[1] == "finish")
    assert len([e for e in world.log[:first_finish] if e[1] == "can_finish"]) == 6
    assert orch.state is State.NORMAL
    assert sorted(orch.take_released_fds()) == sorted(fds)
    assert a.closed
    with pytest.raises(LuoError) as exc:
        orch.retrieve_session("b")
    assert exc.value.errno == errno.ENOENT


def test_finish_veto_finishes_nothing(world: World) -> None:
    handler = RecHandler(world)
    orch, _ = finish_setup(world, [RecSubsystem(world, "x")], handler)
    handler.veto.add(7)
    world.clear()
    with pytest.raises(LuoError) as exc:
        orch.finish()
    assert exc.value.errno == errno.EBUSY
    assert world.ops("finish") == []
    assert orch.state is State.UPDATED
    assert orch.take_released_fds() == []
    handler.veto.clear()
    orch.finish()
    assert orch.state is State.NORMAL


def test_finish_keeps_going_when_a_callback_raises(world: World) -> None:
    handler = RecHandler(world)
    handler.raise_plain.add(("finish", 0))
    sub = RecSubsystem(world, "x")
    sub.fail["finish"] = errno.EIO
    orch, fds = finish_setup(world, [sub], handler)
    orch.finish()
    assert len(world.ops("finish")) == 7
    assert sorted(orch.take_released_fds()) == sorted(fds)


def test_finish_without_handler_discards(world: World) -> None:
    orch, fds = finish_setup(world, [], RecHandler(world, "other-v1", "other"))
    orch.finish()
    assert world.ops("finish") == []
    assert sorted(orch.take_released_fds()) == sorted(fds)
