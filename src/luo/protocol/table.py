"""A process-to-process protocol as data: (state, event) -> (action, next state), no I/O.

Each channel of an update (``luo.protocol.*``) declares, per role, the states that role's end goes
through and, for each state, the events it accepts: a message received (named by ``op``, see
``event_of``) or a local event (``eof``, ``timeout``, ...). A row names the action the process
loop runs and the state that follows. Anything not in the table is a protocol error (EPROTO) that
says what was expected instead, so a loop never guesses with an ``if`` chain and a reader checks
the whole protocol at a glance, as with ``luo.core.transitions`` and h11's ``_state.py``.

The loops keep I/O, timeouts and fds; the tables keep order and meaning. Tests walk every
(state, event) pair of a table without any process (``tests/protocol``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from luo.errors import LuoError

UNKNOWN = "unknown"  # the event of a message whose op a channel does not define


@dataclass(frozen=True)
class Row:
    action: str  # what the loop does on this event ("" for nothing); the loop maps it to code
    next: str  # the role's state afterwards


class ProtocolError(LuoError):
    """An event the role's table has no row for: the peer (or the loop) broke the protocol."""

    def __init__(self, message: str, state: str, event: str) -> None:
        super().__init__(errno.EPROTO, message)
        self.state = state
        self.event = event


class Table:
    """One role's end of one channel."""

    def __init__(self, channel: str, role: str, initial: str, rows: Mapping[tuple[str, str], Row],
                 final: Iterable[str] = ()) -> None:
        self.channel = channel
        self.role = role
        self.initial = initial
        self.rows = dict(rows)
        self.final = frozenset(final)
        for (state, _event), row in self.rows.items():
            if state in self.final:
                raise ValueError(f"{channel} ({role}): final state {state!r} has a row")
            if row.next not in self.states:
                raise ValueError(f"{channel} ({role}): {row.next!r} is reached but never left nor final")

    @property
    def states(self) -> frozenset[str]:
        return frozenset({s for s, _ in self.rows} | self.final)

    @property
    def events(self) -> frozenset[str]:
        return frozenset(e for _, e in self.rows)

    def expects(self, state: str) -> list[str]:
        """The events ``state`` accepts, in table order."""
        return [e for s, e in self.rows if s == state]

    def step(self, state: str, event: str) -> Row:
        try:
            return self.rows[(state, event)]
        except KeyError:
            pass
        if state in self.final:
            why = f"{state} is final"
        else:
            why = "expected " + " or ".join(repr(e) for e in self.expects(state))
        raise ProtocolError(f"{self.channel} ({self.role}): {event!r} is not allowed in state {state}; {why}",
                            state, event)


class Cursor:
    """Where one live endpoint is in its table. Still no I/O: the loop feeds it events."""

    def __init__(self, table: Table, state: str | None = None) -> None:
        self.table = table
        self.state = state or table.initial
        self.history: list[tuple[str, str]] = []  # (event, state entered), for logs and tests

    def feed(self, event: str) -> str:
        """Take ``event``: move to the row's next state and return the row's action."""
        row = self.table.step(self.state, event)
        self.state = row.next
        self.history.append((event, row.next))
        return row.action

    @property
    def done(self) -> bool:
        return self.state in self.table.final


def event_of(msg: Mapping[str, object], known: Iterable[str]) -> str:
    """The event a received message is: its ``op`` when the channel defines it, else ``unknown``
    (never the peer's raw value: a hostile op must not select a row by accident)."""
    op = msg.get("op")
    return op if isinstance(op, str) and op in set(known) else UNKNOWN
