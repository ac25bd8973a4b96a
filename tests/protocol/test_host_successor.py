"""The host↔successor host tables (luo.protocol.host_successor), walked with no process at all."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest

from luo.abi import HANDOVER_OLDEST, HANDOVER_PROTOCOL
from luo.errors import LuoError
from luo.host.wire import ok, recv_msg, send_msg
from luo.protocol import host_successor as hs
from luo.protocol.table import UNKNOWN, Cursor, ProtocolError, Table

PROTOCOLS = sorted(hs.TABLES)
TABLES = [(p, t) for p in PROTOCOLS for t in hs.TABLES[p]]
IDS = [f"{t.role}-{p}" for p, t in TABLES]

# every event either end can be fed: what the peer sends (and a stray op), its own sends, local ones
OUTGOING_EVENTS = [*hs.TO_OUTGOING, UNKNOWN, hs.EOF, hs.TIMEOUT, hs.MALFORMED,
                   hs.PREPARE, hs.FINAL, hs.UNCHANGED, hs.ACK, hs.ABORT]
INCOMING_EVENTS = [*hs.TO_SUCCESSOR, UNKNOWN, hs.EOF, hs.MALFORMED, hs.WARMED, hs.OK, hs.FAILED]

# the successor's long steps: each feeds its own outcome
STEPS = {hs.A_CHECK_PREPARED, hs.A_ADOPT_FINAL, hs.A_ADOPT_PREPARED}


def events_of(table: Table) -> list[str]:
    return OUTGOING_EVENTS if table.role == hs.OUTGOING_ROLE else INCOMING_EVENTS


def test_the_vocabulary_covers_every_event_the_tables_use() -> None:
    for _, table in TABLES:
        assert table.events <= set(events_of(table)), table.role
    assert set(hs.OPS) == {"hello", "handover", "fds", "checked", "confirm", "ack", "abort", "adopted"}


@pytest.mark.parametrize(("protocol", "table"), TABLES, ids=IDS)
def test_every_state_and_event_is_a_row_or_eproto(protocol: int, table: Table) -> None:
    rows = 0
    for state in sorted(table.states):
        for event in events_of(table):
            c = Cursor(table, state)
            if (state, event) in table.rows:
                row = table.rows[(state, event)]
                assert c.feed(event) == row.action and c.state == row.next
                rows += 1
                continue
            with pytest.raises(ProtocolError) as exc:
                c.feed(event)
            assert exc.value.errno == errno.EPROTO
            assert (exc.value.state, exc.value.event) == (state, event)
            assert c.state == state and c.history == []  # a refusal changes nothing
    assert rows == len(table.rows)


@pytest.mark.parametrize(("protocol", "table"), TABLES, ids=IDS)
def test_every_state_is_reached_and_every_non_final_one_left(protocol: int, table: Table) -> None:
    reached = {table.initial}
    todo = [table.initial]
    while todo:
        s = todo.pop()
        for (state, _), row in table.rows.items():
            if state == s and row.next not in reached:
                reached.add(row.next)
                todo.append(row.next)
    assert reached == table.states
    assert all(table.expects(s) for s in table.states - table.final)


def happy(protocol: int, unchanged: bool) -> tuple[list[str], list[str]]:
    final = hs.UNCHANGED if unchanged else hs.FINAL
    out = [hs.HELLO, hs.PREPARE, hs.CHECKED, final, hs.CONFIRM, hs.ACK, hs.ADOPTED]
    inc = [hs.WARMED, hs.PREPARE, hs.OK, final, hs.OK, hs.ACK]
    return out, inc


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("unchanged", [False, True], ids=["final", "unchanged"])
def test_the_happy_path_of_both_ends(protocol: int, unchanged: bool) -> None:
    o, i = happy(protocol, unchanged)
    out, inc = Cursor(hs.outgoing(protocol)), Cursor(hs.incoming(protocol))
    if unchanged and protocol < hs.UNCHANGED_SINCE:
        for c, events in ((out, o), (inc, i)):
            with pytest.raises(ProtocolError):
                for e in events:
                    c.feed(e)
            assert c.state in (hs.O_PREPARED, hs.S_CHECKED)
        return
    assert [out.feed(e) for e in o] == [hs.A_CHECK_PROTOCOL, hs.A_SEND_PREPARE, "",
                                        hs.A_SEND_UNCHANGED if unchanged else hs.A_SEND_FINAL, "",
                                        hs.A_SEND_ACK, ""]
    assert out.done and out.state == hs.O_ADOPTED
    assert [inc.feed(e) for e in i] == [hs.A_SAY_HELLO, hs.A_CHECK_PREPARED, hs.A_SEND_CHECKED,
                                        hs.A_ADOPT_PREPARED if unchanged else hs.A_ADOPT_FINAL,
                                        hs.A_SEND_CONFIRM, hs.A_TAKE_OVER]
    assert inc.done and inc.state == hs.S_SERVING


def after_ack(table: Table) -> set[str]:
    """The states reachable once the ack is sent (outgoing) or received (successor)."""
    seen = {row.next for (_, e), row in table.rows.items() if e == hs.ACK}
    todo = list(seen)
    while todo:
        s = todo.pop()
        for (state, _), row in table.rows.items():
            if state == s and row.next not in seen:
                seen.add(row.next)
                todo.append(row.next)
    return seen


def reads(table: Table, state: str) -> bool:
    """Whether the successor reads the channel in ``state`` (its long steps and the refusal's
    reply read nothing: an abort cannot arrive there)."""
    return any(e in hs.TO_SUCCESSOR for e in table.expects(state))


@pytest.mark.parametrize(("protocol", "table"), TABLES, ids=IDS)
def test_abort_in_every_state_before_the_ack_and_never_after(protocol: int, table: Table) -> None:
    late = after_ack(table)
    assert late, "no state after the ack"
    before = table.states - table.final - late
    if table.role == hs.SUCCESSOR_ROLE:
        before = {s for s in before if reads(table, s)}
        assert before == {hs.S_WAITING, hs.S_CHECKED, hs.S_CONFIRMED}
    else:
        assert hs.O_CONFIRMED in before and hs.O_BROKEN in before
    for state in before:
        c = Cursor(table, state)
        c.feed(hs.ABORT)
        assert c.done, state
    for state in late - table.final:
        with pytest.raises(ProtocolError):
            Cursor(table, state).feed(hs.ABORT)
    # an abort after confirming exits without the cancel fault point (4): the outgoing host keeps all
    if table.role == hs.SUCCESSOR_ROLE:
        assert table.rows[(hs.S_CONFIRMED, hs.ABORT)].action == hs.A_EXIT_CANCELLED_AFTER_CONFIRM
        assert table.rows[(hs.S_CHECKED, hs.ABORT)].action == hs.A_EXIT_CANCELLED


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_second_final_handover_is_refused(protocol: int) -> None:
    out = Cursor(hs.outgoing(protocol))
    for e in (hs.HELLO, hs.PREPARE, hs.CHECKED, hs.FINAL):
        out.feed(e)
    for again in (hs.FINAL, hs.UNCHANGED, hs.PREPARE):
        with pytest.raises(ProtocolError) as exc:
            out.feed(again)
        assert exc.value.errno == errno.EPROTO
    assert out.state == hs.O_CONFIRMING
    out.feed(hs.CONFIRM)
    with pytest.raises(ProtocolError):
        out.feed(hs.FINAL)

    inc = Cursor(hs.incoming(protocol))
    for e in (hs.WARMED, hs.PREPARE, hs.OK, hs.FINAL, hs.OK):
        inc.feed(e)
    assert inc.state == hs.S_CONFIRMED
    for again in (hs.FINAL, hs.UNCHANGED, hs.PREPARE):
        with pytest.raises(ProtocolError) as exc:
            inc.feed(again)
        assert exc.value.errno == errno.EPROTO
        assert hs.on_refused(inc.state, again) == hs.A_IGNORE  # confirmed: only ack/abort/eof decide
    assert inc.state == hs.S_CONFIRMED


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_what_the_successor_does_with_a_refused_message(protocol: int) -> None:
    table = hs.incoming(protocol)
    # a final handover before the prepare-time one: an error reply, and it leaves (exit 2)
    with pytest.raises(ProtocolError):
        Cursor(table, hs.S_WAITING).feed(hs.FINAL)
    assert hs.on_refused(hs.S_WAITING, hs.FINAL) == hs.A_REFUSE_FINAL
    # a second prepare-time handover: an error reply, the first one stands
    with pytest.raises(ProtocolError):
        Cursor(table, hs.S_CHECKED).feed(hs.PREPARE)
    assert hs.on_refused(hs.S_CHECKED, hs.PREPARE) == hs.A_REPLY_ERROR
    # stray messages (an fd batch, an ack before the handover, an unknown op): dropped
    for state in (hs.S_WAITING, hs.S_CHECKED):
        for event in (hs.FDS, hs.ACK, UNKNOWN):
            with pytest.raises(ProtocolError):
                Cursor(table, state).feed(event)
            assert hs.on_refused(state, event) == hs.A_IGNORE
    # unchanged is protocol 3's: a successor announcing 2 refuses it as any final handover out of place
    if protocol < hs.UNCHANGED_SINCE:
        with pytest.raises(ProtocolError) as exc:
            Cursor(table, hs.S_CHECKED).feed(hs.UNCHANGED)
        assert hs.on_refused(hs.S_CHECKED, hs.UNCHANGED) == hs.A_REFUSE_FINAL
        assert exc.value.event == hs.UNCHANGED
    else:
        assert Cursor(table, hs.S_CHECKED).feed(hs.UNCHANGED) == hs.A_ADOPT_PREPARED


def test_only_protocol_3_has_the_unchanged_rows() -> None:
    for p in PROTOCOLS:
        out, inc = hs.TABLES[p]
        has = p >= hs.UNCHANGED_SINCE
        assert ((hs.O_PREPARED, hs.UNCHANGED) in out.rows) is has
        assert ((hs.S_CHECKED, hs.UNCHANGED) in inc.rows) is has
        # nothing else differs
        assert set(out.rows) - {(hs.O_PREPARED, hs.UNCHANGED)} == set(hs.TABLES[HANDOVER_OLDEST][0].rows)
        assert set(inc.rows) - {(hs.S_CHECKED, hs.UNCHANGED)} == set(hs.TABLES[HANDOVER_OLDEST][1].rows)
    assert PROTOCOLS == list(range(HANDOVER_OLDEST, HANDOVER_PROTOCOL + 1))
    assert hs.OUTGOING is hs.outgoing(HANDOVER_PROTOCOL) and hs.INCOMING is hs.incoming(HANDOVER_PROTOCOL)
    # a newer successor is spoken to in our protocol; an older one than we speak gets the oldest
    # table, and is refused at hello before anything is sent (the link's check_protocol)
    assert hs.outgoing(HANDOVER_PROTOCOL + 5) is hs.OUTGOING
    assert hs.incoming(1) is hs.incoming(HANDOVER_OLDEST)


def test_the_tables_agree_on_every_message() -> None:
    for p in PROTOCOLS:
        out, inc = hs.TABLES[p]
        for mine, theirs in ((out, inc), (inc, out)):
            actions = {row.action for row in mine.rows.values()}
            if mine is inc:
                actions |= {hs.on_refused(s, e) for s in inc.states for e in INCOMING_EVENTS}
            for action in actions:
                for sent in hs.SENDS.get(action, ()):
                    assert sent in theirs.events, f"{mine.role} {action} sends {sent}, unknown to {theirs.role}"
        # and what the outgoing host sends in protocol p is all the successor of protocol p reads
        sent = {e for a in {r.action for r in out.rows.values()} for e in hs.SENDS.get(a, ())}
        assert sent == {e for e in inc.events if e in hs.TO_SUCCESSOR}
    assert not set(hs.SENDS) - {r.action for _, t in TABLES for r in t.rows.values()} - {hs.A_REPLY_ERROR}


class Conversation:
    """Both ends in lock step: each action's messages are fed to the other end at once; the
    successor's long steps feed their outcome; a successor that has exited reads nothing more."""

    def __init__(self, protocol: int, outcomes: dict[str, str] | None = None) -> None:
        self.out = Cursor(hs.outgoing(protocol))
        self.inc = Cursor(hs.incoming(protocol))
        self.outcomes = outcomes or {}
        self.log: list[tuple[str, str, str]] = []

    def exited(self, c: Cursor) -> bool:
        return c.done or (c is self.inc and c.state == hs.S_REFUSED)  # refuse_final exits 2

    def feed(self, c: Cursor, event: str) -> None:
        if self.exited(c):
            return  # a message to a process that is gone: the sender will see EOF
        action = c.feed(event)
        self.log.append((c.table.role, event, action))
        peer = self.inc if c is self.out else self.out
        for sent in hs.SENDS.get(action, ()):
            self.feed(peer, sent)
        if action in STEPS:
            self.feed(c, self.outcomes.get(action, hs.OK))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("unchanged", [False, True], ids=["final", "unchanged"])
