"""luo.protocol.table: the rules every channel table gets for free."""

from __future__ import annotations

import errno

import pytest

from luo.protocol.table import UNKNOWN, Cursor, ProtocolError, Row, Table, event_of

T = Table("demo", "end", "a", {("a", "go"): Row("run", "b"), ("b", "stop"): Row("", "z")}, final=("z",))


def test_a_row_moves_and_names_the_action() -> None:
    c = Cursor(T)
    assert c.feed("go") == "run" and c.state == "b"
    assert c.feed("stop") == "" and c.done
    assert c.history == [("go", "b"), ("stop", "z")]


def test_a_missing_row_is_eproto_and_says_what_was_expected() -> None:
    c = Cursor(T)
    with pytest.raises(ProtocolError) as exc:
        c.feed("stop")
    assert exc.value.errno == errno.EPROTO and c.state == "a"
    assert exc.value.message == "demo (end): 'stop' is not allowed in state a; expected 'go'"
    c.feed("go")
    c.feed("stop")
    with pytest.raises(ProtocolError, match="z is final"):
        c.feed("go")


def test_a_table_that_cannot_be_followed_is_refused_when_written() -> None:
    with pytest.raises(ValueError, match="never left nor final"):
        Table("demo", "end", "a", {("a", "go"): Row("", "nowhere")})
    with pytest.raises(ValueError, match="final state"):
        Table("demo", "end", "a", {("a", "go"): Row("", "z"), ("z", "go"): Row("", "a")}, final=("z",))


def test_a_hostile_op_never_selects_a_row() -> None:
    for op in (None, 3, ["go"], "GO", "go ", "x" * 10_000):
        assert event_of({"op": op}, ["go"]) == UNKNOWN
    assert event_of({}, ["go"]) == UNKNOWN
    assert event_of({"op": "go"}, ["go"]) == "go"
