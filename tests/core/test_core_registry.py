"""Registering subsystems and handlers."""

from __future__ import annotations

import errno

import pytest
from core_participants import RecHandler, RecSubsystem, World

from luo.core import Orchestrator
from luo.core.handover import FileRecord, LuoRecord
from luo.errors import LuoError


def err(exc: pytest.ExceptionInfo[LuoError]) -> int:
    return exc.value.errno


def test_duplicate_handler_is_eexist(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    with pytest.raises(LuoError) as exc:
        orch.register_handler(RecHandler(world))
    assert err(exc) == errno.EEXIST


@pytest.mark.parametrize("compatible,ok", [("c" * 48, True), ("c" * 49, False), ("é" * 24, True), ("é" * 24 + "x", False), ("", False)])
def test_compatible_at_most_48_bytes(world: World, compatible: str, ok: bool) -> None:
    orch = Orchestrator()
    if ok:
        orch.register_handler(RecHandler(world, compatible))
    else:
        with pytest.raises(LuoError) as exc:
            orch.register_handler(RecHandler(world, compatible))
        assert err(exc) == errno.EINVAL
        assert orch.status()["handlers"] == []


def test_unregister_handler(world: World) -> None:
    orch = Orchestrator([RecHandler(world), RecHandler(world, "b-v1", "b")])
    orch.unregister_handler("mem-v1")
    assert orch.status()["handlers"] == ["b-v1"]
    with pytest.raises(LuoError) as exc:
        orch.unregister_handler("mem-v1")
    assert err(exc) == errno.ENOENT


def test_unregister_handler_owning_files_is_ebusy(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    orch.preserve_fd(world.new_file())
    with pytest.raises(LuoError) as exc:
        orch.unregister_handler("mem-v1")
    assert err(exc) == errno.EBUSY
    orch.unpreserve_fd(0)
    orch.unregister_handler("mem-v1")


def test_unregister_handler_owning_session_files_is_ebusy(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    s = orch.create_session("s")
    s.preserve_fd(world.new_file(), 1)
    with pytest.raises(LuoError) as exc:
        orch.unregister_handler("mem-v1")
    assert err(exc) == errno.EBUSY
    s.close()
    orch.unregister_handler("mem-v1")


def test_unregister_handler_with_incoming_files_is_ebusy(world: World) -> None:
    orch = Orchestrator(
        [RecHandler(world)], incoming=LuoRecord(0, files=(FileRecord(0, "mem-v1", 0, 0),)), incoming_fds=[world.new_file()]
    )
    with pytest.raises(LuoError) as exc:
        orch.unregister_handler("mem-v1")
    assert err(exc) == errno.EBUSY
    orch.finish()
    orch.unregister_handler("mem-v1")


def test_duplicate_subsystem_is_eexist(world: World) -> None:
    orch = Orchestrator([], [RecSubsystem(world, "vmm")])
    with pytest.raises(LuoError) as exc:
        orch.register_subsystem(RecSubsystem(world, "vmm"))
    assert err(exc) == errno.EEXIST


@pytest.mark.parametrize("name", ["", "a\0b"])
def test_bad_subsystem_name_is_einval(world: World, name: str) -> None:
    with pytest.raises(LuoError) as exc:
        Orchestrator().register_subsystem(RecSubsystem(world, name))
    assert err(exc) == errno.EINVAL


def test_unregister_subsystem(world: World) -> None:
    orch = Orchestrator([], [RecSubsystem(world, "a"), RecSubsystem(world, "b")])
    orch.unregister_subsystem("a")
    with pytest.raises(LuoError) as exc:
        orch.unregister_subsystem("a")
    assert err(exc) == errno.ENOENT
    orch.prepare()
    assert world.log == [("sub", "prepare", "b")]


def test_subsystem_registered_in_updated_gets_its_data(world: World) -> None:
    orch = Orchestrator(incoming=LuoRecord(0, subsystems={"late": 11}))
    sub = RecSubsystem(world, "late")
    orch.register_subsystem(sub)
    assert orch.get_subsystem_data("late") == 11
    orch.finish()
    assert world.log == [("sub", "finish", "late", 11)]


def test_unregistered_subsystem_gets_no_finish(world: World) -> None:
    orch = Orchestrator([], [RecSubsystem(world, "a")], incoming=LuoRecord(0, subsystems={"a": 1}))
    orch.unregister_subsystem("a")
    orch.finish()
    assert world.log == []
    assert orch.status()["subsystems"] == []


def test_handler_registered_later_serves_incoming(world: World) -> None:
    orch = Orchestrator(incoming=LuoRecord(0, files=(FileRecord(0, "mem-v1", 0, 0),)), incoming_fds=[world.new_file()])
    orch.register_handler(RecHandler(world))
    orch.restore_fd(0)
