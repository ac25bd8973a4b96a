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

The same record also exists as *units* (below), which is how the host mirrors it: one unit per
file and per session, so that a change costs a write of what it touched, not of everything.

``recover`` builds the orchestrator a restarted host serves from: UPDATED with those incoming
files when there are any, else NORMAL; the outgoing global files preserved again under their
tokens, the outgoing sessions re-created and handed back for the host to hold until their
owner takes them back (``retrieve_session`` on a recovered outgoing session).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from luo.core.handover import FileRecord, LuoRecord, SessionRecord
from luo.core.participants import FileHandler, Owner, Subsystem
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


# -- the crash record as units ------------------------------------------------------------------
#
# The host mirrors the crash record after every request that changes it, before answering. Built
# whole, that is O(everything preserved) per request, O(n^2) for n sessions made one by one. So
# the record is also a dict of small *units*, each rendered on its own, and the orchestrator
# says which units each change touched (``Orchestrator.take_crash_changes``): the mirror writes
# only those. Keys (JSON lists on disk, tuples here) and values:
#
#   ("h",)                   {"state", "number", "incoming": None | {"number", "subsystems"}}
#   ("gf", token)            an outgoing file of the global table   } file units:
#   ("s", name)              {"meta"}: an outgoing session          } {"compatible", "data",
#   ("sf", name, token)      a file of that session                 }  "meta", "fd"}
#   ("igf", token)           an incoming global file not restored yet
#   ("is", name)             {"meta"}: an incoming session still to claim: never retrieved, or
#                            retrieved with files not retrieved yet
#   ("isf", name, token)     a file of that session not retrieved yet
#
# A unit absent from the dict does not exist. Order carries meaning: sessions in creation order,
# each session's files in preservation order. A dict keeps first-insertion order, and a session
# closed and created again is deleted and inserted anew, so applying changes in the order they
# happen keeps the dict in the order of the real tables.

UnitKey = tuple[Any, ...]
Unit = dict[str, Any]
HEADER: UnitKey = ("h",)


def file_unit(compatible: str, data: int, meta: dict[str, str], fd: int) -> Unit:
    return {"compatible": compatible, "data": data, "meta": dict(meta), "fd": fd}


def records_from_units(units: Mapping[UnitKey, Unit], fd_of: Callable[[Unit], int]) -> CrashRecord:
    """The crash record the units describe; ``fd_of`` gives the fd of a file unit (the host's
    own fd in a live host, the store's copy when recovering)."""
    header = units.get(HEADER) or {"number": 0, "incoming": None}
    out_fds: list[int] = []
    in_fds: list[int] = []

    def rec(token: int, unit: Unit, fds: list[int]) -> FileRecord:
        fds.append(fd_of(unit))
        return FileRecord(token=token, compatible=unit["compatible"], data=unit["data"],
                          fd_index=len(fds) - 1, meta=dict(unit["meta"]))

    gfiles: list[FileRecord] = []
    igfiles: list[FileRecord] = []
    sessions: dict[str, tuple[dict[str, str], list[FileRecord]]] = {}
    isessions: dict[str, tuple[dict[str, str], list[FileRecord]]] = {}
    for key, unit in units.items():
        kind = key[0]
        if kind == "gf":
            gfiles.append(rec(key[1], unit, out_fds))
        elif kind == "igf":
            igfiles.append(rec(key[1], unit, in_fds))
        elif kind in ("s", "is"):
            table = sessions if kind == "s" else isessions
            table[key[1]] = (dict(unit["meta"]), table.get(key[1], ({}, []))[1])
        elif kind in ("sf", "isf"):
            table = sessions if kind == "sf" else isessions
            table.setdefault(key[1], ({}, []))[1].append(rec(key[2], unit, out_fds if kind == "sf" else in_fds))
    number = header["number"]
    outgoing = LuoRecord(liveupdate_number=number, files=tuple(gfiles), sessions=tuple(
        SessionRecord(name=name, files=tuple(files), meta=meta) for name, (meta, files) in sessions.items()))
    incoming: LuoRecord | None = None
    if header.get("incoming") is not None:
        inc = header["incoming"]
        incoming = LuoRecord(liveupdate_number=inc["number"], subsystems=dict(inc["subsystems"]),
                             files=tuple(igfiles), sessions=tuple(
                                 SessionRecord(name=name, files=tuple(files), meta=meta)
                                 for name, (meta, files) in isessions.items()))
    return CrashRecord(number, outgoing, out_fds, incoming, in_fds)


def owner_of(meta: dict[str, str]) -> Owner:
    def num(key: str) -> int:
        try:
            return int(meta.get(key, "0"))
        except ValueError:
            return 0

    return Owner(pid=num("pid"), uid=num("uid"), comm=meta.get("comm", ""), program=meta.get("program", ""))


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
