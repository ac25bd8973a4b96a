"""Calling participants: ordered callbacks, error conversion, u64 checks.

Participants are code the core does not control. Whatever they raise, the caller of the core
must get a ``LuoError`` with an errno (the kernel returns -errno, never a crash), and callbacks
that must not fail (cancel, finish, unpreserve) must not stop the others: they are logged and
the walk goes on.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from luo.errors import LuoError

log = logging.getLogger("luo.core")

T = TypeVar("T")

U64_MAX = (1 << 64) - 1


def as_luo_error(exc: BaseException, who: str) -> LuoError:
    """The participant's own LuoError unchanged; an OSError keeps its errno; anything else is EIO."""
    if isinstance(exc, LuoError):
        return exc
    if isinstance(exc, OSError) and exc.errno:
        return LuoError(exc.errno, f"{who}: {exc.strerror or exc}")
    return LuoError(errno.EIO, f"{who} failed: {exc!r}")


def check_u64(value: object, who: str) -> int:
    """Participant data goes into an 8-byte FDT property: refuse anything else early."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise LuoError(errno.EINVAL, f"{who} returned {value!r}, not a u64")
    return value


def check_token(token: object) -> int:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= U64_MAX:
        raise LuoError(errno.EINVAL, f"token {token!r} is not a u64")
    return token


def guarded(call: Callable[[], T], who: str) -> T:
    """Run a participant callback that may fail; failures come out as LuoError."""
    try:
        return call()
    except Exception as exc:
        err = as_luo_error(exc, who)
        if err is exc:
            raise
        raise err from exc


def first_failure(
    items: Sequence[T], call: Callable[[T], None], who: Callable[[T], str], op: str = ""
) -> tuple[int, LuoError] | None:
    """Call ``call`` on each item in order; stop at the first failure and say where and why."""
    for index, item in enumerate(items):
        try:
            call(item)
        except Exception as exc:
            err = as_luo_error(exc, who(item))
            if err is not exc:
                err.__cause__ = exc
            log.warning("%s %s failed: %s", who(item), op, err)
            return index, err
    return None


def must_not_fail(items: Iterable[T], call: Callable[[T], None], who: Callable[[T], str]) -> None:
    """Call ``call`` on every item; a failure is logged and the others still run."""
    for item in items:
        try:
            call(item)
        except Exception:
            log.exception("%s raised in a callback that must not fail; continuing", who(item))
