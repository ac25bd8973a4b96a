"""Probe subsystems: real participants of a real host that record every callback.

A host started with ``LUO_PROBES="a,b:prepare,c:freeze"`` registers subsystems ``probe-a``,
``probe-b`` (fails prepare) and ``probe-c`` (fails freeze), in that order, each appending
``<name> <event>`` to ``<runtime>/probes.log``. ``d:hold-prepare`` makes ``probe-d`` stop inside
its prepare until a test opens the FIFO ``<runtime>/probe-d.hold`` for writing: a way to act
while the host is in the middle of an update, without guessing at timing. Tests read the log to assert callback and
rollback order through the whole stack (socket, daemon, orchestrator).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from luo.abi import PROBE_MEMFD_COMPATIBLE
from luo.core.participants import FileHandler, IncomingFile, PreservedFile, Subsystem
from luo.errors import LuoError
from luo.handlers.memfd import MemfdHandler, memfd_name
from luo.host import faults


class ProbeSubsystem(Subsystem):
    def __init__(self, name: str, log: Path, fail_at: set[str]) -> None:
        self.name = name
        self.log = log
        self.fail_at = fail_at

    def _record(self, event: str) -> None:
        with open(self.log, "a") as f:
            f.write(f"{self.name} {event}\n")
        faults.point("subsystem", event)
        if f"hold-{event}" in self.fail_at:
            fifo = self.log.with_name(f"{self.name}.hold")
            if not fifo.exists():
                os.mkfifo(fifo)
            with open(fifo, "rb"):  # blocks until the test opens the other end
                pass
        if event in self.fail_at:
            raise LuoError(errno.EAGAIN, f"{self.name} fails {event} on purpose")

    def prepare(self) -> int:
        self._record("prepare")
        return 0x1000

    def freeze(self, data: int) -> int:
        self._record("freeze")
        return data + 1

    def cancel(self, data: int) -> None:
        self._record("cancel")

    def finish(self, data: int) -> None:
        self._record("finish")


def probes_from_env(runtime_root: Path) -> list[Subsystem]:
    spec = os.environ.get("LUO_PROBES", "")
    out: list[Subsystem] = []
    for item in filter(None, (w.strip() for w in spec.split(","))):
        name, _, fails = item.partition(":")
        out.append(ProbeSubsystem(f"probe-{name}", runtime_root / "probes.log", set(filter(None, fails.split("+")))))
    return out


PROBE_MEMFD_PREFIX = "luo-probe"


class ProbeMemfdHandler(MemfdHandler):
    """memfd-v1's behaviour under its own compatible, for memfds named ``luo-probe*``, with a fault
    point (``fault=handler:<event>:<kind>``) at each event: the file handler of the fault matrix."""

    compatible = PROBE_MEMFD_COMPATIBLE

    def can_preserve(self, fd: int) -> bool:
        return super().can_preserve(fd) and memfd_name(fd).startswith(PROBE_MEMFD_PREFIX)

    def prepare(self, pf: PreservedFile) -> int:
        faults.point("handler", "prepare")
        return super().prepare(pf)

    def freeze(self, pf: PreservedFile) -> int:
        faults.point("handler", "freeze")
        return super().freeze(pf)

    def cancel(self, pf: PreservedFile) -> None:
        faults.point("handler", "cancel")

    def finish(self, inc: IncomingFile, reclaimed: bool) -> None:
        faults.point("handler", "finish")


def probe_handlers_from_env() -> list[FileHandler]:
    return [ProbeMemfdHandler()] if os.environ.get("LUO_PROBE_HANDLER") == "1" else []
