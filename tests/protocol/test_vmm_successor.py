"""The VMM↔successor VMM tables walked with no process: every (state, event) pair, the happy path,
abort and EOF everywhere, and the ownership rule over every interleaving of the two ends.

The tables are written out again here, independently of luo.protocol.vmm_successor, so a change
to a row has to be made twice, on purpose. The exploration models both processes and the two
directions of their socket (FIFO queues that close), lets each end move whenever it could (send,
receive, time out, finish a long step, die), and checks that no reachable pair of states has both
ends owning the guest; mutated tables show the check can fail.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from luo.errors import LuoError
from luo.protocol import vmm_successor as vs
from luo.protocol.table import UNKNOWN, Cursor, ProtocolError, Row, Table

# -- the tables, written out -----------------------------------------------------------------------

EXPECTED_RUNNING: dict[tuple[str, str], tuple[str, str]] = {
    ("idle", "send_warm"): ("send_warm", "warming"),
    ("idle", "send_saved"): ("", "idle"),
    ("idle", "drop"): ("", "idle"),
    ("warming", "warm"): ("negotiate", "warm"),
    ("warming", "error_reply"): ("close", "idle"),
    ("warming", "eof"): ("close", "idle"),
    ("warming", "timeout"): ("close", "idle"),
    ("warming", "protocol_error"): ("close", "idle"),
    ("warming", "drop"): ("abort", "idle"),
    ("warm", "send_saved"): ("send_saved", "saved"),
    ("warm", "drop"): ("abort", "idle"),
    ("saved", "send_go"): ("send_go", "go-sent"),
    ("saved", "drop"): ("abort", "idle"),
    ("go-sent", "resumed"): ("exit", "handed-over"),
    ("go-sent", "eof"): ("fall_back", "reclaiming"),
    ("go-sent", "timeout"): ("fall_back", "reclaiming"),
    ("go-sent", "protocol_error"): ("fall_back", "reclaiming"),
    ("go-sent", "drop"): ("abort", "idle"),
    ("reclaiming", "drop"): ("abort", "idle"),
}

EXPECTED_SUCCESSOR: dict[tuple[str, str], tuple[str, str]] = {
    ("idle", "warm"): ("build", "building"),
    ("idle", "eof"): ("quit", "gone"),
    ("idle", "protocol_error"): ("quit", "gone"),
    ("building", "built"): ("reply_warm", "warm"),
    ("building", "build_failed"): ("reply_error", "gone"),
    ("warm", "saved"): ("restore", "restoring"),
    ("warm", "abort"): ("stop", "gone"),
    ("warm", "eof"): ("stop", "gone"),
    ("warm", "eof_predecessor_dead"): ("stop", "gone"),
    ("warm", "protocol_error"): ("stop", "gone"),
    ("restoring", "restore_done"): ("", "restored"),
    ("restoring", "restore_failed"): ("fail", "gone"),
    ("restored", "go"): ("resume", "resuming"),
    ("restored", "eof_predecessor_dead"): ("take_over", "orphaned"),
    ("restored", "abort"): ("stop", "gone"),
    ("restored", "eof"): ("stop", "gone"),
    ("restored", "protocol_error"): ("stop", "gone"),
    ("resuming", "resume_done"): ("send_resumed", "running"),
    ("resuming", "resume_failed"): ("fail", "gone"),
    ("orphaned", "resume_done"): ("report_orphaned", "running"),
    ("orphaned", "resume_failed"): ("fail", "gone"),
}

ALL_EVENTS = sorted({
    vs.WARM, vs.SAVED, vs.GO, vs.ABORT, vs.RESUMED, vs.SEND_WARM, vs.SEND_SAVED, vs.SEND_GO, vs.DROP,
    vs.ERROR_REPLY, vs.EOF, vs.EOF_PREDECESSOR_DEAD, vs.TIMEOUT, vs.PROTOCOL_ERROR, vs.BUILT,
    vs.BUILD_FAILED, vs.RESTORE_DONE, vs.RESTORE_FAILED, vs.RESUME_DONE, vs.RESUME_FAILED, UNKNOWN,
    "stop", "finish", "",  # ops of other channels, and nothing at all
})

# where each end's loop blocks on a read (what it can get there: a message, an EOF, a bad message)
RUNNING_READS = ("warming", "go-sent")
SUCCESSOR_READS = ("idle", "warm", "restored")


def _rows(table: Table) -> dict[tuple[str, str], tuple[str, str]]:
    return {k: (r.action, r.next) for k, r in table.rows.items()}


def test_running_table_is_as_written() -> None:
    assert _rows(vs.RUNNING) == EXPECTED_RUNNING
    assert vs.RUNNING.initial == "idle" and vs.RUNNING.final == {"handed-over"}


def test_successor_table_is_as_written() -> None:
    assert _rows(vs.SUCCESSOR) == EXPECTED_SUCCESSOR
    assert vs.SUCCESSOR.initial == "idle" and vs.SUCCESSOR.final == {"running", "gone"}


def test_ownership_sets() -> None:
    """The rule of docs/reliability.md: the running VMM until it sends go; the successor from go,
    or from its predecessor's death after saved."""
    assert vs.RUNNING_OWNS == {"idle", "warming", "warm", "saved"}
    assert vs.SUCCESSOR_OWNS == {"resuming", "orphaned", "running"}
    assert vs.RUNNING_OWNS < vs.RUNNING.states and vs.SUCCESSOR_OWNS < vs.SUCCESSOR.states
    # go is what passes the guest: the one row from an owning state to a non-owning one but drop's
    passing = {k for k, r in vs.RUNNING.rows.items() if k[0] in vs.RUNNING_OWNS and r.next not in vs.RUNNING_OWNS}
    assert passing == {("saved", "send_go")}
    # and only go, or the death after saved, gives it to the successor
    taking = {k for k, r in vs.SUCCESSOR.rows.items()
              if k[0] not in vs.SUCCESSOR_OWNS and r.next in vs.SUCCESSOR_OWNS}
    assert taking == {("restored", "go"), ("restored", "eof_predecessor_dead")}