def test_a_conversation_ends_with_both_ends_final(protocol: int, unchanged: bool) -> None:
    final = hs.UNCHANGED if unchanged and protocol >= hs.UNCHANGED_SINCE else hs.FINAL
    script = [(hs.SUCCESSOR_ROLE, hs.WARMED), (hs.OUTGOING_ROLE, hs.PREPARE), (hs.OUTGOING_ROLE, final),
              (hs.OUTGOING_ROLE, hs.ACK)]
    # the whole update, and an abort after every step before the ack
    for cut in range(len(script) + 1):
        conv = Conversation(protocol)
        for role, event in script[:cut]:
            conv.feed(conv.out if role == hs.OUTGOING_ROLE else conv.inc, event)
        if cut < len(script):
            if cut == 0:
                continue  # nothing started
            conv.feed(conv.out, hs.ABORT)
            assert conv.out.state == hs.O_ABORTED
            assert conv.inc.state == hs.S_CANCELLED, conv.log
        else:
            assert (conv.out.state, conv.inc.state) == (hs.O_ADOPTED, hs.S_SERVING), conv.log


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("step", [hs.A_CHECK_PREPARED, hs.A_ADOPT_FINAL])
def test_a_refusal_breaks_the_link_and_the_abort_follows(protocol: int, step: str) -> None:
    conv = Conversation(protocol, {step: hs.FAILED})
    conv.feed(conv.inc, hs.WARMED)
    conv.feed(conv.out, hs.PREPARE)
    if step == hs.A_ADOPT_FINAL:
        assert conv.out.state == hs.O_PREPARED
        conv.feed(conv.out, hs.FINAL)
    assert conv.out.state == hs.O_BROKEN  # the successor's error reply: the update raises
    conv.feed(conv.out, hs.ABORT)
    assert conv.out.state == hs.O_ABORTED
    # refused at prepare it waits to be prepared again or aborted; refused at the final tree it exits
    assert conv.inc.state == (hs.S_CANCELLED if step == hs.A_CHECK_PREPARED else hs.S_REFUSED)


