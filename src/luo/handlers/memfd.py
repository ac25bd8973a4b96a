"""``memfd-v1``: preserve a memfd (a VM's guest RAM) in place, its size frozen from preserve on.

What crosses: the very same open file description. The host keeps the fd and hands it to the
successor by SCM_RIGHTS, so contents, size and file position cross without a copy — the pages
never move.

Any memfd is accepted, with or without MFD_ALLOW_SEALING, as the kernel's memfd-v1 accepts any
(its selftests make theirs with ``memfd_create(name, 0)``). No seal is added: seals are
permanent, and upstream a memfd whose preservation is cancelled or unpreserved may grow again.
Seals a memfd already had are kept (they were its owner's choice) and shown.

The size is frozen by bookkeeping instead: recorded at preserve (the u64 data), checked at
prepare and at freeze (a change refuses the update with ``EIO`` naming the file), and checked
again at retrieve. Under ``luo run`` the supervisor refuses ``ftruncate``/``fallocate`` on a
preserved memfd with EPERM, as the kernel does from preserve until finish (it asks the host,
op ``preserved_size``, which answers from ``recorded_size``).

Where it still differs from the kernel:

- outside ``luo run`` a truncate, a growing write or an fallocate succeeds; a size change is
  caught only at prepare/freeze (the update is refused, nothing is frozen) or at retrieve.
  Writes that grow the file are never stopped (the kernel refuses them with EPERM);
- the successor gets the same open file (same inode and description, seals included), not a
  new unsealed file; holes are not filled at preserve (nothing is freed across a userspace
  update, so there is nothing to pin).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from luo.abi import MEMFD_COMPATIBLE
from luo.core.participants import FileHandler, IncomingFile, PreservedFile
from luo.errors import LuoError
from luo.handlers.inode import inode_of

_LINK_PREFIX = "/memfd:"
_LINK_SUFFIX = " (deleted)"
_SEAL_NAMES = (
    (fcntl.F_SEAL_SEAL, "seal"),
    (fcntl.F_SEAL_SHRINK, "shrink"),
    (fcntl.F_SEAL_GROW, "grow"),
    (fcntl.F_SEAL_WRITE, "write"),
    (0x0010, "future-write"),  # F_SEAL_FUTURE_WRITE (Linux 5.1), not in Python's fcntl
)


def _link(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def is_memfd(fd: int) -> bool:
    """A memfd (shmem or hugetlb): its /proc link reads ``/memfd:NAME (deleted)``, it is a regular
    file, and it answers F_GET_SEALS. Never raises."""
    try:
        return (
            _link(fd).startswith(_LINK_PREFIX)
            and stat.S_ISREG(os.fstat(fd).st_mode)
            and fcntl.fcntl(fd, fcntl.F_GET_SEALS) >= 0
        )
    except OSError:
        return False


def memfd_name(fd: int) -> str:
    """The name given to memfd_create (without the ``memfd:`` prefix)."""
    # Names are bytes chosen by whoever created the memfd: show undecodable ones escaped.
    link = os.fsencode(_link(fd)).decode("utf-8", "backslashreplace")
    if not link.startswith(_LINK_PREFIX):
        raise LuoError(errno.EINVAL, f"fd {fd} is not a memfd (it is {link!r}).")
    name = link[len(_LINK_PREFIX) :]
    return name[: -len(_LINK_SUFFIX)] if name.endswith(_LINK_SUFFIX) else name


def memfd_size(fd: int) -> int:
    return os.fstat(fd).st_size


def memfd_seals(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)


def seal_names(seals: int) -> list[str]:
    return [name for bit, name in _SEAL_NAMES if seals & bit]


class MemfdHandler(FileHandler):
    """Preserves memfds; the u64 data is the size recorded at preserve time."""

    compatible = MEMFD_COMPATIBLE

    def can_preserve(self, fd: int) -> bool:
        return is_memfd(fd)

    def identity(self, fd: int) -> tuple[int, int]:
        """The memfd's inode: one memfd is preserved once (v7.2, EBUSY), however it was dup'ed."""
        return inode_of(fd)

    def recorded_size(self, data: int) -> int:
        return data

    def preserve(self, pf: PreservedFile) -> int:
        """Record the size; no seal is added (see the module docstring)."""
        return memfd_size(pf.fd)

    def prepare(self, pf: PreservedFile) -> int:
        return self._checked_size(pf, "prepare")

    def freeze(self, pf: PreservedFile) -> int:
        return self._checked_size(pf, "freeze")

    def _checked_size(self, pf: PreservedFile, step: str) -> int:
        """The size recorded at preserve, if the file still has it: a VM's RAM that changed size
        while preserved must not cross as if nothing happened."""
        size = memfd_size(pf.fd)
        if size != pf.data:
            where = f"session {pf.session!r}" if pf.session is not None else "the global table"
            raise LuoError(
                errno.EIO,
                f"memfd {_name_or_fd(pf.fd)} (token {pf.token}, {where}) is {size} bytes, but it was "
                f"{pf.data} when preserved; a preserved memfd must keep its size until finish "
                f"(refused at {step}; under `luo run` the truncate itself fails with EPERM).",
            )
        return size

    def unpreserve(self, pf: PreservedFile) -> None:
        """Nothing to undo: no seal was added, so the memfd may change size again."""

    def retrieve(self, inc: IncomingFile) -> int:
        if not is_memfd(inc.fd):
            raise LuoError(errno.EIO, f"token {inc.token}: the handed-over fd is no longer a memfd.")
        size = memfd_size(inc.fd)
        if size != inc.data:
            raise LuoError(
                errno.EIO, f"token {inc.token}: the memfd is {size} bytes, the handover says {inc.data}."
            )
        return os.dup(inc.fd)

    def finish(self, inc: IncomingFile, reclaimed: bool) -> None:
        """Nothing to do: once the host closes its fd, the pages go when no one else holds them."""

    def describe(self, fd: int) -> dict[str, str]:
        try:
            return {
                "size": str(memfd_size(fd)),
                "name": memfd_name(fd),
                "seals": ",".join(seal_names(memfd_seals(fd))),
            }
        except (OSError, LuoError):
            return {}


def _name_or_fd(fd: int) -> str:
    try:
        return repr(memfd_name(fd))
    except (OSError, LuoError):
        return f"fd {fd}"