@pytest.mark.parametrize("event", ALL_EVENTS)
@pytest.mark.parametrize(("table", "expected"), [(vs.RUNNING, EXPECTED_RUNNING), (vs.SUCCESSOR, EXPECTED_SUCCESSOR)],
                         ids=["running", "successor"])
def test_every_pair_is_a_row_or_eproto(table: Table, expected: dict[tuple[str, str], tuple[str, str]],
                                       event: str) -> None:
    for state in sorted(table.states):
        want = expected.get((state, event))
        if want is not None:
            assert table.step(state, event) == Row(*want)
            continue
        with pytest.raises(ProtocolError) as ei:
            table.step(state, event)
        assert ei.value.errno == errno.EPROTO
        assert (ei.value.state, ei.value.event) == (state, event)
        assert f"{event!r} is not allowed in state {state}" in ei.value.message
        if state in table.final:
            assert f"{state} is final" in ei.value.message
        else:  # it says what the state takes instead
            assert all(repr(e) in ei.value.message for e in table.expects(state))


def test_happy_path() -> None:
    run, suc = vs.running_end(), Cursor(vs.SUCCESSOR)
    steps = [
        (run, vs.SEND_WARM, "send_warm"), (suc, vs.WARM, "build"), (suc, vs.BUILT, "reply_warm"),
        (run, vs.WARM, "negotiate"), (run, vs.SEND_SAVED, "send_saved"), (suc, vs.SAVED, "restore"),
        (suc, vs.RESTORE_DONE, ""), (run, vs.SEND_GO, "send_go"), (suc, vs.GO, "resume"),
        (suc, vs.RESUME_DONE, "send_resumed"), (run, vs.RESUMED, "exit"),
    ]
    owners = []
    for cursor, event, action in steps:
        assert cursor.feed(event) == action, (cursor.table.role, event)
        owners.append((run.state in vs.RUNNING_OWNS, suc.state in vs.SUCCESSOR_OWNS))
    assert run.done and suc.done and (run.state, suc.state) == ("handed-over", "running")
    assert [s for _, s in run.history] == ["warming", "warm", "saved", "go-sent", "handed-over"]
    assert [s for _, s in suc.history] == ["building", "warm", "restoring", "restored", "resuming", "running"]
    # the guest changes hands exactly once, at go, and never has two owners or none in between
    assert owners.index((False, True)) == 8 and all(o == (True, False) for o in owners[:7])
    assert owners[7] == (False, False)  # go sent, not yet read: in flight, nobody runs it (paused)
    assert all(o == (False, True) for o in owners[8:])