def test_eof_where_the_successor_holds_everything_is_the_orphaned_rule() -> None:
    for _, table in TABLES:
        if table.role != hs.SUCCESSOR_ROLE:
            continue
        # nothing held yet: leave; the prepared host held: orphaned (serve if the predecessor died)
        assert table.rows[(hs.S_WAITING, hs.EOF)].action == hs.A_LEAVE
        assert table.rows[(hs.S_CHECKING, hs.EOF)].action == hs.A_LEAVE
        for s in (hs.S_CHECKED, hs.S_ADOPTING, hs.S_REFUSED):
            assert table.rows[(s, hs.EOF)].action == hs.A_ORPHANED
        assert table.rows[(hs.S_CONFIRMED, hs.EOF)].action == hs.A_ORPHANED_AFTER_CONFIRM
        # every state the successor reads in, or sends from, has a row for the channel's end
        for s in table.states - table.final - {hs.S_STARTING}:
            assert (s, hs.EOF) in table.rows, s


def test_messages_map_to_events_never_to_the_raw_op() -> None:
    ev = hs.successor_event
    assert ev({"op": "handover", "stage": "prepare", "fd_count": 1}) == hs.PREPARE
    assert ev({"op": "handover", "stage": "final", "tree_size": 9}) == hs.FINAL
    assert ev({"op": "handover", "stage": "final", "unchanged": True}) == hs.UNCHANGED
    assert ev({"op": "handover"}) == hs.FINAL  # the stage of a final handover was never checked
    assert ev({"op": "ack", "phases_ms": {}}) == hs.ACK
    for hostile in ({"op": "prepare"}, {"op": "final"}, {"op": "warmed"}, {"op": "eof"}, {"op": ["ack"]}, {}):
        assert ev(hostile) == UNKNOWN, hostile
    oe = hs.outgoing_event
    assert oe({"op": "confirm", "errno": 0}) == hs.CONFIRM
    assert oe({"op": "confirm", "errno": 5, "error": "x"}) == hs.ERROR
    assert oe({"errno": 95, "error": "x"}) == hs.ERROR
    for hostile in ({"op": "error"}, {"op": "timeout"}, {"op": "prepare"}, {"errno": 0}, {}):
        assert oe(hostile) == UNKNOWN, hostile


