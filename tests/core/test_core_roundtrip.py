"""One orchestrator's outgoing record fed to a second one; handover; status."""

from __future__ import annotations

import errno
import json

import pytest
from core_participants import RecHandler, RecSubsystem, World

from luo.core import Orchestrator, State
from luo.core.participants import Owner
from luo.errors import LuoError


def build(world: World, incoming=None, fds=()):  # type: ignore[no-untyped-def]
    return Orchestrator(
        [RecHandler(world), RecHandler(world, "sock-v1", "sock")],
        [RecSubsystem(world, "vmm", 40), RecSubsystem(world, "pool", 50)],
        incoming=incoming,
        incoming_fds=fds,
    )


def test_round_trip(world: World) -> None:
    old = build(world)
    g = [world.new_file(content="g0"), world.new_file("sock", "g1")]
    old.preserve_fd(g[0], owner=Owner(10, 0, "vmm"))
    old.preserve_fd(g[1], token=77)
    vm1 = old.create_session("vm1", owner=Owner(11, 1, "agent"))
    vm1.preserve_fd(world.new_file(content="ram"), 5)
    vm1.preserve_fd(world.new_file("sock", "mon"), 2)
    old.create_session("empty")
    old.prepare()
    old.freeze()
    record, fds = old.outgoing_record()

    assert record.liveupdate_number == 0
    assert record.subsystems == {"vmm": 41, "pool": 51}
    assert [f.token for f in record.files] == [0, 77]
    assert [(s.name, [f.token for f in s.files]) for s in record.sessions] == [("vm1", [5, 2]), ("empty", [])]
    assert [f.fd_index for f in record.all_files()] == [0, 1, 2, 3]
    assert len(fds) == 4 and fds[:2] == g
    assert record.files[0].meta == {"pid": "10", "uid": "0", "comm": "vmm", "kind": "mem", "size": "2"}
    assert record.sessions[0].files[0].meta["session"] == "vm1"
    assert record.sessions[0].files[0].meta["size"] == "3"  # describe() facts travel too
    assert record.sessions[0].meta == {"pid": "11", "uid": "1", "comm": "agent"}

    new = build(world, record, fds)
    assert new.state is State.UPDATED
    assert new.liveupdate_number == 1
    assert new.get_subsystem_data("vmm") == 41 and new.get_subsystem_data("pool") == 51
    assert world.files[new.restore_fd(0)].content == "g0"
    assert world.files[new.restore_fd(77)].content == "g1"
    h = new.retrieve_session("vm1")
    assert h.tokens == [5, 2]
    assert world.files[h.retrieve_fd(2)].content == "mon"
    assert new.retrieve_session("empty").tokens == []
    status = new.status()
    json.dumps(status)
    vm1_file = next(f for f in status["files"] if f["token"] == 5)  # type: ignore[union-attr,index]
    assert vm1_file["owner"] == {"pid": 11, "uid": 1, "comm": "agent"} and vm1_file["session"] == "vm1"

    # the old side lets go
    assert old.handover_complete() == fds
    assert old.handed_over and old.status()["files"] == [] and old.status()["sessions"] == []
    assert vm1.closed
    for attempt in (old.cancel, old.outgoing_record, old.handover_complete, old.begin_update):
        with pytest.raises(LuoError) as exc:
            attempt()
        assert exc.value.errno == errno.EINVAL

    new.finish()
    assert new.state is State.NORMAL
    assert sorted(new.take_released_fds()) == sorted(fds)


def test_second_update_counts_up(world: World) -> None:
    orch = build(world)
    for n in range(3):
        orch.preserve_fd(world.new_file(content=str(n)), token=n)
        orch.prepare()
        orch.begin_update()
        record, fds = orch.outgoing_record()
        assert record.liveupdate_number == n
        orch.handover_complete()
        orch = build(world, record, fds)
        assert orch.liveupdate_number == n + 1
        assert world.files[orch.restore_fd(n)].content == str(n)
        orch.finish()


def test_record_in_prepared_is_for_checking(world: World) -> None:
    orch = build(world)
    orch.preserve_fd(world.new_file())
    orch.prepare()
    record, _ = orch.outgoing_record()
    assert record.files[0].data == 2000 and record.subsystems == {"vmm": 40, "pool": 50}
    orch.freeze()
    record, _ = orch.outgoing_record()
    assert record.files[0].data == 3000 and record.subsystems == {"vmm": 41, "pool": 51}


@pytest.mark.parametrize("state", ["normal", "updated"])
def test_record_outside_prepared_frozen_is_einval(world: World, state: str) -> None:
    from luo.core.handover import LuoRecord

    orch = build(world, LuoRecord(0)) if state == "updated" else build(world)
    with pytest.raises(LuoError) as exc:
        orch.outgoing_record()
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(LuoError) as exc:
        orch.handover_complete()
    assert exc.value.errno == errno.EINVAL


def test_handover_complete_only_when_frozen(world: World) -> None:
    orch = build(world)
    orch.prepare()
    with pytest.raises(LuoError) as exc:
        orch.handover_complete()
    assert exc.value.errno == errno.EINVAL
    orch.freeze()
    assert orch.handover_complete() == []


def test_status_is_json(world: World) -> None:
    orch = build(world)
    orch.preserve_fd(world.new_file(content="abc"))
    orch.create_session("s").preserve_fd(world.new_file("sock"), 3)
    st = orch.status()
    assert json.loads(json.dumps(st)) == st
    assert st["state"] == "normal" and st["liveupdate_number"] == 0
    assert st["events"] == ["prepare"]
    assert st["handlers"] == ["mem-v1", "sock-v1"]
    f0 = st["files"][0]  # type: ignore[index]
    assert f0["kind"] == "mem" and f0["size"] == "3" and f0["compatible"] == "mem-v1"
    assert [s["name"] for s in st["subsystems"]] == ["vmm", "pool"]  # type: ignore[union-attr,index]


def test_status_survives_a_broken_describe(world: World) -> None:
    class Broken(RecHandler):
        def describe(self, fd: int) -> dict[str, str]:
            raise RuntimeError("no")

    orch = Orchestrator([Broken(world)])
    orch.preserve_fd(world.new_file())
    assert "describe_error" in orch.status()["files"][0]  # type: ignore[index]