@pytest.mark.parametrize("state", sorted(vs.SUCCESSOR.states))
def test_successor_abort_and_eof_in_every_state(state: str) -> None:
    """Abort and EOF leave the guest where it is wherever the successor reads; only the predecessor's
    death after saved gives it the guest; where it does not read (or is done), they are errors."""
    for event in (vs.ABORT, vs.EOF, vs.EOF_PREDECESSOR_DEAD):
        try:
            row = vs.SUCCESSOR.step(state, event)
        except ProtocolError as e:
            assert e.errno == errno.EPROTO
            if event == vs.ABORT:
                assert state not in ("warm", "restored")
            else:
                assert state not in SUCCESSOR_READS or (state, event) == ("idle", vs.EOF_PREDECESSOR_DEAD)
            continue
        assert state in SUCCESSOR_READS
        if (state, event) == ("restored", vs.EOF_PREDECESSOR_DEAD):
            assert row == Row("take_over", "orphaned") and row.next in vs.SUCCESSOR_OWNS
        else:
            assert row.next == "gone" and row.next not in vs.SUCCESSOR_OWNS
            assert row.action in ("stop", "quit")


@pytest.mark.parametrize("state", sorted(vs.RUNNING.states))
def test_running_drop_and_eof_in_every_state(state: str) -> None:
    """Keeping the guest (drop) is never refused but when it is gone; it kills wherever a successor
    may live. An EOF or a timeout is taken where the running VMM waits, and nowhere else."""
    if state == "handed-over":
        with pytest.raises(ProtocolError):
            vs.RUNNING.step(state, vs.DROP)
    else:
        row = vs.RUNNING.step(state, vs.DROP)
        assert row.next == "idle" and row.next in vs.RUNNING_OWNS
        assert row.action == ("" if state == "idle" else "abort")
    for event in (vs.EOF, vs.TIMEOUT, vs.PROTOCOL_ERROR):
        if state in RUNNING_READS:
            row = vs.RUNNING.step(state, event)
            # before go the guest was never given: close; after go it may run there: kill first
            assert row == (Row("close", "idle") if state == "warming" else Row("fall_back", "reclaiming"))
        else:
            with pytest.raises(ProtocolError):
                vs.RUNNING.step(state, event)


def test_reading_states_never_raise() -> None:
    """Whatever arrives where a loop reads, ``take`` finds a row (protocol_error at worst)."""
    for table, reads in ((vs.RUNNING, RUNNING_READS), (vs.SUCCESSOR, SUCCESSOR_READS)):
        for state in reads:
            for event in ALL_EVENTS:
                cursor = Cursor(table, state)
                action, broke = vs.take(cursor, event)
                if (state, event) in table.rows:
                    assert broke is None and action == table.rows[(state, event)].action
                else:
                    assert broke is not None and broke.errno == errno.EPROTO and broke.event == event
                    assert cursor.history == [(vs.PROTOCOL_ERROR, table.rows[(state, vs.PROTOCOL_ERROR)].next)]


def test_take_raises_where_nothing_is_read() -> None:
    cursor = Cursor(vs.RUNNING, "warm")
    with pytest.raises(ProtocolError) as ei:
        vs.take(cursor, vs.RESUMED)
    assert ei.value.event == vs.RESUMED and cursor.state == "warm" and cursor.history == []


