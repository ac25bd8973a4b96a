"""The record the successor receives: built from the frozen outgoing state, with no I/O.

Each ``FileRecord.meta`` holds the handler's ``describe(fd)`` facts (e.g. a memfd's ``name`` and
``size``), the owner (``pid``, ``uid``, ``comm``) and, for session files, ``session``; the
successor shows them in status and the host names preserved memory with ``name``.

``fd_index`` numbers the fds in the order they are listed here (global table by token, then
sessions in creation order, each in preservation order); the host sends that array next to the
tree (SCM_RIGHTS) and ``luo.kho`` serializes the record.
"""

from __future__ import annotations

from collections.abc import Sequence

from luo.core.handover import FileRecord, LuoRecord, SessionRecord
from luo.core.participants import FileHandler, Owner, PreservedFile
from luo.core.registry import SubsystemSlot
from luo.core.session import OutgoingSession


def safe_describe(handler: FileHandler | None, fd: int) -> dict[str, str]:
    """``handler.describe(fd)`` as strings; a failing describe yields its error, never raises."""
    if handler is None:
        return {}
    try:
        return {str(k): str(v) for k, v in dict(handler.describe(fd)).items()}
    except Exception as exc:
        return {"describe_error": repr(exc)}


def owner_meta(owner: Owner) -> dict[str, str]:
    """The owner as record meta. ``program`` only when the client gave one, so that records of
    clients that do not are what they were before it existed."""
    meta = {"pid": str(owner.pid), "uid": str(owner.uid), "comm": owner.comm}
    if owner.program:
        meta["program"] = owner.program
    return meta


def owner_from_meta(meta: dict[str, str]) -> dict[str, object]:
    """The JSON form of an owner read back from a record's meta (status in the successor)."""

    def num(key: str) -> int:
        try:
            return int(meta.get(key, "0"))
        except ValueError:
            return 0

    out: dict[str, object] = {"pid": num("pid"), "uid": num("uid"), "comm": meta.get("comm", "")}
    if meta.get("program"):
        out["program"] = meta["program"]
    return out


def file_meta(pf: PreservedFile) -> dict[str, str]:
    """A file's record meta: the handler's facts (a memfd's name and size...) first; owner and
    session win on clashes. The facts are read once (at the first record: prepare, or the crash
    record right after preserve): from then on the file cannot change, and the freeze-time
    record is built inside the blackout."""
    if pf.facts is None:
        pf.facts = safe_describe(pf.handler, pf.fd)
    meta = dict(pf.facts)
    meta.update(owner_meta(pf.owner))
    if pf.session is not None:
        meta["session"] = pf.session
    return meta


def build_record(
    liveupdate_number: int,
    slots: Sequence[SubsystemSlot],
    global_files: Sequence[PreservedFile],
    sessions: Sequence[OutgoingSession],
) -> tuple[LuoRecord, list[int]]:
    fds: list[int] = []

    def record(pf: PreservedFile) -> FileRecord:
        meta = file_meta(pf)
        fds.append(pf.fd)
        return FileRecord(
            token=pf.token, compatible=pf.compatible, data=pf.data, fd_index=len(fds) - 1, meta=meta
        )

    files = tuple(record(pf) for pf in global_files)
    session_records = tuple(
        SessionRecord(
            name=s.name,
            files=tuple(record(pf) for pf in s.files.ordered()),
            meta=owner_meta(s.owner),
        )
        for s in sessions
    )
    rec = LuoRecord(
        liveupdate_number=liveupdate_number,
        subsystems={slot.name: slot.data for slot in slots},
        files=files,
        sessions=session_records,
    )
    return rec, fds
