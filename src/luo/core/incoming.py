"""What the predecessor handed over, checked and laid out for the successor.

``load_incoming`` turns a ``LuoRecord`` and the fd array that came with it into tables the
orchestrator can serve restore/retrieve from. A malformed record is refused cleanly with
``-EINVAL`` (reviewers of the kernel series asked for a refusal instead of a panic); on refusal
nothing is taken, the caller still owns every fd.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field

from luo.core.calls import U64_MAX
from luo.core.filetable import IncomingFiles
from luo.core.handover import FileRecord, LuoRecord
from luo.core.participants import COMPATIBLE_MAX, IncomingFile, Owner
from luo.core.session import check_session_name
from luo.errors import LuoError


@dataclass
class IncomingSession:
    """A session the predecessor preserved, waiting to be retrieved by name."""

    name: str
    files: IncomingFiles
    meta: dict[str, str] = field(default_factory=dict)
    retrieved: bool = False
    gone: bool = False  # finished or discarded
    retrieved_by: Owner | None = None  # who retrieved it (status only; the owner is the predecessor's)


@dataclass
class IncomingState:
    liveupdate_number: int
    subsystems: dict[str, int]
    files: IncomingFiles
    sessions: dict[str, IncomingSession]  # record order
    unused_fds: list[int]  # fds no record points at: freed at once


def _bad(message: str) -> LuoError:
    return LuoError(errno.EINVAL, f"malformed incoming record: {message}")


def _u64(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise _bad(f"{what} is {value!r}, not a u64")
    return value


def load_incoming(record: LuoRecord, fds: Sequence[int]) -> IncomingState:
    _u64(record.liveupdate_number, "liveupdate-number")
    for name, data in record.subsystems.items():
        if not isinstance(name, str) or not name:
            raise _bad(f"subsystem name {name!r}")
        _u64(data, f"data of subsystem {name!r}")

    for fd in fds:
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise _bad(f"{fd!r} in the fd array is not a file descriptor")
    if len(set(fds)) != len(fds):
        raise _bad("the fd array holds the same fd twice")

    used: set[int] = set()

    def to_incoming(rec: FileRecord, session: str | None) -> IncomingFile:
        _u64(rec.token, "token")
        _u64(rec.data, f"data of token {rec.token}")
        if not isinstance(rec.compatible, str) or not rec.compatible or len(rec.compatible.encode()) > COMPATIBLE_MAX:
            raise _bad(f"compatible {rec.compatible!r} of token {rec.token}")
        if isinstance(rec.fd_index, bool) or not isinstance(rec.fd_index, int) or not 0 <= rec.fd_index < len(fds):
            raise _bad(f"token {rec.token} points at fd index {rec.fd_index} of {len(fds)}")
        if rec.fd_index in used:
            raise _bad(f"fd index {rec.fd_index} is claimed by two files")
        used.add(rec.fd_index)
        return IncomingFile(
            token=rec.token,
            compatible=rec.compatible,
            data=rec.data,
            fd=fds[rec.fd_index],
            session=session,
            meta=dict(rec.meta),
        )

    files = IncomingFiles("incoming global table")
    for rec in record.files:
        files.add(to_incoming(rec, None))

    sessions: dict[str, IncomingSession] = {}
    for srec in record.sessions:
        try:
            check_session_name(srec.name)
        except LuoError as err:
            raise _bad(err.message) from None
        if srec.name in sessions:
            raise _bad(f"session {srec.name!r} appears twice")
        table = IncomingFiles(f"incoming session {srec.name!r}")
        for rec in srec.files:
            table.add(to_incoming(rec, srec.name))
        sessions[srec.name] = IncomingSession(srec.name, table, dict(srec.meta))

    unused = [fd for i, fd in enumerate(fds) if i not in used]
    return IncomingState(
        liveupdate_number=record.liveupdate_number,
        subsystems=dict(record.subsystems),
        files=files,
        sessions=sessions,
        unused_fds=unused,
    )
