"""A connection to the host's control socket that survives the host being replaced.

During an update the listening socket itself is handed to the successor, so a connect() made
while the update runs is queued and later accepted by the new host. An established connection
to the old host ends when it exits; the next call reconnects. A request whose connection
breaks before any reply is retried once on a fresh connection: the host handles a request and
replies in one step of its loop and only exits between steps, so an unanswered request was
never handled.

Because the listening socket outlives every host of an update, a missing socket file (ENOENT)
or a refused connect (ECONNREFUSED: a socket file nobody listens on any more) means that no
host runs at all: libluo says so at once (ECONNREFUSED) instead of waiting. The waiting an
update needs is the kernel's accept queue, and the reconnect after a handover is the one retry
above. Only a caller that knows a host is being started (a test harness, a VMM re-attaching
after its host died) passes a ``timeout`` to wait for one to appear.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path
from typing import Any

from luo.errors import LuoError
from luo.host.runtime import DEFAULT_RUNTIME_DIR, RuntimeDir, resolve_runtime_dir
from luo.host.wire import raise_for, recv_msg, send_msg


def no_host(path: Path, why: str) -> LuoError:
    """ECONNREFUSED with a sentence an operator can act on: which socket, and how to start a host."""
    start = "luo host" if path.parent == Path(DEFAULT_RUNTIME_DIR) else f"luo --runtime-dir {path.parent} host"
    return LuoError(errno.ECONNREFUSED, f"no luo host listens on {path} ({why}); start one with `{start}`")


def open_socket(path: Path, timeout: float = 0.0) -> socket.socket:
    """Connect to the host's control socket.

    No host (no socket file, or a refused connect) raises ECONNREFUSED at once, unless
    ``timeout`` > 0: then the file is polled for up to ``timeout`` seconds, for a caller that
    knows a host is starting (there is no event to wait on for a file to appear). A connect
    during an update is queued, never refused, so it needs no timeout.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            left = deadline - time.monotonic()
            if left <= 0:
                why = "no socket file" if isinstance(e, FileNotFoundError) else "a stale socket file: connection refused"
                raise no_host(path, why) from None
        except PermissionError:
            s.close()
            raise LuoError(errno.EACCES, f"not allowed to connect to {path} (root or the host's user only)") from None
        time.sleep(min(delay, left))  # polling for a host to appear: there is no event to wait on
        delay = min(delay * 2, 0.1)


class Connection:
    """libluo's connection. ``timeout``: seconds to wait for a host to appear when (re)connecting;
    0 (the default) fails at once when none listens."""

    def __init__(self, runtime_dir: str | os.PathLike[str] | None = None, timeout: float = 0.0) -> None:
        self.runtime = RuntimeDir(resolve_runtime_dir(str(runtime_dir) if runtime_dir else None))
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def _ensure(self) -> socket.socket:
        if self._sock is None:
            self._sock = open_socket(self.runtime.socket, self.timeout)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = (), *, retry: bool = True,
             timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        for attempt in (0, 1):
            sock = self._ensure()
            try:
                if timeout is not None:  # (a blocking socket needs no call: two fcntls saved per request)
                    sock.settimeout(timeout)
                send_msg(sock, msg, fds)
                got = recv_msg(sock)
            except (BrokenPipeError, ConnectionResetError):
                got = None
            except TimeoutError:
                self.close()
                raise LuoError(errno.ETIMEDOUT, f"the luo host did not answer {msg.get('op')!r} in time") from None
            finally:
                if self._sock is not None and timeout is not None:
                    self._sock.settimeout(None)
            if got is not None:
                reply, rfds = got
                try:
                    raise_for(reply)
                except LuoError:
                    for fd in rfds:
                        os.close(fd)
                    raise
                return reply, rfds
            self.close()
            if not retry or attempt:
                raise LuoError(errno.ECONNRESET, f"the luo host went away during {msg.get('op')!r}")
        raise AssertionError("unreachable")
