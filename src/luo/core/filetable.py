"""The preserved-file machinery shared by the RFC v2 global table and 6.19 sessions.

Both designs keep "a set of fds, each owned by a handler, named by a u64 token" and walk it at
the same moments; they differ only in who picks the token and the order of the walk. So one
``OutgoingFiles`` serves both, configured with an order, and the per-file steps (preserve,
prepare, freeze, cancel, unpreserve; retrieve, can_finish, finish) live here once. Neither has a
size limit: v7.2 dropped 6.19's 128 files per session.

fd ownership: once ``preserve_file`` succeeds the core owns the fd; the functions here never
close anything. Freed fds are appended to a caller-supplied ``released`` list and the host
closes them (see ``Orchestrator.take_released_fds``).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Hashable, Iterator
from typing import Literal

from luo.core.calls import check_u64, guarded, must_not_fail
from luo.core.fds import FdLedger
from luo.core.participants import FileHandler, IncomingFile, Owner, PreservedFile
from luo.core.registry import Registry
from luo.errors import LuoError

log = logging.getLogger("luo.core")

Order = Literal["token", "preserve"]


def _who(pf: PreservedFile) -> str:
    where = f"session {pf.session!r}" if pf.session is not None else "global table"
    return f"file {pf.token} ({pf.compatible}, {where})"


def _who_in(inc: IncomingFile) -> str:
    where = f"session {inc.session!r}" if inc.session is not None else "global table"
    return f"incoming file {inc.token} ({inc.compatible}, {where})"


class OutgoingFiles:
    """Preserved fds of one scope (the global table or one session).

    ``order="token"`` walks by ascending token, as the RFC v2 xarray does; ``order="preserve"``
    walks in preservation order, as a 6.19 session's list does. No count limit (v7.2).
    """

    def __init__(self, order: Order, scope: str = "global table") -> None:
        self.order = order
        self.scope = scope
        self._files: dict[int, PreservedFile] = {}

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, token: int) -> bool:
        return token in self._files

    def __iter__(self) -> Iterator[PreservedFile]:
        return iter(self.ordered())

    def ordered(self) -> list[PreservedFile]:
        if self.order == "token":
            return [self._files[t] for t in sorted(self._files)]
        return list(self._files.values())

    def get(self, token: int) -> PreservedFile:
        try:
            return self._files[token]
        except KeyError:
            raise LuoError(errno.ENOENT, f"no preserved file with token {token} in the {self.scope}") from None

    def check_room(self, token: int) -> None:
        """Refuse a new token that is taken (``-EEXIST``)."""
        if token in self._files:
            raise LuoError(errno.EEXIST, f"token {token} is already used in the {self.scope}")

    def add(self, pf: PreservedFile) -> None:
        self.check_room(pf.token)
        self._files[pf.token] = pf

    def remove(self, token: int) -> PreservedFile:
        pf = self.get(token)
        del self._files[token]
        return pf

    def fds(self) -> list[int]:
        return [pf.fd for pf in self.ordered()]

    def clear(self) -> None:
        self._files.clear()


# outgoing steps


def identify(handler: FileHandler, fd: int) -> Hashable | None:
    """``handler.identity(fd)``, its failures as LuoError (a file that cannot say is refused)."""
    return guarded(lambda: handler.identity(fd), f"handler {handler.compatible} identity")


def preserve_file(
    handler: FileHandler, fd: int, token: int, owner: Owner, session: str | None, ident: Hashable | None = None
) -> PreservedFile:
    """Let the owning handler do the heavy work now (6.19: preserve while running).

    On failure nothing is kept and the caller still owns ``fd``.
    """
    pf = PreservedFile(token=token, fd=fd, handler=handler, owner=owner, session=session, ident=ident)
    pf.data = check_u64(guarded(lambda: handler.preserve(pf), f"{_who(pf)} preserve"), f"{_who(pf)} preserve")
    return pf


def unpreserve_file(pf: PreservedFile, ledger: FdLedger) -> None:
    """Undo preserve (must not fail) and hand the fd back for closing."""
    must_not_fail([pf], lambda p: p.handler.unpreserve(p), lambda p: f"{_who(p)} unpreserve")
    ledger.release(pf.fd)


def prepare_file(pf: PreservedFile) -> None:
    pf.data = check_u64(pf.handler.prepare(pf), f"{_who(pf)} prepare")
    pf.prepared = True


def freeze_file(pf: PreservedFile) -> None:
    pf.data = check_u64(pf.handler.freeze(pf), f"{_who(pf)} freeze")
    pf.frozen = True


def cancel_file(pf: PreservedFile) -> None:
    """RFC v2 cancel / 6.19 unfreeze. The flags still say what is being undone during the call."""
    try:
        pf.handler.cancel(pf)
    finally:
        pf.prepared = False
        pf.frozen = False


def file_who(pf: PreservedFile) -> str:
    return _who(pf)


# incoming steps


class IncomingFiles:
    """Incoming preserved fds of one scope, in the order the predecessor recorded them."""

    def __init__(self, scope: str = "global table") -> None:
        self.scope = scope
        self._files: dict[int, IncomingFile] = {}

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, token: int) -> bool:
        return token in self._files

    def __iter__(self) -> Iterator[IncomingFile]:
        return iter(list(self._files.values()))

    def ordered(self) -> list[IncomingFile]:
        return list(self._files.values())

    def add(self, inc: IncomingFile) -> None:
        if inc.token in self._files:
            raise LuoError(errno.EINVAL, f"incoming token {inc.token} appears twice in the {self.scope}")
        self._files[inc.token] = inc

    def get(self, token: int) -> IncomingFile:
        try:
            return self._files[token]
        except KeyError:
            raise LuoError(errno.ENOENT, f"no incoming file with token {token} in the {self.scope}") from None

    def clear(self) -> None:
        self._files.clear()


def _handler_of(registry: Registry, inc: IncomingFile) -> FileHandler:
    handler = registry.handler_for(inc.compatible)
    if handler is None:
        raise LuoError(errno.ENOENT, f"no handler registered for {inc.compatible!r} ({_who_in(inc)})")
    return handler


def retrieve_file(registry: Registry, inc: IncomingFile, ledger: FdLedger, *, sticky: bool = False) -> int:
    """Ask the handler for a new fd for the caller; the core keeps its own copy (``inc.fd``).

    A handler that hands out an fd the core still holds (``inc.fd`` itself rather than a dup)
    would make the host close it twice: refused with ``-EIO``.

    ``sticky`` (sessions, v7.3): the first failure is kept on the file and every later call
    fails with the same errno and sentence, without asking the handler again, as upstream
    remembers a failed retrieve's status; a file that failed once is not half-restored later.
    """
    if sticky and inc.error is not None:
        raise LuoError(inc.error.errno, inc.error.message)
    try:
        handler = _handler_of(registry, inc)
        fd = guarded(lambda: handler.retrieve(inc), f"{_who_in(inc)} retrieve")
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise LuoError(errno.EIO, f"{_who_in(inc)} retrieve returned {fd!r}, not an fd")
        if fd in ledger:
            raise LuoError(errno.EIO, f"{_who_in(inc)} retrieve returned fd {fd}, which LUO still holds (dup it)")
    except LuoError as err:
        if sticky:
            inc.error = LuoError(err.errno, err.message)
        raise
    inc.retrieved = True
    return fd


def first_veto(registry: Registry, files: list[IncomingFile]) -> IncomingFile | None:
    """6.19 ``can_finish``: the first file whose handler says "not yet", or None.

    A file whose handler is not registered cannot object (it will only be discarded).
    """
    for inc in files:
        handler = registry.handler_for(inc.compatible)
        if handler is None:
            continue
        if not guarded(lambda h=handler, i=inc: bool(h.can_finish(i)), f"{_who_in(inc)} can_finish"):
            return inc
    return None


def finish_files(registry: Registry, files: list[IncomingFile], ledger: FdLedger) -> None:
    """Finish each file in the given order (reclaimed = retrieved); their fds are released."""

    def finish(inc: IncomingFile) -> None:
        try:
            handler = registry.handler_for(inc.compatible)
            if handler is None:
                log.warning("%s: no handler registered, discarded without finish", _who_in(inc))
            else:
                handler.finish(inc, inc.retrieved)
        finally:
            inc.done = True
            ledger.release(inc.fd)

    must_not_fail(files, finish, lambda i: f"{_who_in(i)} finish")
