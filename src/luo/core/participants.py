"""What a participant must offer LUO: subsystems and file handlers.

These mirror ``struct liveupdate_subsystem`` (RFC v2) and the file handler ops of both kernel
versions (RFC v2 ``liveupdate_filesystem`` and the 6.19 ``liveupdate_file_ops``), so one
preservation machinery serves the global state machine and sessions alike.

A "file" here is a file descriptor owned by the host process. Once a handler accepts it, the
host keeps it open until it is unpreserved, handed to the successor, or finished.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable
from dataclasses import dataclass, field

from luo.errors import LuoError

COMPATIBLE_MAX = 48  # bytes, as the 6.19 handler ops
SESSION_NAME_MAX = 63  # bytes (u8 name[64] with its NUL)
# No limit on files per session nor on sessions: v7.2 keeps LUO's state in linked blocks and
# dropped 6.19's 128 files per session (ENOSPC) and its ~744 sessions. luo follows v7.2.
PROGRAM_MAX = 200  # bytes of a client's description of itself (``program``), for status only


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
    # What the client says it acts for ("selftest pid 123" from ``luo run``): its claim, not
    # checked, shown labelled as such next to what SO_PEERCRED proves (pid, uid, comm).
    program: str = ""


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
    ident: Hashable | None = None  # handler.identity(fd): which file this is, for the EBUSY rule

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
    # v7.3: a failed retrieve fails the same way every later time; the first failure is kept
    error: LuoError | None = None
    done: bool = False  # finished or discarded: the host no longer holds ``fd``


class FileHandler(abc.ABC):
    """Preserves one kind of file, named by a compatible string (one handler per string).

    Defaults make the optional ops no-ops, so a handler only writes what its kind needs.
    """

    compatible: str

    @abc.abstractmethod
    def can_preserve(self, fd: int) -> bool:
        """Cheap check: is this fd of my kind? The first handler that says yes owns it."""

    def identity(self, fd: int) -> Hashable | None:
        """Which file ``fd`` opens, so that one file is preserved once (v7.2: ``EBUSY``).

        The kernel compares its ``struct file`` (or a handler's own id: ``luo_get_id``); the
        host only ever sees dups of the caller's fd (SCM_RIGHTS), so fd numbers say nothing and
        the luo handlers answer the inode, ``(st_dev, st_ino)``. None (the default): no identity,
        the file is not checked. Called once at preserve, after ``can_preserve`` said yes.
        """
        return None

    def recorded_size(self, data: int) -> int | None:
        """The size this handler froze for a file whose u64 is ``data`` (a memfd's), else None.

        ``luo run`` asks it (op ``preserved_size``) to refuse a truncate with EPERM, as the
        kernel does from preserve until finish."""
        return None

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
