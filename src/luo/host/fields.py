"""Typed checks for the fields of a control request, each refusal an EINVAL that names the field.

Whatever arrives on the control socket comes from another process: buggy, old, or hostile. An op
reads every field through these functions *before* it changes anything, so that a wrong type or an
absurd value is refused at the door with a sentence the caller can act on, instead of surfacing
later as a TypeError deep in the orchestrator (an EIO), a NaN timeout that freezes an update and
only then rolls it back, or ``true`` silently taken for the integer 1 (JSON's booleans are Python
``bool``, a subclass of ``int``).

Conventions: a field that is absent or ``null`` takes its ``default``; without a default it is
required. Errors read ``"<field>: <sentence>"``. Values are quoted through :func:`show`, which is
bounded, so an error reply never echoes a megabyte string or a 5,000-digit integer back.
"""

from __future__ import annotations

import enum
import errno
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, overload

from luo.errors import LuoError

U64_MAX = (1 << 64) - 1
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit
SHOW_MAX = 40  # characters of a string quoted in an error


class _Required(enum.Enum):
    """The default of a field that has none: absent or null is refused."""

    REQUIRED = 0


REQUIRED = _Required.REQUIRED
D = TypeVar("D")


def refuse(key: str, sentence: str) -> LuoError:
    """The one shape of every refusal: EINVAL, field name first."""
    return LuoError(errno.EINVAL, f"{key}: {sentence}")


def show(value: object) -> str:
    """A short description of a JSON value for an error message, bounded whatever the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 64:
            return f"an integer of {value.bit_length()} bits"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        head = value[:SHOW_MAX]
        return f"the string {head!r}" + ("..." if len(value) > SHOW_MAX else "")
    if isinstance(value, Mapping):
        return f"an object of {len(value)} keys"
    if isinstance(value, Sequence):
        return f"a list of {len(value)} items"
    return f"a {type(value).__name__}"


def _get(msg: Mapping[str, Any], key: str, default: object) -> tuple[Any, bool]:
    """(value, True) when the field is present and not null; (default, False) otherwise."""
    value = msg.get(key)
    if value is None:
        if default is REQUIRED:
            raise refuse(key, "required")
        return default, False
    return value, True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- numbers --------------------------------------------------------------------------------


@overload
def integer(msg: Mapping[str, Any], key: str, lo: int, hi: int) -> int: ...
@overload
def integer(msg: Mapping[str, Any], key: str, lo: int, hi: int, default: D) -> int | D: ...
def integer(msg: Mapping[str, Any], key: str, lo: int, hi: int, default: object = REQUIRED) -> object:
    """An integer in [lo, hi]; ``true``/``false`` and ``1.0`` are not integers."""
    value, present = _get(msg, key, default)
    if not present:
        return value
    if not _is_int(value):
        raise refuse(key, f"must be an integer from {lo} to {hi}, not {show(value)}")
    if not lo <= value <= hi:
        raise refuse(key, f"must be from {lo} to {hi}, not {show(value)}")
    return value


@overload
def u64(msg: Mapping[str, Any], key: str) -> int: ...
@overload
def u64(msg: Mapping[str, Any], key: str, default: D) -> int | D: ...
def u64(msg: Mapping[str, Any], key: str, default: object = REQUIRED) -> object:
    """An unsigned 64-bit integer: what a token or a count is in the kernel's UAPI structs."""
    value, present = _get(msg, key, default)
    if not present:
        return value
    if not _is_int(value) or not 0 <= value <= U64_MAX:
        raise refuse(key, f"must be an unsigned 64-bit integer, not {show(value)}")
    return value


