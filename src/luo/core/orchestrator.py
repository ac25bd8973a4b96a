"""The Live Update Orchestrator, without I/O: RFC v2 global state machine plus 6.19 sessions.

The orchestrator decides *what* happens and in which order; the host daemon does the I/O around
it (sockets, SCM_RIGHTS, the KHO tree, closing fds). fds are plain ints handed to handlers.

fd ownership, in one place:

- ``preserve_fd`` / ``SessionHandle.preserve_fd``: on success the core owns the fd (the caller
  must not close it); on failure the caller still owns it.
- ``incoming_fds`` given to the constructor belong to the core from then on (unless the
  constructor raises). fds no record points at are released at once.
- The core never calls ``os.close``. Every operation that frees fds (unpreserve, closing an
  outgoing session, finishing incoming files) appends them to an internal list;
  ``take_released_fds()`` returns and clears it, and the host closes them.
- fds returned by ``restore_fd`` / ``retrieve_fd`` are new fds made by the handler: they belong
  to the caller at once and are never tracked.
- ``handover_complete()`` returns the outgoing fds directly (they are *not* also put on the
  released list): the successor holds its own copies now.

Deliberate choices where the spec left room (kernel behaviour noted for each):

- A failed freeze abandons the update and is a full cancel: every file, then every subsystem,
  gets ``cancel`` in forward order (the failing participant too, since its prepare succeeded).
  RFC v2 only cancels the participants before the failing one and then returns to NORMAL,
  leaving the others prepared; handlers see ``pf.prepared``/``pf.frozen`` to know what to undo.
- ``get_subsystem_data`` outside UPDATED gives ``-ENOENT``, as the RFC v2 kernel does.
- Subsystems get ``finish(data)``, in registration order, only if they are registered *and*
  the predecessor recorded data for them (RFC v2 calls every registered one, with 0 when it
  has no data); data of subsystems never registered is dropped (logged).
- Global ``finish`` asks every incoming file ``can_finish`` first (as 6.19 session finish does):
  any "no" is ``-EBUSY`` with nothing finished and the state left UPDATED.
- Global ``finish`` also settles every incoming session: retrieved ones are finished, never
  retrieved ones discarded (reclaimed=False). In 6.19 unretrieved sessions linger until the
  next update; here the UPDATED phase ends with nothing incoming left.
- Operations on a closed/finished ``SessionHandle`` give ``-EBADF`` (like a closed fd).
  Preserving into an incoming session or retrieving from an outgoing one gives ``-EINVAL``.
- Closing a retrieved incoming session whose files veto ``can_finish`` gives ``-EBUSY`` and
  keeps the session (the host may retry); the kernel would warn and let it linger.
- Preserving an fd the core already holds gives ``-EBUSY``; a negative fd ``-EBADF``.
- Participants that raise something other than ``LuoError`` are reported as ``LuoError``
  (an ``OSError`` keeps its errno, anything else is ``EIO``).
- After ``handover_complete`` the orchestrator is retired: events give ``-EINVAL`` and
  operations that need NORMAL/UPDATED give ``-EBUSY`` (the state stays FROZEN).

Not thread-safe: the host serializes calls (one event loop).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

from luo.core import filetable, status
from luo.core.calls import U64_MAX, check_token, check_u64, first_failure, must_not_fail
from luo.core.crash import CrashRecord, unclaimed_incoming
from luo.core.fds import FdLedger
from luo.core.filetable import OutgoingFiles, cancel_file, file_who, freeze_file, prepare_file
from luo.core.handover import LuoRecord
from luo.core.incoming import IncomingSession, IncomingState, load_incoming
from luo.core.outgoing import build_record, owner_from_meta
from luo.core.participants import FileHandler, IncomingFile, Owner, PreservedFile, Subsystem
from luo.core.registry import Registry, SubsystemSlot
from luo.core.session import OutgoingSession, SessionHandle, check_session_name
from luo.core.states import Event, State
from luo.core.transitions import REBOOT, Step, legal_steps, next_state, require, step_name
from luo.errors import LuoError

log = logging.getLogger("luo.core")


def _slot_who(slot: SubsystemSlot) -> str:
    return f"subsystem {slot.name}"


def _prepare_slot(slot: SubsystemSlot) -> None:
    slot.data = check_u64(slot.subsystem.prepare(), f"{_slot_who(slot)} prepare")
    slot.prepared = True


def _freeze_slot(slot: SubsystemSlot) -> None:
    slot.data = check_u64(slot.subsystem.freeze(slot.data), f"{_slot_who(slot)} freeze")
    slot.frozen = True


def _cancel_slot(slot: SubsystemSlot) -> None:
    try:
        slot.subsystem.cancel(slot.data)
    finally:
        slot.prepared = False
        slot.frozen = False


class Orchestrator:
    """One host's LUO: registered participants, preserved fds, sessions and the global state."""

    def __init__(
        self,
        handlers: Sequence[FileHandler] = (),
        subsystems: Sequence[Subsystem] = (),
        incoming: LuoRecord | None = None,
        incoming_fds: Sequence[int] = (),
    ) -> None:
        self._registry = Registry()
        self._global = OutgoingFiles("token", None, "global table")
        self._sessions: dict[str, OutgoingSession] = {}  # creation order
        self._incoming: IncomingState | None = None
        self._fds = FdLedger()
        self._next_token = 0
        self._handed_over = False
        # Participants first: if one is refused, no incoming fd has been taken yet.
        for handler in handlers:
            self._registry.add_handler(handler)
        for subsystem in subsystems:
            self._registry.add_subsystem(subsystem)
        if incoming is None:
            if len(incoming_fds):
                raise LuoError(errno.EINVAL, "incoming fds were given without an incoming record")
            self._state = State.NORMAL
            self.liveupdate_number = 0
        else:
            self._incoming = load_incoming(incoming, incoming_fds)
            for inc in self._incoming_files():
                self._fds.hold(inc.fd)
            self._fds.release_all(self._incoming.unused_fds)
            self._state = State.UPDATED
            self.liveupdate_number = (incoming.liveupdate_number + 1) & U64_MAX
            log.info(
                "updated: live update #%d, %d global files, %d sessions, %d subsystems incoming",
                self.liveupdate_number,
                len(self._incoming.files),
                len(self._incoming.sessions),
                len(self._incoming.subsystems),
            )

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> State:
        return self._state

    @property
    def handed_over(self) -> bool:
        return self._handed_over

    def _step(self, step: Step) -> State:
        if self._handed_over:
            raise LuoError(errno.EINVAL, f"{step_name(step)}: this orchestrator has handed over to its successor")
        return next_state(step, self._state)

    def _move(self, target: State, why: str) -> None:
        log.info("%s: %s -> %s", why, self._state.label, target.label)
        self._state = target

    # ------------------------------------------------------------ registration

    def register_subsystem(self, subsystem: Subsystem) -> None:
        require("register", self._state)
        self._registry.add_subsystem(subsystem)

    def unregister_subsystem(self, name: str) -> None:
        require("unregister", self._state)
        self._registry.remove_subsystem(name)

    def register_handler(self, handler: FileHandler) -> None:
        require("register", self._state)
        self._registry.add_handler(handler)

    def unregister_handler(self, compatible: str) -> None:
        require("unregister", self._state)
        handler = self._registry.handler_for(compatible)
        if handler is None:
            raise LuoError(errno.ENOENT, f"no handler registered for {compatible!r}")
        if any(pf.handler is handler for pf in self._outgoing_files()):
            raise LuoError(errno.EBUSY, f"handler {compatible!r} still owns preserved files")
        if any(inc.compatible == compatible for inc in self._incoming_files()):
            raise LuoError(errno.EBUSY, f"handler {compatible!r} still has incoming files to serve")
        self._registry.remove_handler(compatible)

    # ------------------------------------------------------- RFC v2 global API

    def preserve_fd(self, fd: int, token: int | None = None, owner: Owner | None = None) -> int:
        """Preserve ``fd`` in the global table; returns its token (a counter from 0 when None)."""
        require("preserve", self._state)
        auto = token is None
        if token is None:
            token = self._next_token
            while token in self._global:
                token += 1
            if token > U64_MAX:
                raise LuoError(errno.ENOSPC, "no token left")
        else:
            check_token(token)
        self._global.check_room(token)
        self._fds.check_new(fd)
        pf = filetable.preserve_file(self._registry, fd, token, owner or Owner(), None)
        self._global.add(pf)
        self._fds.hold(fd)
        if auto:
            self._next_token = token + 1
        log.debug("preserved fd %d as token %d (%s)", fd, token, pf.compatible)
        return token

    def unpreserve_fd(self, token: int) -> None:
        require("unpreserve", self._state)
        check_token(token)
        pf = self._global.remove(token)
        filetable.unpreserve_file(pf, self._fds)

    def restore_fd(self, token: int) -> int:
        """After the update: a new fd for an incoming global file (once per token)."""
        require("restore", self._state)
        check_token(token)
        assert self._incoming is not None
        inc = self._incoming.files.get(token)
        if inc.retrieved:
            raise LuoError(errno.EINVAL, f"token {token} was already restored")
        return filetable.retrieve_file(self._registry, inc, self._fds)

    def prepare(self) -> None:
        """NORMAL -> PREPARED: files (global by token, then sessions), then subsystems."""
        target = self._step(Event.PREPARE)
        files = self._outgoing_files()
        failed = first_failure(files, prepare_file, file_who, "prepare")
        if failed is not None:
            index, err = failed
            must_not_fail(files[:index], cancel_file, file_who)
            raise err
        slots = self._registry.slots
        failed = first_failure(slots, _prepare_slot, _slot_who, "prepare")
        if failed is not None:
            index, err = failed
            must_not_fail(slots[:index], _cancel_slot, _slot_who)
            must_not_fail(files, cancel_file, file_who)
            raise err
        self._move(target, "prepare")

    def freeze(self) -> None:
        """PREPARED -> FROZEN: files then subsystems; a failure abandons the update (-> NORMAL)."""
        target = self._step(Event.FREEZE)
        self._freeze_all(target)

    def begin_update(self) -> None:
        """The kexec moment: from PREPARED performs the implicit freeze; must end FROZEN."""
        target = self._step(REBOOT)
        if self._state is State.PREPARED:
            self._freeze_all(target)

    def _freeze_all(self, target: State) -> None:
        files = self._outgoing_files()
        failed = first_failure(files, freeze_file, file_who, "freeze")
        if failed is None:
            failed = first_failure(self._registry.slots, _freeze_slot, _slot_who, "freeze")
        if failed is not None:
            self._cancel_all()
            self._move(State.NORMAL, "freeze failed, update abandoned")
            raise failed[1]
        self._move(target, "freeze")

    def cancel(self) -> None:
        """PREPARED/FROZEN -> NORMAL. Preserved tokens and sessions stay."""
        target = self._step(Event.CANCEL)
        self._cancel_all()
        self._move(target, "cancel")

    def _cancel_all(self) -> None:
        must_not_fail(self._outgoing_files(), cancel_file, file_who)
        must_not_fail([s for s in self._registry.slots if s.prepared], _cancel_slot, _slot_who)

    def finish(self) -> None:
        """UPDATED -> NORMAL: settle every incoming file and session, then subsystems finish."""
        target = self._step(Event.FINISH)
        incoming = self._incoming
        assert incoming is not None
        veto = filetable.first_veto(self._registry, self._incoming_files())
        if veto is not None:
            raise LuoError(errno.EBUSY, f"incoming file {veto.token} ({veto.compatible}) cannot finish yet")
        filetable.finish_files(self._registry, incoming.files.ordered(), self._fds)
        incoming.files.clear()
        for session in incoming.sessions.values():
            if not session.gone:
                self._settle_session(session)
        slots = [slot for slot in self._registry.slots if slot.name in incoming.subsystems]
        must_not_fail(slots, lambda slot: slot.subsystem.finish(incoming.subsystems[slot.name]), _slot_who)
        for name in incoming.subsystems.keys() - {slot.name for slot in slots}:
            log.warning("incoming data of subsystem %s dropped: not registered", name)
        self._incoming = None
        self._move(target, "finish")

    def get_subsystem_data(self, name: str) -> int:
        """The u64 the predecessor recorded for ``name``; only in UPDATED (else -ENOENT, as RFC v2)."""
        if self._state is not State.UPDATED or self._incoming is None:
            raise LuoError(errno.ENOENT, f"no incoming subsystem data outside the updated state ({self._state.label})")
        try:
            return self._incoming.subsystems[name]
        except KeyError:
            raise LuoError(errno.ENOENT, f"the predecessor recorded no data for subsystem {name!r}") from None

    # ------------------------------------------------------------- handover

    def outgoing_record(self) -> tuple[LuoRecord, list[int]]:
        """The record for the successor and the fd array its ``fd_index`` values index.

        In FROZEN this is the record to hand over. In PREPARED it is the same record with
        prepare-time data (the kernel builds the LUO tree at prepare): the host uses it to check
        compatibility with the successor before the pause. Elsewhere ``-EINVAL``.
        """
        if self._state not in (State.PREPARED, State.FROZEN) or self._handed_over:
            raise LuoError(
                errno.EINVAL, f"the outgoing record exists only when prepared or frozen, not {self._state.label}"
            )
        return build_record(
            self.liveupdate_number,
            self._registry.slots,
            self._global.ordered(),
            list(self._sessions.values()),
        )

    def handover_complete(self) -> list[int]:
        """The successor confirmed: forget every outgoing file and session.

        Returns the host fds the caller may now close (the successor holds its own copies).
        """
        if self._state is not State.FROZEN or self._handed_over:
            raise LuoError(errno.EINVAL, f"handover can only complete in the frozen state, not {self._state.label}")
        fds = [pf.fd for pf in self._outgoing_files()]
        self._fds.forget(fds)
        self._global.clear()
        for session in self._sessions.values():
            session.files.clear()
            session.gone = True
        self._sessions.clear()
        for slot in self._registry.slots:
            slot.prepared = slot.frozen = False
        self._handed_over = True
        log.info("handover complete: %d fds now belong to the successor", len(fds))
        return fds

    def crash_record(self) -> CrashRecord:
        """What a restarted host needs to come back as this one (see ``luo.core.crash``)."""
        outgoing, out_fds = build_record(self.liveupdate_number, (), self._global.ordered(),
                                         list(self._sessions.values()))
        incoming: LuoRecord | None = None
        in_fds: list[int] = []
        if self._incoming is not None:
            sessions = [(s.name, s.meta, s.retrieved, s.files.ordered())
                        for s in self._incoming.sessions.values() if not s.gone]
            incoming, in_fds = unclaimed_incoming(self._incoming.liveupdate_number, self._incoming.subsystems,
                                                  self._incoming.files.ordered(), sessions)
        return CrashRecord(self.liveupdate_number, outgoing, out_fds, incoming, in_fds)

    def revision(self) -> tuple[object, ...]:
        """A value that changes whenever ``crash_record()`` would (cheap: no record is built)."""
        incoming: tuple[object, ...] = ()
        if self._incoming is not None:
            incoming = (tuple((s.name, s.retrieved, s.gone) for s in self._incoming.sessions.values()),
                        sum(inc.retrieved for inc in self._incoming_files()))
        return (self._state, self.liveupdate_number, self._handed_over, self._fds.changes, tuple(self._sessions),
                incoming)

    def fd_serial(self, fd: int) -> int:
        return self._fds.serial(fd)

    def take_released_fds(self) -> list[int]:
        """fds the core no longer needs; the host closes them. Returns and clears the list."""
        return self._fds.take_released()

    # -------------------------------------------------------------- sessions

    def create_session(self, name: str, owner: Owner | None = None) -> SessionHandle:
        require("create_session", self._state)
        check_session_name(name)
        if name in self._sessions or self._incoming_unretrieved(name):
            raise LuoError(errno.EEXIST, f"a session named {name!r} already exists")
        session = OutgoingSession(name, owner or Owner())
        self._sessions[name] = session
        return SessionHandle(self, session, "out")

    def retrieve_session(self, name: str) -> SessionHandle:
        session = self._incoming.sessions.get(name) if self._incoming is not None else None
        if session is None or session.gone:
            raise LuoError(errno.ENOENT, f"no incoming session named {name!r}")
        if session.retrieved:
            raise LuoError(errno.EINVAL, f"session {name!r} was already retrieved")
        session.retrieved = True
        return SessionHandle(self, session, "in")

    def close_session(self, handle: SessionHandle) -> None:
        """Outgoing: unpreserve its files in reverse order and drop it. Incoming: finish it."""
        session = self._open_session(handle)
        if isinstance(session, OutgoingSession):
            require("close_outgoing_session", self._state)
            files = session.files.ordered()
            for pf in reversed(files):
                filetable.unpreserve_file(pf, self._fds)
            session.files.clear()
            session.gone = True
            del self._sessions[session.name]
        else:
            self._finish_incoming_session(session)

    def sessions(self) -> list[SessionHandle]:
        """Not part of the kernel API: handles on the open outgoing sessions (host bookkeeping)."""
        return [SessionHandle(self, s, "out") for s in self._sessions.values()]

    def _open_session(self, handle: SessionHandle) -> OutgoingSession | IncomingSession:
        if handle._orch is not self:
            raise LuoError(errno.EINVAL, "this session belongs to another orchestrator")
        if handle._session.gone:
            raise LuoError(errno.EBADF, f"session {handle.name!r} is closed")
        return handle._session

    def _session_preserve(self, handle: SessionHandle, fd: int, token: int) -> int:
        session = self._open_session(handle)
        if not isinstance(session, OutgoingSession):
            raise LuoError(errno.EINVAL, f"session {session.name!r} is incoming: files cannot be added")
        require("preserve", self._state)
        check_token(token)
        session.files.check_room(token)
        self._fds.check_new(fd)
        pf = filetable.preserve_file(self._registry, fd, token, session.owner, session.name)
        session.files.add(pf)
        self._fds.hold(fd)
        return token

    def _session_retrieve_fd(self, handle: SessionHandle, token: int) -> int:
        session = self._open_session(handle)
        if isinstance(session, OutgoingSession):
            raise LuoError(errno.EINVAL, f"session {session.name!r} is outgoing: nothing to retrieve")
        check_token(token)
        return filetable.retrieve_file(self._registry, session.files.get(token), self._fds)

    def _session_finish(self, handle: SessionHandle) -> None:
        session = self._open_session(handle)
        if isinstance(session, OutgoingSession):
            raise LuoError(errno.EINVAL, f"session {session.name!r} is outgoing: nothing to finish")
        self._finish_incoming_session(session)

    def _finish_incoming_session(self, session: IncomingSession) -> None:
        veto = filetable.first_veto(self._registry, session.files.ordered())
        if veto is not None:
            raise LuoError(
                errno.EBUSY, f"session {session.name!r}: file {veto.token} ({veto.compatible}) cannot finish yet"
            )
        self._settle_session(session)

    def _settle_session(self, session: IncomingSession) -> None:
        """Finish every file in reverse order (never retrieved ones are discarded); drop the session."""
        filetable.finish_files(self._registry, list(reversed(session.files.ordered())), self._fds)
        session.files.clear()
        session.gone = True

    def _incoming_unretrieved(self, name: str) -> bool:
        if self._incoming is None:
            return False
        session = self._incoming.sessions.get(name)
        return session is not None and not session.gone and not session.retrieved

    # --------------------------------------------------------------- helpers

    def _outgoing_files(self) -> list[PreservedFile]:
        """Every outgoing file in walk order: global table by token, then sessions."""
        files = self._global.ordered()
        for session in self._sessions.values():
            files.extend(session.files.ordered())
        return files

    def _incoming_files(self) -> list[IncomingFile]:
        if self._incoming is None:
            return []
        files = self._incoming.files.ordered()
        for session in self._incoming.sessions.values():
            if not session.gone:
                files.extend(session.files.ordered())
        return files

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, object]:
        """A JSON-able picture for ``luo status``."""
        files: list[dict[str, object]] = [status.outgoing_file(pf) for pf in self._outgoing_files()]
        files += [status.incoming_file(self._registry, inc) for inc in self._incoming_files()]
        sessions: list[dict[str, object]] = [
            {
                "name": s.name,
                "direction": "out",
                "owner": status.owner_json(s.owner),
                "files": [pf.token for pf in s.files.ordered()],
                "retrieved": False,
            }
            for s in self._sessions.values()
        ]
        incoming_subsystems: dict[str, int] = {}
        if self._incoming is not None:
            incoming_subsystems = self._incoming.subsystems
            sessions += [
                {
                    "name": s.name,
                    "direction": "in",
                    "owner": owner_from_meta(s.meta),
                    "files": [inc.token for inc in s.files.ordered()],
                    "retrieved": s.retrieved,
                }
                for s in self._incoming.sessions.values()
                if not s.gone
            ]
        subsystems: list[dict[str, object]] = [
            {
                "name": slot.name,
                "registered": True,
                "data": slot.data,
                "prepared": slot.prepared,
                "frozen": slot.frozen,
                "incoming_data": incoming_subsystems.get(slot.name),
            }
            for slot in self._registry.slots
        ]
        registered = {slot.name for slot in self._registry.slots}
        subsystems += [
            {"name": name, "registered": False, "incoming_data": data}
            for name, data in incoming_subsystems.items()
            if name not in registered
        ]
        return {
            "state": self._state.label,
            "liveupdate_number": self.liveupdate_number,
            "handed_over": self._handed_over,
            "events": [step_name(s) for s in legal_steps(self._state)] if not self._handed_over else [],
            "handlers": [h.compatible for h in self._registry.handlers],
            "files": files,
            "sessions": sessions,
            "subsystems": subsystems,
        }
