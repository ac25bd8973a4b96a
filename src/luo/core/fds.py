"""Who holds which fd: the core's ledger of held and released host fds.

The core never closes an fd; it only records what it holds and what it let go of, so the host
can close exactly those (``Orchestrator.take_released_fds``). One ledger per orchestrator also
answers "is this fd already held?" in O(1), which keeps preserving thousands of fds linear.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from luo.errors import LuoError


class FdLedger:
    def __init__(self) -> None:
        self._held: set[int] = set()
        self._released: list[int] = []
        self._serials: dict[int, int] = {}  # fd -> when it was taken: an fd number is reused, a serial never
        self._next_serial = 0
        self.changes = 0  # counts every hold, release and forget

    def __contains__(self, fd: int) -> bool:
        return fd in self._held

    def check_new(self, fd: object) -> int:
        """A fd the core may take: a non-negative int it does not hold already."""
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise LuoError(errno.EBADF, f"{fd!r} is not a file descriptor")
        if fd in self._held:
            raise LuoError(errno.EBUSY, f"fd {fd} is already held by LUO")
        return fd

    def hold(self, fd: int) -> None:
        self._held.add(fd)
        self.changes += 1
        self._serials[fd] = self._next_serial
        self._next_serial += 1

    def serial(self, fd: int) -> int:
        """Which holding of ``fd`` this is: tells a file from a later one that got the same number."""
        return self._serials[fd]

    def release(self, fd: int) -> None:
        """The core is done with ``fd``: the host will close it."""
        self._held.discard(fd)
        self._serials.pop(fd, None)
        self._released.append(fd)
        self.changes += 1

    def release_all(self, fds: Iterable[int]) -> None:
        for fd in fds:
            self.release(fd)

    def forget(self, fds: Iterable[int]) -> None:
        """Stop holding ``fds`` without releasing them (the caller closes them itself)."""
        for fd in fds:
            self._held.discard(fd)
            self._serials.pop(fd, None)
            self.changes += 1

    def take_released(self) -> list[int]:
        fds, self._released = self._released, []
        return fds