def test_go_without_saved_is_refused_by_both_ends() -> None:
    """The running VMM cannot send go before saved; a successor that gets it anyway stops."""
    with pytest.raises(ProtocolError):
        vs.RUNNING.step("warm", vs.SEND_GO)
    cursor = Cursor(vs.SUCCESSOR, "warm")
    assert vs.take(cursor, vs.GO)[0] == "stop" and cursor.state == "gone"


def test_messages_become_events() -> None:
    assert vs.running_event({"op": "warm", "errno": 0, "pid": 7}) == vs.WARM
    assert vs.running_event({"errno": errno.EPROTONOSUPPORT, "error": "no"}) == vs.ERROR_REPLY
    assert vs.running_event({"op": "warm", "errno": 5}) == vs.ERROR_REPLY  # an errno wins over the op
    assert vs.running_event({"op": "resumed"}) == vs.RESUMED
    assert vs.running_event({"op": "saved"}) == UNKNOWN  # not something a successor says
    assert vs.running_event({}) == UNKNOWN
    for op in ("warm", "saved", "go", "abort"):
        assert vs.successor_event({"op": op}) == op
    for bad in ("resumed", "__class__", 3, None, ["go"]):
        assert vs.successor_event({"op": bad}) == UNKNOWN


def test_only_the_restored_state_asks_the_pidfd() -> None:
    """An EOF costs the successor a wait on its predecessor's pidfd only where the answer matters."""
    assert [s for s in sorted(vs.SUCCESSOR.states) if vs.eof_needs_pidfd(s)] == ["restored"]


def test_unhandled_is_eproto() -> None:
    e = vs.unhandled(Cursor(vs.SUCCESSOR, "warm"), "dance")
    assert isinstance(e, LuoError) and e.errno == errno.EPROTO
    assert "'dance'" in e.message and "warm" in e.message


# -- every interleaving ----------------------------------------------------------------------------

# What each action does to the world, as the loops do it (luo.vmm.live.outgoing / incoming).
RUNNING_EFFECTS = {
    "": (), "send_warm": ("push:warm",), "negotiate": (), "close": ("close",), "send_saved": ("push:saved",),
    "send_go": ("push:go",), "exit": ("close",), "fall_back": (), "abort": ("push:abort", "close", "kill"),
}
SUCCESSOR_EFFECTS = {
    "": (), "build": (), "reply_warm": ("push:warm",), "reply_error": ("push:error",), "quit": (), "restore": (),
    "stop": (), "fail": (), "resume": (), "take_over": (), "send_resumed": ("push:resumed",),
    "report_orphaned": (),
}
RUNNING_SENDS = (vs.SEND_WARM, vs.SEND_SAVED, vs.SEND_GO, vs.DROP)
RUNNING_RECEIVES = (vs.WARM, vs.RESUMED, vs.ERROR_REPLY, vs.EOF, vs.TIMEOUT, vs.PROTOCOL_ERROR)
SUCCESSOR_RECEIVES = (*vs.TO_SUCCESSOR, vs.EOF, vs.EOF_PREDECESSOR_DEAD, vs.PROTOCOL_ERROR)


@dataclass(frozen=True)
class World:
    run: str = "idle"
    run_alive: bool = True
    killing: bool = False  # the running VMM is inside a drop: abort sent, the kill not yet done
    warmed: bool = False  # one successor per world: the running VMM sends warm once
    suc: str = "idle"
    suc_alive: bool = True
    to_suc: tuple[str, ...] = ()
    to_suc_closed: bool = False
    to_run: tuple[str, ...] = ()
    to_run_closed: bool = False


@dataclass
class Exploration:
    worlds: dict[World, tuple[World, str] | None]  # each reachable world and how it was first reached
    violations: list[World]
    errors: list[str]

    def path(self, w: World) -> list[str]:
        steps = []
        while (prev := self.worlds[w]) is not None:
            w, step = prev
            steps.append(step)
        return steps[::-1]


