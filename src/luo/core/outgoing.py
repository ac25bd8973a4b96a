"""The record the successor receives: built from the frozen outgoing state, with no I/O.

``fd_index`` numbers the fds in the order they are listed here (global table by token, then
sessions in creation order, each in preservation order); the host sends that array next to the
tree (SCM_RIGHTS) and ``luo.kho`` serializes the record.
"""

from __future__ import annotations

from collections.abc import Sequence

from luo.core.handover import FileRecord, LuoRecord, SessionRecord
from luo.core.participants import Owner, PreservedFile
from luo.core.registry import SubsystemSlot
from luo.core.session import OutgoingSession


def owner_meta(owner: Owner) -> dict[str, str]:
    return {"pid": str(owner.pid), "uid": str(owner.uid), "comm": owner.comm}


def owner_from_meta(meta: dict[str, str]) -> dict[str, object]:
    """The JSON form of an owner read back from a record's meta (status in the successor)."""

    def num(key: str) -> int:
        try:
            return int(meta.get(key, "0"))
        except ValueError:
            return 0

    return {"pid": num("pid"), "uid": num("uid"), "comm": meta.get("comm", "")}


def build_record(
    liveupdate_number: int,
    slots: Sequence[SubsystemSlot],
    global_files: Sequence[PreservedFile],
    sessions: Sequence[OutgoingSession],
) -> tuple[LuoRecord, list[int]]:
    fds: list[int] = []

    def record(pf: PreservedFile) -> FileRecord:
        meta = owner_meta(pf.owner)
        if pf.session is not None:
            meta["session"] = pf.session
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
