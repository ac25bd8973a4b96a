"""A deadline on every call into an in-host participant (file handlers, subsystems).

A participant runs inside luod, so one that never returns would take the whole host with it:
the update, every client, every VM's next update. Each callback therefore runs under a timer
(``LUO_PARTICIPANT_TIMEOUT``, default 30 s); at expiry a signal handler raises ``ETIMEDOUT`` inside
the callback, and the core treats it as that participant's failure (rollback in the reference's
order; a cancel or finish that times out is logged and the others still run). This works for
callbacks that wait in Python (sleep, select, a lock, a loop), which is what luo's participants
do; a callback stuck inside one C call returns to Python before the exception can land.

luod is single-threaded and the timer is process-wide (``ITIMER_REAL``): deadlines do not nest,
and only the main thread may arm one.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from luo.core.participants import FileHandler, IncomingFile, PreservedFile, Subsystem
from luo.errors import LuoError
from luo.host.faults import participant_timeout

T = TypeVar("T")


class ParticipantTimeout(LuoError):
    pass


@contextmanager
def deadline(seconds: float, who: str) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise ParticipantTimeout(errno.ETIMEDOUT, f"{who} did not return within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _timed(call: Callable[[], T], who: str) -> T:
    with deadline(participant_timeout(), who):
        return call()


class TimedHandler(FileHandler):
    """A file handler whose every callback runs under a deadline."""

    def __init__(self, inner: FileHandler) -> None:
        self.inner = inner
        self.compatible = inner.compatible

    def _who(self, op: str) -> str:
        return f"handler {self.compatible} {op}"

    def can_preserve(self, fd: int) -> bool:
        return _timed(lambda: self.inner.can_preserve(fd), self._who("can_preserve"))

    def identity(self, fd: int) -> Hashable | None:
        return _timed(lambda: self.inner.identity(fd), self._who("identity"))

    def recorded_size(self, data: int) -> int | None:
        return self.inner.recorded_size(data)  # arithmetic on the handler's data: nothing to wait for

    def preserve(self, pf: PreservedFile) -> int:
        return _timed(lambda: self.inner.preserve(pf), self._who("preserve"))

    def unpreserve(self, pf: PreservedFile) -> None:
        _timed(lambda: self.inner.unpreserve(pf), self._who("unpreserve"))

    def prepare(self, pf: PreservedFile) -> int:
        return _timed(lambda: self.inner.prepare(pf), self._who("prepare"))

    def freeze(self, pf: PreservedFile) -> int:
        return _timed(lambda: self.inner.freeze(pf), self._who("freeze"))

    def cancel(self, pf: PreservedFile) -> None:
        _timed(lambda: self.inner.cancel(pf), self._who("cancel"))

    def retrieve(self, inc: IncomingFile) -> int:
        return _timed(lambda: self.inner.retrieve(inc), self._who("retrieve"))

    def can_finish(self, inc: IncomingFile) -> bool:
        return _timed(lambda: self.inner.can_finish(inc), self._who("can_finish"))

    def finish(self, inc: IncomingFile, reclaimed: bool) -> None:
        _timed(lambda: self.inner.finish(inc, reclaimed), self._who("finish"))

    def describe(self, fd: int) -> dict[str, str]:
        return _timed(lambda: self.inner.describe(fd), self._who("describe"))


class TimedSubsystem(Subsystem):
    """A subsystem whose every callback runs under a deadline."""

    def __init__(self, inner: Subsystem, timeout: float | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.timeout = timeout

    def _timed(self, call: Callable[[], T], op: str) -> T:
        with deadline(self.timeout or participant_timeout(), f"subsystem {self.name} {op}"):
            return call()

    def prepare(self) -> int:
        return self._timed(self.inner.prepare, "prepare")

    def freeze(self, data: int) -> int:
        return self._timed(lambda: self.inner.freeze(data), "freeze")

    def cancel(self, data: int) -> None:
        self._timed(lambda: self.inner.cancel(data), "cancel")

    def finish(self, data: int) -> None:
        self._timed(lambda: self.inner.finish(data), "finish")
