"""6.19 sessions: named groups of preserved fds with their own life cycle.

A session is the unit a workload agent owns: closing it (or crashing) unpreserves its files
without touching anyone else's, which is why the merged kernel design replaced the single
global table with sessions. Here a session is a scope of the shared file machinery
(``filetable``), so sessions and the RFC v2 global table are prepared, frozen and handed over
by the same code.

``SessionHandle`` stands in for the kernel's session fd: the host gives one to each client.
Its methods delegate to the orchestrator, which checks the global state.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Literal

from luo.core.filetable import OutgoingFiles
from luo.core.participants import SESSION_NAME_MAX, Owner
from luo.errors import LuoError

if TYPE_CHECKING:
    from luo.core.incoming import IncomingSession
    from luo.core.orchestrator import Orchestrator

Direction = Literal["out", "in"]


def check_session_name(name: object) -> str:
    """Non-empty, at most 63 bytes of UTF-8 (``u8 name[64]`` with its NUL), no NUL inside.

    ``EINVAL`` otherwise, as CREATE_SESSION in 6.19 and v7.2 (an empty name, or no NUL within
    the 64 bytes)."""
    if not isinstance(name, str):
        raise LuoError(errno.EINVAL, f"session name {name!r} is not a string")
    size = len(name.encode())
    if size == 0:
        raise LuoError(errno.EINVAL, "session name is empty")
    if size > SESSION_NAME_MAX:
        raise LuoError(errno.EINVAL, f"session name is {size} bytes, more than {SESSION_NAME_MAX}")
    if "\0" in name:
        raise LuoError(errno.EINVAL, "session name contains a NUL")
    return name


class OutgoingSession:
    def __init__(self, name: str, owner: Owner) -> None:
        self.name = name
        self.owner = owner
        self.files = OutgoingFiles("preserve", f"session {name!r}")  # no file limit (v7.2)
        self.gone = False


class SessionHandle:
    """A client's handle on one session, outgoing (created) or incoming (retrieved)."""

    def __init__(
        self, orchestrator: Orchestrator, session: OutgoingSession | IncomingSession, direction: Direction
    ) -> None:
        self._orch = orchestrator
        self._session = session
        self.direction: Direction = direction

    @property
    def name(self) -> str:
        return self._session.name

    @property
    def closed(self) -> bool:
        """True once the session is closed, finished, discarded or handed over."""
        return self._session.gone

    @property
    def tokens(self) -> list[int]:
        if self._session.gone:
            return []
        if isinstance(self._session, OutgoingSession):
            return [pf.token for pf in self._session.files.ordered()]
        return [inc.token for inc in self._session.files.ordered()]

    def preserve_fd(self, fd: int, token: int) -> int:
        """Outgoing only. The core owns ``fd`` on success. Returns ``token``."""
        return self._orch._session_preserve(self, fd, token)

    def retrieve_fd(self, token: int) -> int:
        """Incoming only. Any order, idempotent: each call returns a new fd from the handler; a
        failure is sticky (v7.3: every later call fails the same way)."""
        return self._orch._session_retrieve_fd(self, token)

    def finish(self) -> None:
        """Incoming only: can_finish veto (-EBUSY, nothing finished), then finish in reverse order."""
        self._orch._session_finish(self)

    def get_name(self) -> str:
        """v7.2 GET_NAME: the name, on a created or a retrieved session, open or not."""
        return self._session.name

    def close(self) -> None:
        """Same as ``Orchestrator.close_session(self)``."""
        self._orch.close_session(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<SessionHandle {self.name!r} {self.direction} {state}>"
