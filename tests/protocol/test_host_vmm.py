"""The host↔VMM channel's two tables (luo.protocol.host_vmm), walked without any process."""

from __future__ import annotations

import errno
import itertools

import pytest

from luo.protocol import host_vmm as hv
from luo.protocol.table import UNKNOWN, Cursor, ProtocolError

HOST_EVENTS = [hv.REGISTERED, *hv.REQUESTS, hv.OK, hv.FAILED, hv.EOF]
VMM_EVENTS = [*hv.REQUESTS, hv.DONE, hv.FAILED, hv.SWITCHED, hv.KEPT, hv.EOF, UNKNOWN]


@pytest.mark.parametrize("table,events", [(hv.HOST, HOST_EVENTS), (hv.VMM, VMM_EVENTS)], ids=["host", "vmm"])
def test_every_pair_is_a_row_or_eproto(table, events) -> None:  # noqa: ANN001
    for state, event in itertools.product(sorted(table.states), events):
        if (state, event) in table.rows:
            assert table.step(state, event).next in table.states
            continue
        with pytest.raises(ProtocolError) as exc:
            table.step(state, event)
        assert exc.value.errno == errno.EPROTO
        assert repr(event) in exc.value.message and state in exc.value.message


def run(table, events: list[str]) -> Cursor:  # noqa: ANN001
    c = Cursor(table)
    for e in events:
        c.feed(e)
    return c


def test_an_update_from_the_hosts_side() -> None:
    c = run(hv.HOST, [hv.REGISTERED, hv.PREPARE, hv.OK, hv.HANDED_OVER, hv.EOF, hv.REGISTERED])
    assert c.state == hv.RUNNING  # its successor registered under the same name
    assert [s for _, s in c.history] == ["running", "preparing", "prepared", "handed-over", "exited", "running"]


def test_a_plain_freeze_and_cancel_from_the_hosts_side() -> None:
    c = run(hv.HOST, [hv.REGISTERED, hv.PREPARE, hv.OK, hv.FREEZE, hv.FAILED, hv.CANCEL, hv.OK])
    assert c.state == hv.RUNNING


def test_the_host_refuses_to_send_out_of_order() -> None:
    """Requests the core's order never produces: the host's table refuses them before any send."""
    for events, bad in (([hv.REGISTERED], hv.FREEZE), ([hv.REGISTERED], hv.CANCEL), ([], hv.PREPARE),
                        ([hv.REGISTERED, hv.PREPARE, hv.OK], hv.PREPARE),
                        ([hv.REGISTERED, hv.PREPARE, hv.OK], hv.STOP),  # luo vm stop mid-update: EBUSY
                        ([hv.REGISTERED, hv.PREPARE, hv.OK, hv.HANDED_OVER], hv.CANCEL)):
        c = run(hv.HOST, events)
        with pytest.raises(ProtocolError):
            c.feed(bad)


def test_any_vmm_death_leaves_the_host_able_to_take_it_back() -> None:
    """Whatever the VMM's link was doing, its EOF leads to ``exited``, from which a VMM (its
    successor, or itself after a fallback) registers again."""
    for state in hv.HOST.states - {hv.STOPPED, hv.EXITED}:
        assert hv.HOST.step(state, hv.EOF).next == hv.EXITED
        assert hv.HOST.step(hv.EXITED, hv.REGISTERED).next == hv.RUNNING
    assert hv.HOST.step(hv.STOPPED, hv.EOF).next == hv.STOPPED


def test_the_vmm_switch_and_fallback() -> None:
    c = run(hv.VMM, [hv.PREPARE, hv.DONE, hv.HANDED_OVER, hv.SWITCHED])
    assert c.done and c.state == hv.GONE
    c = run(hv.VMM, [hv.PREPARE, hv.DONE, hv.HANDED_OVER, hv.KEPT])
    assert c.state == hv.SERVING and not c.done
    c = run(hv.VMM, [hv.PREPARE, hv.FAILED])
    assert c.state == hv.SERVING  # a failed warm-up: the guest never stopped, the VMM serves on


def test_the_vmm_keeps_the_guest_whenever_the_host_dies() -> None:
    for state in hv.VMM_ANSWERS:
        row = hv.VMM.step(state, hv.EOF)
        assert (row.action, row.next) == ("host_gone", hv.SERVING)


def test_the_vmm_refuses_out_of_order_and_unknown_requests() -> None:
    with pytest.raises(ProtocolError):
        Cursor(hv.VMM).feed(hv.FREEZE)  # freeze without a prepared successor
    c = run(hv.VMM, [hv.PREPARE, hv.DONE])
    with pytest.raises(ProtocolError):
        c.feed(hv.PREPARE)  # a second warm-up would leak the first successor
    assert c.state == hv.V_PREPARED  # refused: nothing moved
    for state in hv.VMM_ANSWERS:
        assert hv.VMM.step(state, UNKNOWN) == hv.VMM.rows[(state, UNKNOWN)]
        assert hv.VMM.step(state, UNKNOWN).action == "refuse" and hv.VMM.step(state, UNKNOWN).next == state


def test_the_two_ends_agree() -> None:
    """Every request the host may send, the VMM accepts in the state it is in when the host's
    link is in the matching state (host prepared ↔ VMM prepared, and so on)."""
    matching = {hv.RUNNING: hv.SERVING, hv.PREPARED: hv.V_PREPARED, hv.FROZEN: hv.V_FROZEN}
    for (hstate, event), row in hv.HOST.rows.items():
        if event in hv.REQUESTS and row.action == "send":
            assert (matching[hstate], event) in hv.VMM.rows, (hstate, event)
