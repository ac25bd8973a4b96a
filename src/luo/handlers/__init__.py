"""luo.handlers: the file handlers, one module per compatible string (the strings: ``luo.abi``).

``default_handlers`` gives them in registration order: the first whose ``can_preserve`` accepts
an fd owns it; an fd none accepts (``/dev/null``, a regular file, a pipe) is refused by the core
with ENOENT, as the kernel refuses it.
"""

from __future__ import annotations

from luo.core.participants import FileHandler
from luo.handlers.listen_socket import ListenSocketHandler
from luo.handlers.memfd import MemfdHandler, memfd_name, memfd_size


def default_handlers() -> list[FileHandler]:
    return [MemfdHandler(), ListenSocketHandler()]


__all__ = [
    "ListenSocketHandler",
    "MemfdHandler",
    "default_handlers",
    "memfd_name",
    "memfd_size",
]
