"""luo.handlers: the file handlers, one module per compatible string.

``default_handlers`` gives them in registration order: the first whose ``can_preserve`` accepts
an fd owns it; an fd none accepts (``/dev/null``, a regular file, a pipe) is refused by the core
with ENOENT, as the kernel refuses it.
"""

from __future__ import annotations

from luo.core.participants import FileHandler
from luo.handlers.listen_socket import SOCKET_LISTEN_COMPATIBLE, ListenSocketHandler
from luo.handlers.memfd import MEMFD_COMPATIBLE, MemfdHandler, memfd_name, memfd_size


def default_handlers() -> list[FileHandler]:
    return [MemfdHandler(), ListenSocketHandler()]


__all__ = [
    "MEMFD_COMPATIBLE",
    "SOCKET_LISTEN_COMPATIBLE",
    "ListenSocketHandler",
    "MemfdHandler",
    "default_handlers",
    "memfd_name",
    "memfd_size",
]