def _apply(w: World, effects: tuple[str, ...], side: str) -> World:
    for eff in effects:
        if side == "run":
            if eff.startswith("push:") and not w.to_suc_closed:
                w = replace(w, to_suc=(*w.to_suc, eff[5:]))
            elif eff == "close":
                w = replace(w, to_suc_closed=True)
            elif eff == "kill":
                w = replace(w, killing=True)
        elif eff.startswith("push:") and not w.to_run_closed:
            w = replace(w, to_run=(*w.to_run, eff[5:]))
    return w


def _moves(w: World, running: Table, successor: Table) -> Iterator[tuple[str, World]]:
    """Every step either end can take in ``w``."""
    if w.run_alive and w.run not in running.final:
        yield "running VMM dies", replace(w, run_alive=False, killing=False, to_suc_closed=True)
        if w.killing:  # the kill ends with the successor gone; only then does the drop's row apply
            row = running.step(w.run, vs.DROP)
            yield "running VMM: successor killed and reaped", replace(
                w, killing=False, run=row.next, suc_alive=False, to_run_closed=True)
        else:
            for event in RUNNING_SENDS:
                if (w.run, event) not in running.rows or (event == vs.SEND_WARM and w.warmed):
                    continue
                row = running.rows[(w.run, event)]
                nxt = _apply(replace(w, warmed=w.warmed or event == vs.SEND_WARM), RUNNING_EFFECTS[row.action], "run")
                if not nxt.killing:  # a drop's state is entered once its kill is done
                    nxt = replace(nxt, run=row.next)
                yield f"running VMM: {event}", nxt
            if any((w.run, e) in running.rows for e in RUNNING_RECEIVES):
                got: list[tuple[str, World]] = [(vs.TIMEOUT, w)]
                if w.to_run:
                    msg = {"op": w.to_run[0]} if w.to_run[0] != "error" else {"errno": errno.EIO}
                    got.append((vs.running_event(msg), replace(w, to_run=w.to_run[1:])))
                elif w.to_run_closed:
                    got.append((vs.EOF, w))
                for event, base in got:
                    cursor = Cursor(running, w.run)
                    action, _ = vs.take(cursor, event)
                    nxt = _apply(base, RUNNING_EFFECTS[action], "run")
                    if nxt.killing:
                        nxt = replace(nxt, run=w.run)
                    else:
                        nxt = replace(nxt, run=cursor.state)
                    if nxt.run in running.final:
                        nxt = replace(nxt, to_suc_closed=True)
                    yield f"running VMM: {event}", nxt
    if w.suc_alive and w.suc not in successor.final:
        yield "successor VMM dies", replace(w, suc_alive=False, to_run_closed=True)
        expects = successor.expects(w.suc)
        if any(e in SUCCESSOR_RECEIVES for e in expects):
            got = []
            if w.to_suc:
                got.append((vs.successor_event({"op": w.to_suc[0]}), replace(w, to_suc=w.to_suc[1:])))
            elif w.to_suc_closed:
                got.append((vs.EOF, w))  # the pidfd may say alive a moment too long: a safe mistake
                if not w.run_alive:  # never dead while it lives (a pidfd is a fact)
                    got.append((vs.EOF_PREDECESSOR_DEAD, w))
        else:  # a long step of its own: either outcome
            got = [(e, w) for e in expects]
        for event, base in got:
            cursor = Cursor(successor, w.suc)
            action, _ = vs.take(cursor, event)
            nxt = replace(_apply(base, SUCCESSOR_EFFECTS[action], "suc"), suc=cursor.state)
            if nxt.suc in successor.final:  # it closes its end (and, gone, exits)
                nxt = replace(nxt, to_run_closed=True)
            yield f"successor VMM: {event}", nxt


def explore(running: Table = vs.RUNNING, successor: Table = vs.SUCCESSOR,
            running_owns: frozenset[str] = vs.RUNNING_OWNS,
            successor_owns: frozenset[str] = vs.SUCCESSOR_OWNS) -> Exploration:
    start = World()
    out = Exploration({start: None}, [], [])
    todo = deque([start])
    while todo:
        w = todo.popleft()
        if (w.run_alive and w.run in running_owns) and (w.suc_alive and w.suc in successor_owns):
            out.violations.append(w)
        try:
            moves = list(_moves(w, running, successor))
        except (ProtocolError, KeyError) as e:
            out.errors.append(f"{w}: {e!r}")
            continue
        for step, nxt in moves:
            if nxt not in out.worlds:
                out.worlds[nxt] = (w, step)
                todo.append(nxt)
    return out


