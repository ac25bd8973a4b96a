"""Recording test participants for the core.

These are real participants of a toy kind, not mocks: a registry of "fake files" (plain ints
standing for fds, each with a kind and a content), a handler that preserves files of one kind
and a subsystem that hands a u64 across, both writing every call into one shared log so tests
can assert order. Failures are injected per (operation, token/name) with an errno.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

import pytest

from luo.core import Orchestrator, State
from luo.core.handover import LuoRecord
from luo.core.participants import FileHandler, IncomingFile, PreservedFile, Subsystem
from luo.errors import LuoError

Entry = tuple[object, ...]


@dataclass
class FakeFile:
    kind: str
    content: str = ""


@dataclass
class World:
    """Fake files, one shared call log, and the participants writing into it."""

    files: dict[int, FakeFile] = field(default_factory=dict)
    log: list[Entry] = field(default_factory=list)
    _fds: itertools.count = field(default_factory=lambda: itertools.count(100))

    def new_file(self, kind: str = "mem", content: str = "") -> int:
        fd = next(self._fds)
        self.files[fd] = FakeFile(kind, content)
        return fd

    def alias(self, fd: int) -> int:
        """Another fd for the same fake file (a dup, or an SCM_RIGHTS copy as the host receives)."""
        new = next(self._fds)
        self.files[new] = self.files[fd]
        return new

    def ops(self, *kinds: str) -> list[Entry]:
        """The log entries whose operation is one of ``kinds`` (all when none given)."""
        return [e for e in self.log if not kinds or e[1] in kinds]

    def clear(self) -> None:
        self.log.clear()


class RecHandler(FileHandler):
    """Preserves fake files of one kind. data = a value derived from the token and the step."""

    def __init__(self, world: World, compatible: str = "mem-v1", kind: str = "mem") -> None:
        self.world = world
        self.compatible = compatible
        self.kind = kind
        self.fail: dict[tuple[str, int], int] = {}  # (op, token) -> errno
        self.veto: set[int] = set()  # tokens whose can_finish says no
        self.raise_plain: set[tuple[str, int]] = set()  # raise a non-LuoError instead

    def _call(self, op: str, token: int, *extra: object) -> None:
        self.world.log.append(("file", op, self.compatible, token, *extra))
        if (op, token) in self.raise_plain:
            raise RuntimeError(f"{op} {token} broke")
        if (op, token) in self.fail:
            raise LuoError(self.fail[(op, token)], f"{op} of {token} refused by the test")

    def can_preserve(self, fd: int) -> bool:
        f = self.world.files.get(fd)
        return f is not None and f.kind == self.kind

    def identity(self, fd: int) -> Hashable:
        """The fake file itself, as luo's handlers answer an inode: every alias of it is one file."""
        return ("fake", id(self.world.files[fd]))

    def recorded_size(self, data: int) -> int:
        return data

    def preserve(self, pf: PreservedFile) -> int:
        self._call("preserve", pf.token, pf.session)
        return (1000 + pf.token) % (1 << 64)

    def unpreserve(self, pf: PreservedFile) -> None:
        self._call("unpreserve", pf.token, pf.session)

    def prepare(self, pf: PreservedFile) -> int:
        self._call("prepare", pf.token, pf.session)
        return (2000 + pf.token) % (1 << 64)

    def freeze(self, pf: PreservedFile) -> int:
        self._call("freeze", pf.token, pf.session)
        return (3000 + pf.token) % (1 << 64)

    def cancel(self, pf: PreservedFile) -> None:
        self._call("cancel", pf.token, pf.session)

    def retrieve(self, inc: IncomingFile) -> int:
        self._call("retrieve", inc.token, inc.session)
        return self.world.new_file(self.kind, self.world.files[inc.fd].content)

    def can_finish(self, inc: IncomingFile) -> bool:
        self.world.log.append(("file", "can_finish", self.compatible, inc.token, inc.session))
        return inc.token not in self.veto

    def finish(self, inc: IncomingFile, reclaimed: bool) -> None:
        self._call("finish", inc.token, inc.session, reclaimed)

    def describe(self, fd: int) -> dict[str, str]:
        return {"kind": self.world.files[fd].kind, "size": str(len(self.world.files[fd].content))}


class RecSubsystem(Subsystem):
    def __init__(self, world: World, name: str, value: int = 7) -> None:
        self.world = world
        self.name = name
        self.value = value
        self.fail: dict[str, int] = {}  # op -> errno

    def _call(self, op: str, *extra: object) -> None:
        self.world.log.append(("sub", op, self.name, *extra))
        if op in self.fail:
            raise LuoError(self.fail[op], f"{op} of {self.name} refused by the test")

    def prepare(self) -> int:
        self._call("prepare")
        return self.value

    def freeze(self, data: int) -> int:
        self._call("freeze", data)
        return data + 1

    def cancel(self, data: int) -> None:
        self._call("cancel", data)

    def finish(self, data: int) -> None:
        self._call("finish", data)


def in_state(world: World, state: State, handlers: list[FileHandler] | None = None) -> Orchestrator:
    """An orchestrator brought to ``state`` through the real API."""
    hs = handlers if handlers is not None else [RecHandler(world)]
    if state is State.UPDATED:
        return Orchestrator(hs, incoming=LuoRecord(liveupdate_number=4))
    orch = Orchestrator(hs)
    if state in (State.PREPARED, State.FROZEN):
        orch.prepare()
    if state is State.FROZEN:
        orch.freeze()
    return orch


def errno_of(exc: pytest.ExceptionInfo[LuoError]) -> str:
    return errno.errorcode[exc.value.errno]
