"""What a participant must offer LUO: subsystems and file handlers.

These mirror ``struct liveupdate_subsystem`` (RFC v2) and the file handler ops of both kernel
versions (RFC v2 ``liveupdate_filesystem`` and the 6.19 ``liveupdate_file_ops``), so one
preservation machinery serves the global state machine and sessions alike.

A "file" here is a file descriptor owned by the host process. Once a handler accepts it, the
host keeps it open until it is unpreserved, handed to the successor, or finished.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

COMPATIBLE_MAX = 48  # bytes, as the 6.19 handler ops
SESSION_NAME_MAX = 63  # bytes (u8 name[64] with its NUL)
SESSION_FILES_MAX = 128


class Subsystem(abc.ABC):
    """An in-host subsystem with state that must cross the update.

    The u64 ``data`` is opaque to LUO: it is stored in the LUO tree under ``subsystems`` and
    handed back to the successor (``get_subsystem_data``), as the kernel does with a physical
    address. prepare and freeze may fail (raise LuoError); cancel and finish must not.
    """

    name: str

    @abc.abstractmethod
    def prepare(self) -> int: ...

    @abc.abstractmethod
    def freeze(self, data: int) -> int: ...

    @abc.abstractmethod
    def cancel(self, data: int) -> None: ...

    @abc.abstractmethod
    def finish(self, data: int) -> None: ...


@dataclass
class Owner:
    """Who preserved a file or created a session, for ``luo status`` and the logs."""

    pid: int = 0
    uid: int = 0
    comm: str = ""


@dataclass
class PreservedFile:
    """One outgoing preserved fd, as the host holds it."""

    token: int
    fd: int
    handler: FileHandler
    owner: Owner = field(default_factory=Owner)
    session: str | None = None  # None: the RFC v2 global table
    data: int = 0  # the handler's u64, refreshed by preserve/prepare/freeze
    prepared: bool = False
    frozen: bool = False
    facts: dict[str, str] | None = None  # handler.describe() as first recorded (see outgoing.py)

    @property
    def compatible(self) -> str:
        return self.handler.compatible


@dataclass
class IncomingFile:
    """One preserved fd as the successor received it, before it is retrieved."""

    token: int
    compatible: str
    data: int
    fd: int  # the host's copy, handed over by SCM_RIGHTS
    session: str | None = None
    retrieved: bool = False
    meta: dict[str, str] = field(default_factory=dict)


class FileHandler(abc.ABC):
    """Preserves one kind of file, named by a compatible string (one handler per string).

    Defaults make the optional ops no-ops, so a handler only writes what its kind needs.
    """

    compatible: str

    @abc.abstractmethod
    def can_preserve(self, fd: int) -> bool:
        """Cheap check: is this fd of my kind? The first handler that says yes owns it."""

    def preserve(self, pf: PreservedFile) -> int:
        """Heavy work at preserve time (6.19), while the workload runs. Returns the u64 data."""
        return 0

    def unpreserve(self, pf: PreservedFile) -> None:  # noqa: B027 (optional op, no-op default)
        """Undo preserve; the host closes ``pf.fd`` afterwards."""

    def prepare(self, pf: PreservedFile) -> int:
        """RFC v2 prepare. Returns the (possibly refreshed) u64 data."""
        return pf.data

    def freeze(self, pf: PreservedFile) -> int:
        """Last delta inside the blackout. Returns the u64 data."""
        return pf.data

    def cancel(self, pf: PreservedFile) -> None:  # noqa: B027 (optional op, no-op default)
        """Undo prepare/freeze (RFC v2 cancel, 6.19 unfreeze). Must not fail."""

    @abc.abstractmethod
    def retrieve(self, inc: IncomingFile) -> int:
        """In the successor: check the incoming file and return an fd for the caller (a new one)."""

    def can_finish(self, inc: IncomingFile) -> bool:
        return True

    def finish(self, inc: IncomingFile, reclaimed: bool) -> None:  # noqa: B027 (optional op, no-op default)
        """Finish; a file never reclaimed is discarded. Must not fail. The host closes ``inc.fd``."""

    def describe(self, fd: int) -> dict[str, str]:
        """A few facts for ``luo status`` (size, kind, address)."""
        return {}