def test_the_model_knows_every_action() -> None:
    assert {r.action for r in vs.RUNNING.rows.values()} == set(RUNNING_EFFECTS)
    assert {r.action for r in vs.SUCCESSOR.rows.values()} == set(SUCCESSOR_EFFECTS)


def test_no_interleaving_gives_the_guest_to_both() -> None:
    ex = explore()
    assert ex.errors == []
    assert ex.violations == [], [ex.path(v) for v in ex.violations[:3]]
    worlds = set(ex.worlds)
    assert len(worlds) > 100  # the exploration did explore
    # and it reached the outcomes that matter: the switch, the orphan take-over, the fallback after go
    assert any(w.run == "handed-over" and w.suc == "running" for w in worlds)
    assert any(w.suc == "orphaned" and not w.run_alive for w in worlds)
    assert any(w.run == "reclaiming" for w in worlds)
    assert any(w.run == "idle" and w.warmed and not w.suc_alive and w.run_alive for w in worlds)
    for w in worlds:
        if w.run == "handed-over":  # it left only on resumed
            assert w.suc == "running" or not w.suc_alive
        # nor does the guest go without an owner while both live, but in the hand-over itself: go
        # in flight, or a successor that failed after it and is being killed (the guest is paused)
        if w.run_alive and w.suc_alive and not w.killing and w.run not in ("go-sent", "reclaiming"):
            owners = (w.run in vs.RUNNING_OWNS) + (w.suc in vs.SUCCESSOR_OWNS)
            assert owners == 1, w


def test_the_orphan_take_over_needs_a_dead_predecessor_after_saved() -> None:
    ex = explore()
    for w in ex.worlds:
        if w.suc == "orphaned":
            steps = ex.path(w)
            assert not w.run_alive
            assert "running VMM: send_saved" in steps
            assert steps.index("running VMM dies") > steps.index("running VMM: send_saved")


# Mutated tables: each breaks the rule in a way the exploration must catch.

def _mutated(table: Table, changes: dict[tuple[str, str], Row]) -> Table:
    return Table(table.channel, table.role, table.initial, {**table.rows, **changes}, table.final)


@pytest.mark.parametrize(("running", "successor", "running_owns"), [
    # resuming the guest on a timeout after go without killing the successor first
    (_mutated(vs.RUNNING, {("go-sent", vs.TIMEOUT): Row("", "idle")}), vs.SUCCESSOR, vs.RUNNING_OWNS),
    # the same after an EOF, through reclaiming
    (_mutated(vs.RUNNING, {("reclaiming", vs.DROP): Row("", "idle")}), vs.SUCCESSOR, vs.RUNNING_OWNS),
    # the successor taking an EOF for a death: the running VMM that gave up a slow warm-up still runs it
    (vs.RUNNING, _mutated(vs.SUCCESSOR, {("warm", vs.EOF): Row("take_over", "orphaned")}), vs.RUNNING_OWNS),
    # the successor taking the guest on an abort
    (vs.RUNNING, _mutated(vs.SUCCESSOR, {("restored", vs.ABORT): Row("take_over", "orphaned")}), vs.RUNNING_OWNS),
    # the running VMM believing the guest is still its own after go
    (vs.RUNNING, vs.SUCCESSOR, vs.RUNNING_OWNS | {"go-sent"}),
], ids=["timeout-no-kill", "reclaim-no-kill", "eof-as-death", "abort-taken", "owns-after-go"])
def test_the_exploration_catches_a_broken_table(running: Table, successor: Table, running_owns: frozenset[str]) -> None:
    ex = explore(running, successor, running_owns)
    assert ex.violations, "a broken table went unnoticed"
