"""systemd's notify protocol, so luod can run as a ``Type=notify`` service across updates.

An update replaces the service's main process. The successor tells systemd its pid
(``MAINPID=``, which needs ``NotifyAccess=all``) before the old host exits, so systemd never sees
the service's main process die. See contrib/luod.service.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``lines`` to $NOTIFY_SOCKET; False when not run by systemd (or it is unreachable)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError:
        return False
