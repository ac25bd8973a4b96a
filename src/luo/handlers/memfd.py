"""``memfd-v1``: preserve a memfd (a VM's guest RAM) in place, frozen in size.

What crosses: the very same open file description. The host keeps the fd and hands it to the
successor by SCM_RIGHTS, so contents, size and file position cross without a copy — the pages
never move. From preserve on, the size is frozen by the kernel itself with the seals
F_SEAL_SHRINK|F_SEAL_GROW: truncate, growing writes and growing fallocate fail with EPERM, as the
kernel's memfd-v1 makes them fail between preserve and finish, while reads and writes inside the
size keep working so the VM runs on.

How the restored file differs from the original: it *is* the original (same inode, same
description), and the size seals stay on for good — a seal can never be removed, so neither
unpreserve nor finish lifts them. Upstream, the successor gets a new, unsealed file instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from luo.core.participants import FileHandler, IncomingFile, PreservedFile
from luo.errors import LuoError

MEMFD_COMPATIBLE = "memfd-v1"
FREEZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
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


def freeze_size(fd: int) -> None:
    """Add F_SEAL_SHRINK|F_SEAL_GROW; already frozen is fine (a memfd restored by a previous
    update carries them). Raises LuoError(EPERM) for a memfd made without MFD_ALLOW_SEALING."""
    seals = memfd_seals(fd)
    if seals & FREEZE_SEALS == FREEZE_SEALS:
        return
    if seals & fcntl.F_SEAL_SEAL:
        raise LuoError(
            errno.EPERM,
            f"memfd {memfd_name(fd)!r} (fd {fd}) was created without MFD_ALLOW_SEALING (or is sealed "
            "against new seals), so its size cannot be frozen; create it with MFD_ALLOW_SEALING.",
        )
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, FREEZE_SEALS)
    except OSError as e:
        raise LuoError(
            e.errno or errno.EPERM, f"cannot freeze the size of memfd {memfd_name(fd)!r}: {e.strerror}."
        ) from e


class MemfdHandler(FileHandler):
    """Preserves memfds; the u64 data is the size, frozen at preserve time."""

    compatible = MEMFD_COMPATIBLE

    def can_preserve(self, fd: int) -> bool:
        return is_memfd(fd)

    def preserve(self, pf: PreservedFile) -> int:
        freeze_size(pf.fd)
        return memfd_size(pf.fd)

    def prepare(self, pf: PreservedFile) -> int:
        return self._checked_size(pf)

    def freeze(self, pf: PreservedFile) -> int:
        return self._checked_size(pf)

    def _checked_size(self, pf: PreservedFile) -> int:
        # The seals make a change impossible; checking costs one fstat and proves it.
        size = memfd_size(pf.fd)
        if size != pf.data:
            raise LuoError(
                errno.EIO, f"memfd token {pf.token} changed size from {pf.data} to {size} while preserved."
            )
        return size

    def unpreserve(self, pf: PreservedFile) -> None:
        """Nothing to undo that can be undone: seals are permanent, so the size stays frozen."""

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
