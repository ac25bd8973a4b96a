"""The fd store: a copy of every preserved fd that outlives a crash of luod.

luod holds the fds its clients preserved. A client that exits leaves luod the only holder, so a
crash of luod would free exactly the memory live update exists to keep (a guest's RAM memfd).
luod therefore mirrors each preserved fd, and a metadata blob describing them, into a store that
lives outside it, and a restarted luod loads them back.

Two backends, one interface (FdStore):

- ``systemd``: the service manager's own fd store (``FDSTORE=1`` on $NOTIFY_SOCKET; the fds come
  back as $LISTEN_FDS at the next start). Nothing more to run, and it survives anything short of a
  stop of the unit. See luo.keeper.systemd.
- ``keeper``: a tiny process, ``luo keeper`` (luo-keeper in ps), in a session of its own, that
  holds the fds on a SOCK_SEQPACKET socket in the runtime dir. For hosts without systemd, and
  tests. See luo.keeper.server and luo.keeper.client.

Which one (open_store): $LUO_FDSTORE=``keeper`` or ``systemd`` chooses explicitly; unset (or
empty), systemd is used when $NOTIFY_SOCKET is set *and* $FDSTORE is a positive number (systemd
254+ sets $FDSTORE to FileDescriptorStoreMax= when that is non-zero), else the keeper. Needing
$FDSTORE, not only $NOTIFY_SOCKET, is deliberate: under a unit without FileDescriptorStoreMax=
systemd accepts FDSTORE=1 messages and silently closes the fds, which would lose everything at
the first crash; the keeper works under any unit.

Keys are 1 to 200 characters of ``[A-Za-z0-9._/@+=-]``, and never ``luo-meta``. That charset is
valid in both backends: systemd's FDNAME= allows at most 255 printable ASCII characters and no
``:`` (the separator of $LISTEN_FDNAMES); newlines and ``=``-less oddities would also break the
notify message. ``luo-meta`` is the name the systemd backend stores the metadata under.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from luo.abi import STORE_META_NAME
from luo.errors import LuoError

KEY_RE = re.compile(r"[A-Za-z0-9._/@+=-]{1,200}")
MAX_KEY = 200
MAX_META = 64 << 20  # "a few MiB" with a wide margin; a bigger claim is refused, never allocated
BATCH = 253  # SCM_MAX_FD: the kernel's limit of fds per SCM_RIGHTS message


def validate_key(key: object) -> str:
    """The key itself, or LuoError(EINVAL) saying what is wrong with it."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        shown = repr(key)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise LuoError(errno.EINVAL, f"fd store key {shown}: must be 1 to {MAX_KEY} characters of "
                       "A-Z a-z 0-9 . _ / @ + = -")
    if key == STORE_META_NAME:
        raise LuoError(errno.EINVAL, f"fd store key {key!r} is reserved for the metadata")
    return key


@runtime_checkable
class FdStore(Protocol):
    """Where luod mirrors its preserved fds. Calls are synchronous: a call that returns without an
    error has taken effect (keeper) or was handed to the service manager (systemd, which never
    answers). Not thread-safe: one caller at a time."""

    kind: str  # "keeper" | "systemd"

    def put(self, key: str, fd: int) -> None:
        """Store a duplicate of ``fd`` under ``key``, replacing what the key held. The caller keeps
        ``fd``."""
        ...

    def put_many(self, items: Iterable[tuple[str, int]]) -> None:
        """put() for many keys, in batches of up to 253 fds per message."""
        ...

    def drop(self, keys: Iterable[str]) -> None:
        """Forget these keys, closing the store's copies. Unknown keys are ignored."""
        ...

    def set_meta(self, meta: bytes) -> None:
        """Replace the metadata blob (at most MAX_META bytes)."""
        ...

    def load(self) -> tuple[bytes | None, dict[str, int]]:
        """The metadata (None if never set) and ``{key: fd}``; each fd is new and the caller's."""
        ...

    def close(self) -> None: ...


def choose_backend(env: Mapping[str, str] | None = None) -> str:
    """``"systemd"`` or ``"keeper"``, by the rule in this module's docstring."""
    env = os.environ if env is None else env
    want = env.get("LUO_FDSTORE", "")
    if want == "keeper":
        return "keeper"
    if want == "systemd":
        if not env.get("NOTIFY_SOCKET"):
            raise LuoError(errno.EINVAL, "LUO_FDSTORE=systemd, but NOTIFY_SOCKET is not set (not run by systemd)")
        return "systemd"
    if want:
        raise LuoError(errno.EINVAL, f"LUO_FDSTORE={want!r}: must be 'keeper' or 'systemd' (or unset)")
    try:
        fdstore_max = int(env.get("FDSTORE", "0"))
    except ValueError:
        fdstore_max = 0
    return "systemd" if env.get("NOTIFY_SOCKET") and fdstore_max > 0 else "keeper"


def open_store(runtime_root: Path, *, timeout: float = 10.0) -> FdStore:
    """The fd store for the host on ``runtime_root``: systemd's, or the keeper's, starting a keeper
    if none runs (waiting up to ``timeout`` seconds for it to listen)."""
    if choose_backend() == "systemd":
        from luo.keeper.systemd import SystemdStore

        return SystemdStore()
    from luo.keeper.client import KeeperStore

    return KeeperStore(Path(runtime_root), timeout=timeout)