def test_a_refusal_names_the_expected_messages() -> None:
    e = hs.refusal(hs.OUTGOING, hs.O_CHECKING, UNKNOWN, "successor pid 7 answered 'bogus'")
    assert e.errno == errno.EPROTO
    assert e.message.startswith("successor pid 7 answered 'bogus' in state checking")
    assert e.message.endswith("expected 'checked'")
    e = hs.refusal(hs.INCOMING, hs.S_CHECKED, hs.PREPARE)
    assert "'prepare' is not allowed in state checked" in e.message
    assert e.message.endswith("expected 'final' or 'abort' or 'unchanged'")
    assert hs.refusal(hs.incoming(2), hs.S_CHECKED, hs.UNCHANGED).message.endswith("expected 'final' or 'abort'")


def test_every_action_has_code_in_the_loops() -> None:
    from luo.host import successor, successor_link

    for _, table in TABLES:
        loop = successor._ACTIONS if table.role == hs.SUCCESSOR_ROLE else successor_link._ACTIONS
        actions = {row.action for row in table.rows.values()}
        if table.role == hs.SUCCESSOR_ROLE:
            actions |= {hs.on_refused(s, e) for s in table.states for e in INCOMING_EVENTS}
        assert actions <= set(loop), actions - set(loop)


# -- the loops, in-process: a socketpair for the channel, no successor process ---------------------

