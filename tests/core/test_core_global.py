"""RFC v2 global table: preserve, unpreserve, restore, tokens, fd ownership, subsystem data."""

from __future__ import annotations

import errno

import pytest
from core_participants import RecHandler, RecSubsystem, World

from luo.core import Orchestrator, State
from luo.core.handover import FileRecord, LuoRecord, SessionRecord
from luo.core.participants import Owner
from luo.errors import LuoError


def err(exc: pytest.ExceptionInfo[LuoError]) -> int:
    return exc.value.errno


def test_tokens_are_a_counter_from_zero(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    assert [orch.preserve_fd(world.new_file()) for _ in range(3)] == [0, 1, 2]


def test_auto_token_skips_user_tokens(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    assert orch.preserve_fd(world.new_file(), token=0) == 0
    assert orch.preserve_fd(world.new_file(), token=2) == 2
    assert orch.preserve_fd(world.new_file()) == 1
    assert orch.preserve_fd(world.new_file()) == 3


def test_auto_token_is_monotonic_after_unpreserve(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    orch.preserve_fd(world.new_file())
    orch.unpreserve_fd(0)
    assert orch.preserve_fd(world.new_file()) == 1


def test_token_must_be_unique(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    orch.preserve_fd(world.new_file(), token=42)
    world.clear()
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(world.new_file(), token=42)
    assert err(exc) == errno.EEXIST
    assert world.log == []  # refused before the handler saw it


@pytest.mark.parametrize("token", [-1, 1 << 64, "7", 1.0, True])
def test_token_must_be_a_u64(world: World, token: object) -> None:
    orch = Orchestrator([RecHandler(world)])
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(world.new_file(), token=token)  # type: ignore[arg-type]
    assert err(exc) == errno.EINVAL


def test_largest_token_is_fine(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    assert orch.preserve_fd(world.new_file(), token=(1 << 64) - 1) == (1 << 64) - 1


def test_no_handler_is_enoent(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(world.new_file(kind="devnull"))
    assert err(exc) == errno.ENOENT
    with pytest.raises(LuoError) as exc:
        Orchestrator().preserve_fd(world.new_file())
    assert err(exc) == errno.ENOENT


def test_first_accepting_handler_owns_the_file(world: World) -> None:
    a, b, c = RecHandler(world, "a-v1", "x"), RecHandler(world, "b-v1", "mem"), RecHandler(world, "c-v1", "mem")
    orch = Orchestrator([a, b, c])
    orch.preserve_fd(world.new_file("mem"))
    assert world.ops("preserve") == [("file", "preserve", "b-v1", 0, None)]
    assert orch.status()["files"][0]["compatible"] == "b-v1"  # type: ignore[index]


def test_preserve_runs_at_once_and_stores_data(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    owner = Owner(pid=12, uid=3, comm="vmm")
    orch.preserve_fd(world.new_file(), token=5, owner=owner)
    (f,) = orch.status()["files"]  # type: ignore[misc]
    assert f["data"] == 1005 and f["owner"] == {"pid": 12, "uid": 3, "comm": "vmm"}
    assert f["session"] is None and f["direction"] == "out"


def test_failed_preserve_keeps_nothing(world: World) -> None:
    h = RecHandler(world)
    h.fail[("preserve", 0)] = errno.ENOMEM
    orch = Orchestrator([h])
    fd = world.new_file()
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(fd)
    assert err(exc) == errno.ENOMEM
    assert orch.status()["files"] == []
    assert orch.take_released_fds() == []  # the caller still owns fd
    # the auto token was not consumed and the fd can be offered again
    del h.fail[("preserve", 0)]
    assert orch.preserve_fd(fd) == 0


def test_participant_exceptions_become_luoerrors(world: World) -> None:
    h = RecHandler(world)
    h.raise_plain.add(("preserve", 0))
    orch = Orchestrator([h])
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(world.new_file())
    assert err(exc) == errno.EIO


def test_oserror_keeps_its_errno(world: World) -> None:
    class Picky(RecHandler):
        def preserve(self, pf):  # type: ignore[no-untyped-def]
            raise OSError(errno.EPERM, "sealed")

    orch = Orchestrator([Picky(world)])
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(world.new_file())
    assert err(exc) == errno.EPERM


def test_bad_data_from_a_handler_is_refused(world: World) -> None:
    class Sloppy(RecHandler):
        def preserve(self, pf):  # type: ignore[no-untyped-def]
            return None

    orch = Orchestrator([Sloppy(world)])
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(world.new_file())
    assert err(exc) == errno.EINVAL
    assert orch.status()["files"] == []


def test_fd_already_held_is_ebusy(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    fd = world.new_file()
    orch.preserve_fd(fd)
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(fd)
    assert err(exc) == errno.EBUSY
    with pytest.raises(LuoError) as exc:
        orch.create_session("s").preserve_fd(fd, 1)
    assert err(exc) == errno.EBUSY


def test_negative_fd_is_ebadf(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    with pytest.raises(LuoError) as exc:
        orch.preserve_fd(-1)
    assert err(exc) == errno.EBADF


def test_unpreserve_releases_the_fd(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    fd = world.new_file()
    orch.preserve_fd(fd, token=9)
    assert orch.take_released_fds() == []
    orch.unpreserve_fd(9)
    assert world.ops("unpreserve") == [("file", "unpreserve", "mem-v1", 9, None)]
    assert orch.take_released_fds() == [fd]
    assert orch.take_released_fds() == []  # cleared
    with pytest.raises(LuoError) as exc:
        orch.unpreserve_fd(9)
    assert err(exc) == errno.ENOENT


def test_unpreserve_unknown_is_enoent(world: World) -> None:
    with pytest.raises(LuoError) as exc:
        Orchestrator([RecHandler(world)]).unpreserve_fd(3)
    assert err(exc) == errno.ENOENT


def test_unpreserve_failure_still_releases(world: World) -> None:
    h = RecHandler(world)
    h.raise_plain.add(("unpreserve", 0))
    orch = Orchestrator([h])
    fd = world.new_file()
    orch.preserve_fd(fd)
    orch.unpreserve_fd(0)
    assert orch.take_released_fds() == [fd]


def test_tokens_survive_cancel(world: World) -> None:
    orch = Orchestrator([RecHandler(world)])
    orch.preserve_fd(world.new_file(), token=3)
    orch.prepare()
    orch.cancel()
    assert [f["token"] for f in orch.status()["files"]] == [3]  # type: ignore[index,union-attr]
    assert orch.take_released_fds() == []


# -- restore ---------------------------------------------------------------------------


def updated(world: World, *tokens: int, handlers: list[RecHandler] | None = None) -> tuple[Orchestrator, list[int]]:
    fds = [world.new_file(content=f"c{t}") for t in tokens]
    record = LuoRecord(
        liveupdate_number=2,
        subsystems={"vmm": 77},
        files=tuple(FileRecord(t, "mem-v1", 10 + t, i) for i, t in enumerate(tokens)),
    )
    hs = handlers if handlers is not None else [RecHandler(world)]
    return Orchestrator(hs, incoming=record, incoming_fds=fds), fds


def test_restore_gives_a_new_fd(world: World) -> None:
    orch, fds = updated(world, 4, 8)
    assert orch.state is State.UPDATED
    new = orch.restore_fd(8)
    assert new not in fds and world.files[new].content == "c8"
    assert world.ops("retrieve") == [("file", "retrieve", "mem-v1", 8, None)]


def test_restore_twice_is_einval(world: World) -> None:
    orch, _ = updated(world, 1)
    orch.restore_fd(1)
    with pytest.raises(LuoError) as exc:
        orch.restore_fd(1)
    assert err(exc) == errno.EINVAL


def test_restore_unknown_is_enoent(world: World) -> None:
    orch, _ = updated(world, 1)
    with pytest.raises(LuoError) as exc:
        orch.restore_fd(2)
    assert err(exc) == errno.ENOENT


def test_restore_without_handler_is_enoent_and_retryable(world: World) -> None:
    orch, _ = updated(world, 1, handlers=[])
    with pytest.raises(LuoError) as exc:
        orch.restore_fd(1)
    assert err(exc) == errno.ENOENT
    orch.register_handler(RecHandler(world))
    orch.restore_fd(1)


def test_failed_restore_can_be_retried(world: World) -> None:
    h = RecHandler(world)
    h.fail[("retrieve", 1)] = errno.EIO
    orch, _ = updated(world, 1, handlers=[h])
    with pytest.raises(LuoError):
        orch.restore_fd(1)
    del h.fail[("retrieve", 1)]
    orch.restore_fd(1)


@pytest.mark.parametrize("state", [State.NORMAL, State.PREPARED, State.FROZEN])
def test_restore_only_in_updated(world: World, state: State) -> None:
    orch = Orchestrator([RecHandler(world)])
    orch.preserve_fd(world.new_file())
    if state is not State.NORMAL:
        orch.prepare()
    if state is State.FROZEN:
        orch.freeze()
    with pytest.raises(LuoError) as exc:
        orch.restore_fd(0)
    assert err(exc) == errno.EBUSY


def test_restore_after_finish_is_ebusy(world: World) -> None:
    orch, _ = updated(world, 1)
    orch.finish()
    with pytest.raises(LuoError) as exc:
        orch.restore_fd(1)
    assert err(exc) == errno.EBUSY


def test_incoming_and_outgoing_tokens_are_separate(world: World) -> None:
    orch, _ = updated(world, 0)
    assert orch.preserve_fd(world.new_file()) == 0  # next update's table
    orch.restore_fd(0)


def test_liveupdate_number(world: World) -> None:
    assert Orchestrator().liveupdate_number == 0
    orch, _ = updated(world)
    assert orch.liveupdate_number == 3
    orch.finish()
    assert orch.liveupdate_number == 3


# -- subsystem data ---------------------------------------------------------------------


def test_subsystem_data_only_in_updated(world: World) -> None:
    orch, _ = updated(world)
    assert orch.get_subsystem_data("vmm") == 77
    with pytest.raises(LuoError) as exc:
        orch.get_subsystem_data("nope")
    assert err(exc) == errno.ENOENT
    orch.finish()
    with pytest.raises(LuoError) as exc:
        orch.get_subsystem_data("vmm")
    assert err(exc) == errno.ENOENT


def test_subsystem_data_in_normal_is_enoent() -> None:
    with pytest.raises(LuoError) as exc:
        Orchestrator().get_subsystem_data("vmm")
    assert err(exc) == errno.ENOENT


# -- incoming validation --------------------------------------------------------------


@pytest.mark.parametrize(
    "record,nfds",
    [
        (LuoRecord(1, files=(FileRecord(0, "mem-v1", 0, 1),)), 1),  # fd index out of range
        (LuoRecord(1, files=(FileRecord(0, "mem-v1", 0, -1),)), 1),
        (LuoRecord(1, files=(FileRecord(0, "mem-v1", 0, 0), FileRecord(0, "mem-v1", 0, 1))), 2),  # dup token
        (LuoRecord(1, files=(FileRecord(0, "mem-v1", 0, 0), FileRecord(1, "mem-v1", 0, 0))), 1),  # shared fd
        (LuoRecord(1, files=(FileRecord(0, "x" * 49, 0, 0),)), 1),
        (LuoRecord(1, files=(FileRecord(0, "mem-v1", -5, 0),)), 1),
        (LuoRecord(-1), 0),
        (LuoRecord(1, subsystems={"vmm": 1 << 64}), 0),
        (LuoRecord(1, sessions=(SessionRecord("a"), SessionRecord("a"))), 0),
        (LuoRecord(1, sessions=(SessionRecord("n" * 64),)), 0),
        (LuoRecord(1, sessions=(SessionRecord(""),)), 0),
        (LuoRecord(1, sessions=(SessionRecord("s", (FileRecord(1, "m", 0, 0), FileRecord(1, "m", 0, 1))),)), 2),
    ],
)
def test_malformed_incoming_is_refused_cleanly(world: World, record: LuoRecord, nfds: int) -> None:
    fds = [world.new_file() for _ in range(nfds)]
    with pytest.raises(LuoError) as exc:
        Orchestrator([RecHandler(world)], incoming=record, incoming_fds=fds)
    assert err(exc) == errno.EINVAL


def test_fds_without_record_are_refused() -> None:
    with pytest.raises(LuoError) as exc:
        Orchestrator(incoming_fds=[5])
    assert err(exc) == errno.EINVAL


def test_unreferenced_incoming_fds_are_released(world: World) -> None:
    fds = [world.new_file() for _ in range(3)]
    orch = Orchestrator(
        [RecHandler(world)], incoming=LuoRecord(0, files=(FileRecord(0, "mem-v1", 0, 1),)), incoming_fds=fds
    )
    assert orch.take_released_fds() == [fds[0], fds[2]]


def test_same_token_in_global_and_session_is_fine(world: World) -> None:
    fds = [world.new_file(), world.new_file()]
    record = LuoRecord(0, files=(FileRecord(0, "mem-v1", 0, 0),), sessions=(SessionRecord("s", (FileRecord(0, "mem-v1", 0, 1),)),))
    orch = Orchestrator([RecHandler(world)], incoming=record, incoming_fds=fds)
    orch.restore_fd(0)
    orch.retrieve_session("s").retrieve_fd(0)


def test_constructor_refusal_takes_no_fd(world: World) -> None:
    fds = [world.new_file()]
    with pytest.raises(LuoError) as exc:
        Orchestrator([RecHandler(world), RecHandler(world)], incoming=LuoRecord(0, files=(FileRecord(0, "mem-v1", 0, 0),)), incoming_fds=fds)
    assert err(exc) == errno.EEXIST


def test_subsystem_registered_in_constructor(world: World) -> None:
    orch = Orchestrator([], [RecSubsystem(world, "a"), RecSubsystem(world, "b")])
    assert [s["name"] for s in orch.status()["subsystems"]] == ["a", "b"]  # type: ignore[index,union-attr]


@pytest.mark.parametrize("fds", [[5, 5], [-1]])
def test_bad_incoming_fd_array_is_refused(fds: list[int]) -> None:
    with pytest.raises(LuoError) as exc:
        Orchestrator(incoming=LuoRecord(0), incoming_fds=fds)
    assert err(exc) == errno.EINVAL


def test_retrieve_handing_out_the_cores_fd_is_refused(world: World) -> None:
    class Lazy(RecHandler):
        def retrieve(self, inc):  # type: ignore[no-untyped-def]
            return inc.fd  # should have been a dup

    orch, _ = updated(world, 1, handlers=[Lazy(world)])
    with pytest.raises(LuoError) as exc:
        orch.restore_fd(1)
    assert err(exc) == errno.EIO
