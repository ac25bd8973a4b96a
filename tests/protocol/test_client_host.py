"""The client↔host table (luo.protocol.client_host): what a connection may ask in each role."""

from __future__ import annotations

import errno
import itertools

import pytest

from luo.host.daemon import DEVICE_OPS
from luo.protocol import client_host as ch
from luo.protocol.table import Cursor, ProtocolError

EVENTS = [ch.OPEN_DEVICE, ch.CLOSE_DEVICE, ch.REGISTER, ch.DEVICE_OP, ch.OTHER_OP, ch.SESSION_OP, ch.LATE_REPLY,
          ch.EOF]


def test_every_pair_is_a_row_or_eproto() -> None:
    for state, event in itertools.product(sorted(ch.TABLE.states), EVENTS):
        if (state, event) not in ch.TABLE.rows:
            with pytest.raises(ProtocolError) as exc:
                ch.TABLE.step(state, event)
            assert exc.value.errno == errno.EPROTO


def test_a_device_holder_may_only_do_what_the_ioctls_do() -> None:
    c = Cursor(ch.TABLE)
    assert c.feed(ch.OPEN_DEVICE) == "run" and c.state == ch.DEVICE
    for op in ("update", "vm_start", "kho_dump", "status", "vm_register"):
        event = ch.event_for(c.state, op, False, DEVICE_OPS)
        assert ch.TABLE.step(c.state, event).action == "deny", op
    for op in ("create_session", "retrieve_session", "get_state", "prepare", "finish"):
        assert ch.TABLE.step(c.state, ch.event_for(c.state, op, False, DEVICE_OPS)).action == "run", op
    c.feed(ch.CLOSE_DEVICE)
    assert c.state == ch.CONTROL
    assert ch.TABLE.step(c.state, ch.event_for(c.state, "update", False, DEVICE_OPS)).action == "run"


def test_a_participants_replies_are_never_requests() -> None:
    c = Cursor(ch.TABLE)
    c.feed(ch.REGISTER)
    assert ch.event_for(c.state, "update", True, DEVICE_OPS) == ch.LATE_REPLY
    assert c.feed(ch.LATE_REPLY) == "drop" and c.state == ch.PARTICIPANT
    # a control connection's "reply" field means nothing: its message is dispatched as a request
    assert ch.event_for(ch.CONTROL, "status", True, DEVICE_OPS) == ch.OTHER_OP


def test_a_session_fd_asks_only_session_ops_and_every_role_ends_at_eof() -> None:
    assert ch.event_for(ch.SESSION, "update", False, DEVICE_OPS) == ch.SESSION_OP
    for state in (ch.CONTROL, ch.DEVICE, ch.SESSION, ch.PARTICIPANT):
        assert ch.TABLE.step(state, ch.EOF).next == ch.CLOSED
    assert ch.TABLE.final == {ch.CLOSED}


def test_hostile_ops_are_other_ops() -> None:
    for op in (None, 7, ["open_device"], "OPEN_DEVICE", "x" * 100):
        assert ch.event_for(ch.CONTROL, op, False, DEVICE_OPS) == ch.OTHER_OP
