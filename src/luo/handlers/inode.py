"""Which file an fd opens: ``(st_dev, st_ino)``, the identity luo's handlers give the core.

The host only ever holds dups of the fds its clients pass (SCM_RIGHTS), so two preserves of one
file arrive as two different fd numbers; the kernel compares ``struct file`` pointers, which a
userspace host cannot see. The inode is the closest thing it can: equal for every dup, every
SCM_RIGHTS copy and every reopen through ``/proc/PID/fd/N`` (where the kernel would see a second
struct file), and it is also what ``luo run`` has at hand (fstat) when it asks whether a file is
preserved.
"""

from __future__ import annotations

import errno
import os

from luo.errors import LuoError


def inode_of(fd: int) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of ``fd``; a closed fd is ``EBADF``."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise LuoError(e.errno or errno.EBADF, f"fd {fd}: {e.strerror}") from None
    return st.st_dev, st.st_ino
