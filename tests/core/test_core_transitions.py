"""The full event x state matrix and the state rules of every non-event operation."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
from core_participants import RecHandler, RecSubsystem, World, in_state

from luo.core import Orchestrator, State
from luo.core.states import Event
from luo.core.transitions import ALL_STEPS, OPERATIONS, REBOOT, TRANSITIONS, Step, legal_steps, step_name
from luo.errors import LuoError

# The kernel's table (luo-design.md section 2), written out independently of the implementation.
EXPECTED: dict[tuple[str, str], str] = {
    ("prepare", "normal"): "prepared",
    ("freeze", "prepared"): "frozen",
    ("cancel", "prepared"): "normal",
    ("cancel", "frozen"): "normal",
    ("finish", "updated"): "normal",
    ("reboot", "prepared"): "frozen",
    ("reboot", "frozen"): "frozen",
    ("boot", "normal"): "updated",  # the successor with an incoming record; no other way in
}


def test_updated_only_through_boot() -> None:
    assert [(step_name(st), s.label) for (st, s), nxt in TRANSITIONS.items() if nxt is State.UPDATED] == [
        ("boot", "normal")]


def drive(orch: Orchestrator, step: Step) -> None:
    actions: dict[Step, Callable[[], None]] = {
        Event.PREPARE: orch.prepare,
        Event.FREEZE: orch.freeze,
        Event.CANCEL: orch.cancel,
        Event.FINISH: orch.finish,
        REBOOT: orch.begin_update,
    }
    actions[step]()


def test_table_is_the_kernels() -> None:
    got = {(step_name(step), state.label): nxt.label for (step, state), nxt in TRANSITIONS.items()}
    assert got == EXPECTED


def test_state_labels_and_values() -> None:
    assert [(s.label, int(s)) for s in State] == [("normal", 0), ("prepared", 1), ("frozen", 2), ("updated", 3)]


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.label)
@pytest.mark.parametrize("step", ALL_STEPS, ids=step_name)
def test_event_matrix(world: World, state: State, step: Step) -> None:
    orch = in_state(world, state)
    if state is not State.UPDATED:
        assert orch.state is state
    expected = EXPECTED.get((step_name(step), state.label))
    world.clear()
    if expected is None:
        with pytest.raises(LuoError) as exc:
            drive(orch, step)
        assert exc.value.errno == errno.EINVAL
        assert orch.state is state
        assert world.log == []
    else:
        drive(orch, step)
        assert orch.state.label == expected


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.label)
def test_legal_steps(state: State) -> None:
    assert sorted(step_name(s) for s in legal_steps(state)) == sorted(
        ev for (ev, st) in EXPECTED if st == state.label and ev != "boot"  # boot: construction only
    )


def test_every_event_with_participants_in_every_state(world: World) -> None:
    """The same matrix with a preserved file and a subsystem: refused events call nobody."""
    for state in (State.NORMAL, State.PREPARED, State.FROZEN):
        for step in ALL_STEPS:
            h = RecHandler(world)
            orch = Orchestrator([h], [RecSubsystem(world, "s")])
            orch.preserve_fd(world.new_file())
            if state is not State.NORMAL:
                orch.prepare()
            if state is State.FROZEN:
                orch.freeze()
            world.clear()
            if (step, state) in TRANSITIONS:
                drive(orch, step)
                assert orch.state is TRANSITIONS[(step, state)]
            else:
                with pytest.raises(LuoError) as exc:
                    drive(orch, step)
                assert exc.value.errno == errno.EINVAL
                assert orch.state is state and world.log == []


OPEN = {State.NORMAL, State.UPDATED}


def test_operations_table() -> None:
    assert OPERATIONS["restore"] == {State.UPDATED}
    for op in ("preserve", "unpreserve", "register", "unregister", "create_session", "close_outgoing_session"):
        assert OPERATIONS[op] == OPEN


def _attempts(world: World, orch: Orchestrator) -> dict[str, Callable[[], object]]:
    """One attempt per state-guarded operation, each valid apart from the state."""
    handle = orch.sessions()[0]
    return {
        "preserve": lambda: orch.preserve_fd(world.new_file()),
        "unpreserve": lambda: orch.unpreserve_fd(0),
        "session preserve": lambda: handle.preserve_fd(world.new_file(), 99),
        "register handler": lambda: orch.register_handler(RecHandler(world, "other-v1", "other")),
        "register subsystem": lambda: orch.register_subsystem(RecSubsystem(world, "new")),
        "unregister subsystem": lambda: orch.unregister_subsystem("s"),
        "unregister handler": lambda: orch.unregister_handler("idle-v1"),
        "create session": lambda: orch.create_session("fresh"),
        "close outgoing session": lambda: orch.close_session(handle),
        "restore": lambda: orch.restore_fd(0),
    }


def _orch_with_content(world: World, state: State) -> Orchestrator:
    from luo.core.handover import FileRecord, LuoRecord

    handlers = [RecHandler(world), RecHandler(world, "idle-v1", "idle")]
    if state is State.UPDATED:
        fd = world.new_file()
        orch = Orchestrator(
            handlers,
            [RecSubsystem(world, "s")],
            incoming=LuoRecord(1, files=(FileRecord(0, "mem-v1", 5, 0),)),
            incoming_fds=[fd],
        )
    else:
        orch = Orchestrator(handlers, [RecSubsystem(world, "s")])
    orch.preserve_fd(world.new_file())
    orch.create_session("out").preserve_fd(world.new_file(), 1)
    if state in (State.PREPARED, State.FROZEN):
        orch.prepare()
    if state is State.FROZEN:
        orch.freeze()
    return orch


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.label)
@pytest.mark.parametrize(
    "op",
    [
        "preserve",
        "unpreserve",
        "session preserve",
        "register handler",
        "register subsystem",
        "unregister subsystem",
        "unregister handler",
        "create session",
        "close outgoing session",
        "restore",
    ],
)
def test_operation_matrix(world: World, state: State, op: str) -> None:
    """Allowed ops succeed; the others give EBUSY with nothing called and nothing changed."""
    orch = _orch_with_content(world, state)
    allowed = {State.UPDATED} if op == "restore" else OPEN
    before = orch.status()
    world.clear()
    attempt = _attempts(world, orch)[op]
    if state in allowed:
        attempt()
    else:
        with pytest.raises(LuoError) as exc:
            attempt()
        assert exc.value.errno == errno.EBUSY
        assert world.log == []
        assert orch.status() == before
        assert orch.take_released_fds() == []
    assert orch.state is state
