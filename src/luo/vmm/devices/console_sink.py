"""Where complete console lines go.

A sink only ever sees whole lines: partial lines stay in the device (and in its saved state), so
an old and a new VMM appending to the same O_APPEND log in turn never split a line.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable
from typing import Protocol, TextIO


class ConsoleSink(Protocol):
    def write_line(self, line: str) -> None: ...


class FileConsoleSink:
    """Appends each line with one write(2) on an O_APPEND fd, so several VMMs can share the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def write_line(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode("utf-8", "replace"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StreamConsoleSink:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def write_line(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class MemoryConsoleSink:
    """Keeps lines in memory; ``wait_for`` blocks on a condition until a line matches (for tests)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def write_line(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def wait_for(self, pattern: str | Callable[[str], bool], timeout: float, start: int = 0) -> str | None:
        """The first line (from index ``start``) matching a regex or predicate, or None on timeout."""
        pred = (lambda s: re.search(pattern, s) is not None) if isinstance(pattern, str) else pattern
        found: list[str] = []

        def check() -> bool:
            for ln in self.lines[start:]:
                if pred(ln):
                    found.append(ln)
                    return True
            return False

        with self._cond:
            self._cond.wait_for(check, timeout)
        return found[0] if found else None


class TeeConsoleSink:
    def __init__(self, *sinks: ConsoleSink) -> None:
        self.sinks = sinks

    def write_line(self, line: str) -> None:
        for s in self.sinks:
            s.write_line(line)
