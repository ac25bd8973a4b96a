"""The RFC v2 global state machine as explicit tables (in the style of h11).

Every legal move is a row here; anything else is refused. Keeping the rules as data rather than
as ``if`` chains in the orchestrator lets the tests walk the full event x state matrix and lets a
reader check the design against the kernel's table at a glance.

Two tables:

- ``TRANSITIONS``: (event, state) -> next state, for the four UAPI events plus the kexec moment
  (``REBOOT``, driven by ``Orchestrator.begin_update``) and the new kernel's boot with an incoming
  tree (``BOOT``: the only way into UPDATED). A missing row is ``-EINVAL``.
- ``OPERATIONS``: which states allow the non-event operations (preserving, registering, ...).
  A state outside the set is ``-EBUSY``, as the kernel answers "not now" rather than "never".
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

from luo.core.states import Event, State
from luo.errors import LuoError

REBOOT = "reboot"
"""The kexec moment (``begin_update``): not a UAPI event, but a row of the table all the same."""

BOOT = "boot"
"""The successor finding its predecessor's record (the kexec'd kernel reading LUO's tree): an
orchestrator starts NORMAL and enters UPDATED by this row, never by being built that way."""

Step = Event | str

TRANSITIONS: Mapping[tuple[Step, State], State] = {
    (Event.PREPARE, State.NORMAL): State.PREPARED,
    (Event.FREEZE, State.PREPARED): State.FROZEN,
    (Event.CANCEL, State.PREPARED): State.NORMAL,
    (Event.CANCEL, State.FROZEN): State.NORMAL,
    (Event.FINISH, State.UPDATED): State.NORMAL,
    # A kexec while PREPARED performs the implicit freeze; while FROZEN it just proceeds.
    (REBOOT, State.PREPARED): State.FROZEN,
    (REBOOT, State.FROZEN): State.FROZEN,
    (BOOT, State.NORMAL): State.UPDATED,
}

ON_FAILURE: Mapping[Step, State | None] = {
    # None: the state does not move (prepare rolls back and stays NORMAL).
    Event.PREPARE: None,
    # A failed freeze abandons the update altogether.
    Event.FREEZE: State.NORMAL,
    REBOOT: State.NORMAL,
    BOOT: None,  # an incoming record that cannot be loaded leaves no orchestrator at all
    # cancel and finish callbacks must not fail; finish may be vetoed by can_finish (no move).
    Event.CANCEL: None,
    Event.FINISH: None,
}

ALL_STEPS: tuple[Step, ...] = (Event.PREPARE, Event.FREEZE, Event.CANCEL, Event.FINISH, REBOOT)
"""The steps a running orchestrator can be asked for (``BOOT`` happens once, at construction)."""

_OPEN = frozenset({State.NORMAL, State.UPDATED})

OPERATIONS: Mapping[str, frozenset[State]] = {
    "preserve": _OPEN,
    "unpreserve": _OPEN,
    "register": _OPEN,
    "unregister": _OPEN,
    "create_session": _OPEN,
    "close_outgoing_session": _OPEN,
    "restore": frozenset({State.UPDATED}),
}


def step_name(step: Step) -> str:
    return step.value if isinstance(step, Event) else step


def next_state(step: Step, state: State) -> State:
    """The state ``step`` leads to from ``state``; ``-EINVAL`` when the table has no such row."""
    try:
        return TRANSITIONS[(step, state)]
    except KeyError:
        raise LuoError(
            errno.EINVAL, f"{step_name(step)} is not allowed in state {state.label}"
        ) from None


def legal_steps(state: State) -> list[Step]:
    return [s for s in ALL_STEPS if (s, state) in TRANSITIONS]


def require(operation: str, state: State) -> None:
    """Refuse ``operation`` with ``-EBUSY`` unless ``state`` allows it."""
    if state not in OPERATIONS[operation]:
        allowed = "/".join(s.label for s in sorted(OPERATIONS[operation]))
        raise LuoError(
            errno.EBUSY, f"{operation.replace('_', ' ')} is only allowed in {allowed}, not {state.label}"
        )