class NoProcess:
    """Stands for the successor's Popen: already exited, so kill() signals nobody."""

    pid = 0

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


def link_and_peer() -> tuple[Any, socket.socket]:
    from luo.host.successor_link import SuccessorLink

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return SuccessorLink(NoProcess(), mine, {}), theirs  # type: ignore[arg-type]


def sent(peer: socket.socket) -> list[dict[str, Any]]:
    """What the link sent so far (and the fds with it, closed)."""
    out = []
    while True:
        try:
            got = recv_msg(peer, recv_flags=socket.MSG_DONTWAIT)
        except BlockingIOError:
            return out
        if got is None:
            return out
        for fd in got[1]:
            os.close(fd)
        out.append(got[0])


def test_the_link_follows_its_table_through_a_whole_update() -> None:
    link, peer = link_and_peer()
    send_msg(peer, {"op": "hello", "pid": 1, "compatibles": [], "protocol": HANDOVER_PROTOCOL})
    link._await(1.0, "start and import")
    assert link.cursor.state == hs.O_READY and link.takes_unchanged
    send_msg(peer, {"op": "checked"})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    link.prepare(b"tree", [], listener.fileno(), 1.0)
    listener.close()
    assert [m["op"] for m in sent(peer)] == ["handover"]
    send_msg(peer, ok(op="confirm", liveupdate_number=1))
    assert link.handover(None, 1.0)["liveupdate_number"] == 1
    assert sent(peer) == [{"op": "handover", "stage": "final", "unchanged": True}]
    link.acknowledge({"freeze": 1.0})
    assert [m["op"] for m in sent(peer)] == ["ack"]
    send_msg(peer, {"op": "adopted"})
    assert link.wait_adopted(1.0) and link.cursor.done
    link.kill()
    assert sent(peer) == []  # after the ack nothing is sent, the abort included


