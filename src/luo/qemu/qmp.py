"""A QMP client: QEMU's JSON monitor on a Unix socket, one command at a time, events kept.

QEMU is another process: every line it sends is checked (JSON, an object, bounded) before it is
used, and a malformed one is an EPROTO error, never a crash. Commands carry an ``id`` so that an
answer is never taken for another command's; events that arrive meanwhile are kept, with QEMU's
own timestamp, for ``wait_event`` and the blackout accounting (the STOP and RESUME events).
"""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from luo.errors import LuoError

MAX_LINE = 1 << 20  # QMP answers here are a few KiB; a status of a big machine well under this


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]
    wall_ns: int  # QEMU's timestamp (gettimeofday)
    mono_ns: int  # when we read it (CLOCK_MONOTONIC), for ordering on our clock


class QmpError(LuoError):
    """QEMU refused a command (its error class and description)."""

    def __init__(self, command: str, klass: str, desc: str) -> None:
        super().__init__(errno.EIO, f"QEMU refused {command}: {klass}: {desc}")
        self.klass = klass


class Qmp:
    def __init__(self, path: str, timeout: float = 10.0, gone: Callable[[], bool] = lambda: False) -> None:
        """``gone``: whether the QEMU that should listen has exited (then no use waiting)."""
        self.path = path
        self.sock = _connect(path, timeout, gone)
        self._buf = b""
        self._next_id = 0
        self.events: list[Event] = []
        greeting = self._read(timeout)
        if "QMP" not in greeting:
            self.close()
            raise LuoError(errno.EPROTO, f"QMP at {path}: no greeting ({_show(greeting)})")
        self.version = greeting["QMP"].get("version", {}) if isinstance(greeting["QMP"], dict) else {}
        self.execute("qmp_capabilities", timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one command; its ``return`` value, or QmpError."""
        self._next_id += 1
        ident = f"luo-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise LuoError(errno.EPIPE, f"QMP {command}: QEMU is gone ({e.strerror})") from None
        deadline = time.monotonic() + timeout
        while True:
            got = self._read(max(0.0, deadline - time.monotonic()), command)
            if got.get("id") != ident:
                continue  # an event (kept by _read) or a stale answer
            if "error" in got:
                err = got["error"] if isinstance(got["error"], dict) else {}
                raise QmpError(command, str(err.get("class", "?")), str(err.get("desc", ""))[:500])
            return got.get("return")

    def wait_event(self, name: str, timeout: float, since: int = 0) -> Event:
        """The first event ``name`` kept at index >= ``since`` (reading more until ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events[since:]:
                if e.name == name:
                    return e
            since = len(self.events)
            self._read(max(0.0, deadline - time.monotonic()), f"event {name}")

    def _read(self, timeout: float, what: str = "greeting") -> dict[str, Any]:
        """The next JSON object QEMU sends; events are kept as they pass."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise LuoError(errno.EPROTO, f"QMP at {self.path}: a line longer than {MAX_LINE} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LuoError(errno.ETIMEDOUT, f"QMP at {self.path}: no answer to {what} in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise LuoError(errno.EPIPE, f"QMP at {self.path}: {e.strerror}") from None
            if not chunk:
                raise LuoError(errno.EPIPE, f"QMP at {self.path}: QEMU closed the monitor ({what})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise LuoError(errno.EPROTO, f"QMP at {self.path}: not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise LuoError(errno.EPROTO, f"QMP at {self.path}: not an object: {_show(msg)}")
        if isinstance(msg.get("event"), str):
            ts = msg.get("timestamp") if isinstance(msg.get("timestamp"), dict) else {}
            sec, usec = ts.get("seconds", 0), ts.get("microseconds", 0)
            wall = int(sec) * 1_000_000_000 + int(usec) * 1000 if isinstance(sec, int) and isinstance(usec, int) else 0
            data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
            self.events.append(Event(msg["event"], data, wall, time.monotonic_ns()))
        return msg


def _connect(path: str, timeout: float, gone: Callable[[], bool]) -> socket.socket:
    """QEMU creates its monitor socket a moment after it starts: retry until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            if gone():
                raise LuoError(errno.ESRCH, f"QMP at {path}: QEMU exited before it listened") from None
            if time.monotonic() >= deadline:
                raise LuoError(errno.ETIMEDOUT, f"QMP at {path}: QEMU did not listen within {timeout:g} s "
                               f"({e.strerror})") from None
            time.sleep(0.01)  # waiting on another process to create a file: nothing to block on


def _show(v: object) -> str:
    return repr(v)[:200]
