"""What must outlive a crash of the host process, and a host rebuilt from it. No I/O.

The kernel has no such thing: a kernel crash is a reboot and its preserved state is gone. A
userspace host can do better, because the fds themselves can be held by another process (the
fd store: systemd's, or luo's keeper). What the store needs besides the fds is what the host
knew about them, and that is exactly what an update hands over: a ``LuoRecord``. So a crash
record is two records, in the tree format of the handover:

- ``outgoing``: every preserved global file and session (prepare-time facts), fd_index into
  ``outgoing_fds``. A crash in PREPARED or FROZEN counts as a cancel, as a failed kexec would.
- ``incoming``: what the predecessor handed over that nobody claimed yet (files not restored or
  retrieved, sessions with such files or never retrieved), fd_index into ``incoming_fds``; None
  outside UPDATED.

``recover`` builds the orchestrator a restarted host serves from: UPDATED with those incoming
files when there are any, else NORMAL; the outgoing global files preserved again under their
tokens, the outgoing sessions re-created and handed back for the host to hold until their
owner takes them back (``retrieve_session`` on a recovered outgoing session).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from luo.core.handover import FileRecord, LuoRecord, SessionRecord
from luo.core.participants import FileHandler, IncomingFile, Owner, Subsystem
from luo.core.session import SessionHandle

if TYPE_CHECKING:
    from luo.core.orchestrator import Orchestrator


@dataclass(frozen=True)
class CrashRecord:
    liveupdate_number: int
    outgoing: LuoRecord
    outgoing_fds: list[int]
    incoming: LuoRecord | None
    incoming_fds: list[int]


def unclaimed_incoming(number: int, subsystems: dict[str, int], files: Sequence[IncomingFile],
                       sessions: Sequence[tuple[str, dict[str, str], bool, Sequence[IncomingFile]]]
                       ) -> tuple[LuoRecord, list[int]]:
    """The incoming record restricted to what is still unclaimed, renumbered."""
    fds: list[int] = []

    def rec(inc: IncomingFile) -> FileRecord:
        fds.append(inc.fd)
        return FileRecord(token=inc.token, compatible=inc.compatible, data=inc.data, fd_index=len(fds) - 1,
                          meta=dict(inc.meta))

    global_files = tuple(rec(f) for f in files if not f.retrieved)
    out_sessions = []
    for name, meta, retrieved, sfiles in sessions:
        left = [f for f in sfiles if not f.retrieved]
        if left or not retrieved:
            out_sessions.append(SessionRecord(name=name, files=tuple(rec(f) for f in left), meta=dict(meta)))
    return LuoRecord(liveupdate_number=number, subsystems=dict(subsystems), files=global_files,
                     sessions=tuple(out_sessions)), fds


def owner_of(meta: dict[str, str]) -> Owner:
    def num(key: str) -> int:
        try:
            return int(meta.get(key, "0"))
        except ValueError:
            return 0

    return Owner(pid=num("pid"), uid=num("uid"), comm=meta.get("comm", ""))


def recover(crash_number: int, outgoing: LuoRecord, outgoing_fds: Sequence[int], incoming: LuoRecord | None,
            incoming_fds: Sequence[int], handlers: Sequence[FileHandler] = (),
            subsystems: Sequence[Subsystem] = ()) -> tuple[Orchestrator, list[SessionHandle], list[int]]:
    """An orchestrator in the state the crash left; the recovered outgoing sessions; and the fds
    that could not be taken back (a handler refused them now): the caller closes those.

    On success every fd of both arrays belongs to the orchestrator or to the returned list.
    """
    from luo.core.orchestrator import Orchestrator

    if incoming is not None and (incoming.files or incoming.sessions):
        # the constructor counts the incoming number up by one: give it the crashed host's number back
        orch = Orchestrator(handlers=handlers, subsystems=subsystems,
                            incoming=replace(incoming, liveupdate_number=(crash_number - 1) % (1 << 64)),
                            incoming_fds=incoming_fds)
    else:
        orch = Orchestrator(handlers=handlers, subsystems=subsystems)
        orch.liveupdate_number = crash_number
    refused: list[int] = []
    used: set[int] = set()
    for f in outgoing.files:
        used.add(f.fd_index)
        try:
            orch.preserve_fd(outgoing_fds[f.fd_index], f.token, owner=owner_of(f.meta))
        except Exception:
            refused.append(outgoing_fds[f.fd_index])
    handles: list[SessionHandle] = []
    for s in outgoing.sessions:
        handle = orch.create_session(s.name, owner=owner_of(s.meta))
        for f in s.files:
            used.add(f.fd_index)
            try:
                handle.preserve_fd(outgoing_fds[f.fd_index], f.token)
            except Exception:
                refused.append(outgoing_fds[f.fd_index])
        handles.append(handle)
    refused += [fd for i, fd in enumerate(outgoing_fds) if i not in used]
    refused += orch.take_released_fds()
    return orch, handles, refused