@overload
def finite(msg: Mapping[str, Any], key: str, lo: float, hi: float) -> float: ...
@overload
def finite(msg: Mapping[str, Any], key: str, lo: float, hi: float, default: D) -> float | D: ...
def finite(msg: Mapping[str, Any], key: str, lo: float, hi: float, default: object = REQUIRED) -> object:
    """A finite number in (lo, hi] — lo excluded, since a timeout of 0 is as useless as one of NaN.

    NaN compares false with everything, so a range check alone would let it through; infinity
    would make a deadline that never comes."""
    value, present = _get(msg, key, default)
    if not present:
        return value
    if not (_is_int(value) or isinstance(value, float)):
        raise refuse(key, f"must be a number in ({lo:g}, {hi:g}], not {show(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise refuse(key, f"must be a number in ({lo:g}, {hi:g}], not {show(value)}") from None
    if not math.isfinite(number) or not lo < number <= hi:
        raise refuse(key, f"must be a finite number in ({lo:g}, {hi:g}], not {show(value)}")
    return number


_SIZE = re.compile(r"\s*(\d{1,16}(?:\.\d{1,9})?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(key: str, value: object) -> int:
    """Bytes from an integer or a size string as ``luo vm start --mem`` takes it (``256M``, ``1.5GiB``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m and (m.group(2) or "." not in m.group(1)):  # a fraction of a byte is not a size
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise refuse(key, f"must be a size in bytes or a string such as '256M', not {show(value)}")


@overload
def size(msg: Mapping[str, Any], key: str, lo: int, hi: int) -> int: ...
@overload
def size(msg: Mapping[str, Any], key: str, lo: int, hi: int, default: D) -> int | D: ...
def size(msg: Mapping[str, Any], key: str, lo: int, hi: int, default: object = REQUIRED) -> object:
    """A size (see :func:`parse_size`) from ``lo`` to ``hi`` bytes."""
    value, present = _get(msg, key, default)
    if not present:
        return value
    n = parse_size(key, value)
    if not lo <= n <= hi:
        raise refuse(key, f"must be from {_human(lo)} to {_human(hi)}, not {show(value)}")
    return n


def _human(n: int) -> str:
    for unit in "TGMK":
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


@overload
def boolean(msg: Mapping[str, Any], key: str) -> bool: ...
@overload
def boolean(msg: Mapping[str, Any], key: str, default: D) -> bool | D: ...
def boolean(msg: Mapping[str, Any], key: str, default: object = REQUIRED) -> object:
    """``true`` or ``false``; 0 and 1 are numbers, not booleans."""
    value, present = _get(msg, key, default)
    if present and not isinstance(value, bool):
        raise refuse(key, f"must be true or false, not {show(value)}")
    return value


# -- strings --------------------------------------------------------------------------------


def check_text(key: str, value: object, max_len: int) -> str:
    """A string of at most ``max_len`` UTF-8 bytes, without NUL.

    Strings go into file names, argv and the KHO tree: a NUL or a lone surrogate (which JSON's
    ``\\ud800`` escapes can produce) would fail there with a ValueError instead of an EINVAL here."""
    if not isinstance(value, str):
        raise refuse(key, f"must be a string, not {show(value)}")
    if len(value) > max_len:  # cheap first: a character is at least one byte
        raise refuse(key, f"must be at most {max_len} bytes, not {len(value)} characters")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise refuse(key, "is not valid Unicode (a lone surrogate)") from None
    if size > max_len:
        raise refuse(key, f"must be at most {max_len} bytes of UTF-8, not {size}")
    if "\0" in value:
        raise refuse(key, "must not contain a NUL character")
    return value


@overload
def text(msg: Mapping[str, Any], key: str, max_len: int, *, pattern: re.Pattern[str] | None = None,
         rule: str = "") -> str: ...
@overload
def text(msg: Mapping[str, Any], key: str, max_len: int, default: D, *, pattern: re.Pattern[str] | None = None,
         rule: str = "") -> str | D: ...
def text(msg: Mapping[str, Any], key: str, max_len: int, default: object = REQUIRED, *,
         pattern: re.Pattern[str] | None = None, rule: str = "") -> object:
    """A bounded string (see :func:`check_text`), optionally matching ``pattern`` (``rule`` says how)."""
    value, present = _get(msg, key, default)
    if not present:
        return value
    value = check_text(key, value, max_len)
    if pattern is not None and not pattern.fullmatch(value):
        raise refuse(key, f"{show(value)} is not valid: {rule or 'it must match ' + pattern.pattern}")
    return value


@overload
def choice(msg: Mapping[str, Any], key: str, choices: Sequence[str]) -> str: ...
@overload
def choice(msg: Mapping[str, Any], key: str, choices: Sequence[str], default: D) -> str | D: ...
def choice(msg: Mapping[str, Any], key: str, choices: Sequence[str], default: object = REQUIRED) -> object:
    """One of a few words."""
    value, present = _get(msg, key, default)
    if present and (not isinstance(value, str) or value not in choices):
        raise refuse(key, f"must be {' or '.join(choices)}, not {show(value)}")
    return value


@overload
def str_list(msg: Mapping[str, Any], key: str, max_items: int, max_len: int) -> list[str]: ...
@overload
def str_list(msg: Mapping[str, Any], key: str, max_items: int, max_len: int, default: D) -> list[str] | D: ...
def str_list(msg: Mapping[str, Any], key: str, max_items: int, max_len: int, default: object = REQUIRED) -> object:
    """A list of at most ``max_items`` bounded strings."""
    value, present = _get(msg, key, default)
    if not present:
        return value
    if not isinstance(value, list):
        raise refuse(key, f"must be a list of strings, not {show(value)}")
    if len(value) > max_items:
        raise refuse(key, f"must have at most {max_items} items, not {len(value)}")
    return [check_text(f"{key}[{i}]", item, max_len) for i, item in enumerate(value)]


# -- objects --------------------------------------------------------------------------------


@overload
def mapping(msg: Mapping[str, Any], key: str, max_bytes: int) -> dict[str, Any]: ...
@overload
def mapping(msg: Mapping[str, Any], key: str, max_bytes: int, default: D) -> dict[str, Any] | D: ...
def mapping(msg: Mapping[str, Any], key: str, max_bytes: int, default: object = REQUIRED) -> object:
    """A JSON object of at most ``max_bytes`` once encoded: kept by the host and shown in its
    status, so its size is bounded like any string's. (Its depth already is: see wire.MAX_DEPTH.)"""
    value, present = _get(msg, key, default)
    if not present:
        return value
    if not isinstance(value, dict):
        raise refuse(key, f"must be an object, not {show(value)}")
    try:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    except (ValueError, TypeError, RecursionError):
        raise refuse(key, "cannot be encoded as JSON") from None
    if size > max_bytes:
        raise refuse(key, f"must be at most {max_bytes} bytes of JSON, not {size}")
    return dict(value)


# -- fds ------------------------------------------------------------------------------------


def no_fds(fds: Sequence[int], op: str) -> None:
    """An op that takes no fd refuses one, rather than silently dropping what the caller meant to pass.

    The loop closes the received fds whatever the op does."""
    if fds:
        raise LuoError(errno.EINVAL, f"fds: {op} takes no fd, {len(fds)} came with the request")


def fds_exactly(fds: Sequence[int], n: int, op: str) -> list[int]:
    """Exactly ``n`` fds (EBADF otherwise, as an ioctl given a bad fd argument)."""
    if len(fds) != n:
        raise LuoError(errno.EBADF, f"fds: {op} needs exactly {n} fd{'s' if n != 1 else ''}, got {len(fds)}")
    return list(fds)
