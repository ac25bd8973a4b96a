"""The rules a handover must follow, checked on both sides.

``build_tree`` checks them before writing so the host never emits a tree its successor would
refuse after the pause; ``parse_tree`` checks them again because the blob it reads is untrusted.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from luo.core.handover import FileRecord, LuoRecord, MemoryRange, SessionRecord
from luo.core.participants import COMPATIBLE_MAX, SESSION_NAME_MAX
from luo.errors import LuoError
from luo.kho.encoding import U32_MAX, U64_MAX, is_prop_name

FILE_PROPS = frozenset({"compatible", "data", "fd-index", "token"})
SESSION_PROPS = frozenset({"session-name"})
# Meta entries are stored as "meta,<key>" properties: they can never clash with a layout
# property, and never with "name", which dtc insists must equal the node's name.
META_PREFIX = "meta,"


def _bad(message: str) -> LuoError:
    return LuoError(errno.EINVAL, message)


def _check_int(value: object, limit: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise _bad(f"{what} must be an integer in 0..{limit:#x}, not {value!r}.")


def _check_text(value: object, what: str, *, max_bytes: int | None = None, empty_ok: bool = True) -> None:
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string, not {type(value).__name__}.")
    raw = value.encode("utf-8", "surrogatepass")
    if "\0" in value:
        raise _bad(f"{what} {value!r} contains a NUL byte.")
    if not empty_ok and not raw:
        raise _bad(f"{what} is empty.")
    if max_bytes is not None and len(raw) > max_bytes:
        raise _bad(f"{what} {value!r} is {len(raw)} bytes long; at most {max_bytes} are allowed.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{what} {value!r} is not valid UTF-8 text.") from e


def _check_meta(meta: object, where: str) -> None:
    if not isinstance(meta, dict):
        raise _bad(f"{where}: meta must be a dict of strings.")
    for key, value in meta.items():
        if not isinstance(key, str) or not is_prop_name(key):
            raise _bad(
                f"{where}: meta key {key!r} is not a valid property name (letters, digits, ',._+?#-')."
            )
        if not isinstance(value, str):
            raise _bad(f"{where}: meta {key!r} must be a string, not {type(value).__name__}.")
        # Values are for status only: build_tree writes odd ones escaped instead of refusing.


def _check_files(files: Sequence[FileRecord], where: str, fd_owner: dict[int, str]) -> None:
    tokens: set[int] = set()
    for f in files:
        _check_int(f.token, U64_MAX, f"{where}: a file token")
        here = f"{where}, file token {f.token}"
        if f.token in tokens:
            raise _bad(f"{where}: token {f.token} appears twice.")
        tokens.add(f.token)
        _check_text(f.compatible, f"{here}: compatible", max_bytes=COMPATIBLE_MAX, empty_ok=False)
        _check_int(f.data, U64_MAX, f"{here}: data")
        _check_int(f.fd_index, U32_MAX, f"{here}: fd-index")
        if f.fd_index in fd_owner:
            raise _bad(f"{here}: fd-index {f.fd_index} is already used by {fd_owner[f.fd_index]}.")
        fd_owner[f.fd_index] = here
        _check_meta(f.meta, here)


def _check_session(s: SessionRecord, fd_owner: dict[int, str]) -> None:
    _check_text(s.name, "a session name", max_bytes=SESSION_NAME_MAX, empty_ok=False)
    where = f"session {s.name!r}"
    _check_files(s.files, where, fd_owner)
    _check_meta(s.meta, where)


def _check_fd_count(fd_index: int, fd_count: int | None, where: str) -> None:
    if fd_count is not None and fd_index >= fd_count:
        raise _bad(f"{where}: fd-index {fd_index} is out of range: only {fd_count} fds were handed over.")


def validate(luo: LuoRecord, memory: Sequence[MemoryRange], fd_count: int | None = None) -> None:
    """Raise LuoError(EINVAL) naming the first rule ``luo``/``memory`` break; return if none."""
    _check_int(luo.liveupdate_number, U64_MAX, "liveupdate-number")
    for name, data in luo.subsystems.items():
        if not isinstance(name, str) or not is_prop_name(name) or name == "compatible":
            raise _bad(f"subsystem name {name!r} is not a valid property name (letters, digits, ',._+?#-').")
        _check_int(data, U64_MAX, f"subsystem {name!r} data")
    fd_owner: dict[int, str] = {}
    _check_files(luo.files, "the global file table", fd_owner)
    names: set[str] = set()
    for s in luo.sessions:
        _check_session(s, fd_owner)
        if s.name in names:
            raise _bad(f"session {s.name!r} appears twice.")
        names.add(s.name)
    for f in luo.all_files():
        _check_fd_count(f.fd_index, fd_count, f"file token {f.token} ({f.compatible})")
    seen: set[int] = set()
    for m in memory:
        _check_int(m.fd_index, U32_MAX, "a preserved memory range's fd-index")
        where = f"preserved memory range mem@{m.fd_index}"
        if m.fd_index in seen:
            raise _bad(f"{where} appears twice.")
        seen.add(m.fd_index)
        _check_int(m.size, U64_MAX, f"{where}: size")
        _check_text(m.name, f"{where}: name")
        _check_fd_count(m.fd_index, fd_count, where)
