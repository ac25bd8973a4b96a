"""Random operation sequences (seeded, no hypothesis) checked against invariants.

Invariants after every step, across several update generations:
- the state moves only along the table (or to NORMAL on a failed freeze), and refusals are
  always LuoError;
- every fd the core took is either held (listed in status) or released exactly once, never
  both; an fd whose preserve failed is neither;
- status() is JSON-able.
"""

from __future__ import annotations

import json
import random

import pytest
from core_participants import RecHandler, RecSubsystem, World

from luo.core import Orchestrator, SessionHandle, State
from luo.core.participants import IncomingFile, PreservedFile
from luo.core.states import Event
from luo.core.transitions import REBOOT, TRANSITIONS
from luo.errors import LuoError


class Flaky(RecHandler):
    def __init__(self, world: World, rng: random.Random) -> None:
        super().__init__(world)
        self.rng = rng

    def _maybe(self, p: float) -> None:
        if self.rng.random() < p:
            raise LuoError(5, "flaky")

    def preserve(self, pf: PreservedFile) -> int:
        self._maybe(0.05)
        return super().preserve(pf)

    def prepare(self, pf: PreservedFile) -> int:
        self._maybe(0.03)
        return super().prepare(pf)

    def freeze(self, pf: PreservedFile) -> int:
        self._maybe(0.03)
        return super().freeze(pf)

    def can_finish(self, inc: IncomingFile) -> bool:
        return self.rng.random() > 0.05


class Checker:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.world = World()
        self.handler = Flaky(self.world, self.rng)
        self.orch = Orchestrator([self.handler], [RecSubsystem(self.world, "vmm")])
        self.taken: set[int] = set()
        self.released: list[int] = []
        self.handles: list[SessionHandle] = []
        self.generations = 0

    def held(self) -> set[int]:
        st = self.orch.status()
        json.dumps(st)
        return {f["fd"] for f in st["files"]}  # type: ignore[union-attr,index]

    def check(self) -> None:
        self.released += self.orch.take_released_fds()
        assert len(self.released) == len(set(self.released)), "an fd was released twice"
        held = self.held()
        assert not held & set(self.released)
        assert self.taken == held | (set(self.released) & self.taken)

    def step(self) -> None:
        o, rng, w = self.orch, self.rng, self.world
        before = o.state
        op = rng.choice(
            ["preserve", "preserve", "unpreserve", "session", "spreserve", "spreserve", "close", "prepare",
             "freeze", "cancel", "reboot", "finish", "restore", "retrieve", "rfd", "sfinish", "handover"]
        )
        try:
            if op == "preserve":
                fd = w.new_file()
                token = rng.choice([None, rng.randrange(8)])
                try:
                    o.preserve_fd(fd, token)
                    self.taken.add(fd)
                except LuoError:
                    assert fd not in self.held()
                    raise
            elif op == "unpreserve":
                o.unpreserve_fd(rng.randrange(8))
            elif op == "session":
                self.handles.append(o.create_session(rng.choice("abcd")))
            elif op == "spreserve" and self.handles:
                fd = w.new_file()
                try:
                    rng.choice(self.handles).preserve_fd(fd, rng.randrange(4))
                    self.taken.add(fd)
                except LuoError:
                    assert fd not in self.held()
                    raise
            elif op == "close" and self.handles:
                o.close_session(rng.choice(self.handles))
            elif op in ("prepare", "freeze", "cancel", "finish", "reboot"):
                step = REBOOT if op == "reboot" else Event(op)
                legal = (step, before) in TRANSITIONS
                try:
                    getattr(o, "begin_update" if op == "reboot" else op)()
                except LuoError:
                    after = o.state
                    if op in ("freeze", "reboot") and legal and before is State.PREPARED:
                        assert after is State.NORMAL
                    else:
                        assert after is before
                    raise
                assert legal and o.state is TRANSITIONS[(step, before)]
            elif op == "restore":
                o.restore_fd(rng.randrange(8))
            elif op == "retrieve":
                self.handles.append(o.retrieve_session(rng.choice("abcd")))
            elif op == "rfd" and self.handles:
                rng.choice(self.handles).retrieve_fd(rng.randrange(4))
            elif op == "sfinish" and self.handles:
                rng.choice(self.handles).finish()
            elif op == "handover" and o.state is State.FROZEN:
                self.handover()
        except LuoError:
            pass
        self.check()

    def handover(self) -> None:
        record, fds = self.orch.outgoing_record()
        tokens = sorted(f.token for f in record.files)
        sessions = {s.name: [f.token for f in s.files] for s in record.sessions}
        assert sorted(self.orch.handover_complete()) == sorted(fds)
        self.orch = Orchestrator([self.handler], [RecSubsystem(self.world, "vmm")], incoming=record, incoming_fds=fds)
        self.taken = set(fds)
        self.released = []
        self.handles = []
        self.generations += 1
        st = self.orch.status()
        assert sorted(f["token"] for f in st["files"] if f["session"] is None) == tokens  # type: ignore[union-attr,index]
        assert {s["name"]: s["files"] for s in st["sessions"]} == sessions  # type: ignore[union-attr,index]


@pytest.mark.parametrize("seed", range(40))
def test_random_sequences(seed: int) -> None:
    checker = Checker(seed)
    for _ in range(300):
        checker.step()
