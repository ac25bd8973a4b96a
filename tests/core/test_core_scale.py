"""Many files and sessions: the core stays linear and keeps everything straight."""

from __future__ import annotations

import time

from core_participants import RecHandler, RecSubsystem, World

from luo.core import Orchestrator, State
from luo.core.handover import LuoRecord


def test_hundred_full_sessions_round_trip(world: World) -> None:
    handler = RecHandler(world)
    orch = Orchestrator([handler], [RecSubsystem(world, "vmm")])
    start = time.perf_counter()
    for _ in range(1000):
        orch.preserve_fd(world.new_file())
    for s in range(100):
        h = orch.create_session(f"vm{s}")
        for t in range(128):
            h.preserve_fd(world.new_file(), t)
    orch.prepare()
    orch.begin_update()
    record, fds = orch.outgoing_record()
    assert orch.handover_complete() == fds
    new = Orchestrator([handler], [RecSubsystem(world, "vmm")], incoming=record, incoming_fds=fds)
    new.finish()
    elapsed = time.perf_counter() - start
    assert len(fds) == 1000 + 100 * 128 == len(set(fds))
    assert sorted(new.take_released_fds()) == sorted(fds)
    assert elapsed < 5.0, f"13,800 files took {elapsed:.2f}s: something went quadratic"


def test_outgoing_state_made_in_updated_survives_finish(world: World) -> None:
    orch = Orchestrator([RecHandler(world)], incoming=LuoRecord(0))
    fd = world.new_file()
    orch.preserve_fd(fd, token=3)
    h = orch.create_session("next")
    h.preserve_fd(world.new_file(), 1)
    orch.finish()
    assert orch.state is State.NORMAL
    assert not h.closed and h.tokens == [1]
    assert [f["token"] for f in orch.status()["files"]] == [3, 1]  # type: ignore[index,union-attr]
    assert orch.take_released_fds() == []
    orch.prepare()
    orch.freeze()
    record, fds = orch.outgoing_record()
    assert record.liveupdate_number == 1 and fds[0] == fd
