"""Errors carry an errno, as every LUO call in the kernel returns 0 or -errno.

One exception type for the whole project keeps the control socket, libluo and the CLI
honest: whatever goes wrong, the caller gets the same errno the kernel would have given and a
sentence a human can act on, never a traceback.
"""

from __future__ import annotations

import errno as _errno
import os

# Names the kernel sources use where Python's errorcode picks an alias.
_PREFERRED = {_errno.EOPNOTSUPP: "EOPNOTSUPP", _errno.EAGAIN: "EAGAIN", _errno.EDEADLK: "EDEADLK"}


class LuoError(Exception):
    """A refused LUO operation: ``errno`` is what the kernel would return (positive)."""

    def __init__(self, err: int, message: str = "") -> None:
        self.errno = int(err)
        self.message = message or os.strerror(self.errno)
        super().__init__(self.errno, self.message)

    @property
    def errname(self) -> str:
        return _PREFERRED.get(self.errno) or _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"{self.errname}: {self.message}"