def test_the_link_refuses_an_answer_out_of_place_naming_the_expected_one() -> None:
    link, peer = link_and_peer()
    send_msg(peer, {"op": "checked"})
    with pytest.raises(LuoError) as exc:
        link._await(1.0, "start and import")
    assert exc.value.errno == errno.EPROTO
    assert "answered 'checked' in state starting" in exc.value.message
    assert exc.value.message.endswith("expected 'hello'")
    link.kill()
    assert sent(peer) == [{"op": "abort"}]  # before the ack, a cancel says so


def test_the_link_refuses_a_send_out_of_order_before_it_reaches_the_wire() -> None:
    link, peer = link_and_peer()
    send_msg(peer, {"op": "hello", "pid": 1, "compatibles": []})  # no protocol: 2, no unchanged
    link._await(1.0, "start and import")
    assert not link.takes_unchanged and link.cursor.table is hs.outgoing(2)
    for blob in (b"tree", None):
        with pytest.raises(ProtocolError):
            link.handover(blob, 1.0)  # before prepare
    assert sent(peer) == []
    send_msg(peer, {"op": "checked"})
    link.prepare(b"tree", [], peer.fileno(), 1.0)
    sent(peer)
    with pytest.raises(ProtocolError):
        link.handover(None, 1.0)  # unchanged, to a protocol-2 successor
    assert sent(peer) == []


def test_the_link_after_a_refusal_and_after_the_ack() -> None:
    link, peer = link_and_peer()
    send_msg(peer, {"op": "hello", "pid": 1, "compatibles": [], "protocol": 3})
    link._await(1.0, "start and import")
    send_msg(peer, {"errno": errno.EOPNOTSUPP, "error": "unknown compatible"})
    with pytest.raises(LuoError) as exc:
        link.prepare(b"tree", [], peer.fileno(), 1.0)
    assert exc.value.errno == errno.EOPNOTSUPP and link.cursor.state == hs.O_BROKEN
    sent(peer)
    link.kill()
    assert sent(peer) == [{"op": "abort"}]

    link, peer = link_and_peer()
    link.cursor = Cursor(link.cursor.table, hs.O_ACKED)
    send_msg(peer, {"op": "confirm"})
    assert not link.wait_adopted(1.0)  # out of place after the ack: no adoption (logged)
    assert link.cursor.state == hs.O_ACKED


class Holding:
    """Stands for luo.host.successor.Incoming before the prepare-time handover: holds nothing."""

    known = {"memfd-v1"}
    host = None

    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def successor_and_peer(protocol: int = HANDOVER_PROTOCOL) -> tuple[Any, socket.socket, Holding]:
    from luo.host.successor import SuccessorEnd, Watched

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    inc = Holding()
    return SuccessorEnd(mine, inc, Watched(None), protocol), theirs, inc  # type: ignore[arg-type]


def test_the_successor_drops_strays_answers_garbage_and_refuses_a_final_tree_first() -> None:
    end, peer, inc = successor_and_peer(2)
    r, w = os.pipe()
    send_msg(peer, {"op": "bogus"}, [r])
    send_msg(peer, {"op": "ack"})
    send_msg(peer, {"op": "fds", "index": 0}, [w])
    peer.send(b"{not json")
    send_msg(peer, {"op": "handover", "stage": "final", "unchanged": True})
    os.close(r)
    os.close(w)
    assert end.run() == 2
    got = sent(peer)
    assert got[0] == {"op": "hello", "pid": os.getpid(), "compatibles": ["memfd-v1"], "protocol": 2}
    assert got[1]["errno"] == errno.EINVAL  # the garbled datagram
    assert got[2]["errno"] == errno.EPROTO and "'unchanged' is not allowed in state waiting" in got[2]["error"]
    assert got[2]["error"].endswith("expected 'prepare' or 'abort'")
    assert len(got) == 3 and inc.released == 1 and end.cursor.state == hs.S_WAITING


@pytest.mark.parametrize(("last", "code"), [("abort", 0), ("eof", 1)])
def test_the_successor_before_any_handover(last: str, code: int) -> None:
    end, peer, inc = successor_and_peer()
    if last == "abort":
        send_msg(peer, {"op": "abort"})
    else:
        peer.shutdown(socket.SHUT_WR)
    assert end.run() == code
    assert end.cursor.state == (hs.S_CANCELLED if last == "abort" else hs.S_LEFT)
    assert inc.released == (1 if last == "eof" else 0)
