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
  Preserving into an incoming session or retrieving from or finishing an outgoing one gives
  ``-EINVAL`` (v7.2's per-session type, checked first: also on a closed session).
- Closing a retrieved incoming session whose files veto ``can_finish`` gives ``-EBUSY`` and
  keeps the session (the host may retry); the kernel would warn and let it linger.
- Preserving an fd the core already holds gives ``-EBUSY``; a negative fd ``-EBADF``.
- Preserving a file already preserved, in any session or the global table, gives ``-EBUSY``
  (v7.2). The host receives dups of the caller's fd, so files are told apart by what the
  handler's ``identity`` answers: the inode for luo's handlers. That is stricter than the
  kernel, which compares its ``struct file``: a memfd reopened through ``/proc/PID/fd/N`` is a
  second struct file the kernel would preserve twice, and luo refuses. Only outgoing files
  count: a retrieved file may be preserved again in a new session (the kernel's retrieve gives
  a new struct file; here it is the same inode, which is why incoming files are not indexed).
- No limit on files per session or on sessions (v7.2; 6.19 had 128 files, ``-ENOSPC``).
- A failed ``retrieve_fd`` fails the same way every later time (v7.3): errno and sentence are
  kept on the file. RFC v2 ``restore_fd`` keeps its own rule (restored once, then ``-EINVAL``).
- Participants that raise something other than ``LuoError`` are reported as ``LuoError``
  (an ``OSError`` keeps its errno, anything else is ``EIO``).
- After ``handover_complete`` the orchestrator is retired: events give ``-EINVAL`` and
  operations that need NORMAL/UPDATED give ``-EBUSY`` (the state stays FROZEN).

Not thread-safe: the host serializes calls (one event loop).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Hashable, Sequence

from luo.core import filetable, status
from luo.core.calls import U64_MAX, check_token, check_u64, first_failure, must_not_fail
from luo.core.crash import HEADER, CrashRecord, Unit, UnitKey, file_unit, records_from_units
from luo.core.fds import FdLedger
from luo.core.filetable import OutgoingFiles, cancel_file, file_who, freeze_file, prepare_file
from luo.core.handover import LuoRecord
from luo.core.incoming import IncomingSession, IncomingState, load_incoming
from luo.core.outgoing import build_record, file_meta, owner_from_meta, owner_meta
from luo.core.participants import FileHandler, IncomingFile, Owner, PreservedFile, Subsystem
from luo.core.registry import Registry, SubsystemSlot
from luo.core.session import OutgoingSession, SessionHandle, check_session_name
from luo.core.states import Event, State
from luo.core.transitions import BOOT, REBOOT, Step, legal_steps, next_state, require, step_name
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
        self._global = OutgoingFiles("token", "global table")
        self._sessions: dict[str, OutgoingSession] = {}  # creation order
        self._incoming: IncomingState | None = None
        self._preserved: dict[Hashable, PreservedFile] = {}  # identity -> outgoing file (EBUSY rule)
        self._incoming_ids: dict[Hashable, IncomingFile] | None = None  # built on first need
        self._touched: dict[UnitKey, bool] = {}  # crash units changed since take_crash_changes (see there)
        self._touched_all = True  # ... or possibly all of them
        self._fds = FdLedger()
        self._next_token = 0
        self._handed_over = False
        # Participants first: if one is refused, no incoming fd has been taken yet.
        for handler in handlers:
            self._registry.add_handler(handler)
        for subsystem in subsystems:
            self._registry.add_subsystem(subsystem)
        self._state = State.NORMAL
        self.liveupdate_number = 0
        if incoming is None:
            if len(incoming_fds):
                raise LuoError(errno.EINVAL, "incoming fds were given without an incoming record")
        else:
            self._incoming = load_incoming(incoming, incoming_fds)
            for inc in self._incoming_files():
                self._fds.hold(inc.fd)
            self._fds.release_all(self._incoming.unused_fds)
            self._state = self._step(BOOT)  # the table's only way into UPDATED
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
        pf = self._preserve_new(fd, token, owner or Owner(), None)
        self._global.add(pf)
        self._fds.hold(fd)
        self._touch(("gf", token))
        if auto:
            self._next_token = token + 1
        log.debug("preserved fd %d as token %d (%s)", fd, token, pf.compatible)
        return token

    def unpreserve_fd(self, token: int) -> None:
        require("unpreserve", self._state)
        check_token(token)
        pf = self._global.remove(token)
        self._forget_outgoing(pf)
        filetable.unpreserve_file(pf, self._fds)
        self._touch(("gf", token), gone=True)

    def restore_fd(self, token: int) -> int:
        """After the update: a new fd for an incoming global file (once per token)."""
        require("restore", self._state)
        check_token(token)
        assert self._incoming is not None
        inc = self._incoming.files.get(token)
        if inc.retrieved:
            raise LuoError(errno.EINVAL, f"token {token} was already restored")
        fd = filetable.retrieve_file(self._registry, inc, self._fds)
        self._touch(("igf", token), gone=True)
        return fd

    def prepare(self) -> None:
        """NORMAL -> PREPARED: files (global by token, then sessions), then subsystems."""
        target = self._step(Event.PREPARE)
        self._touched_all = True  # every file's data may change
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
        self._touched_all = True
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
        self._touched_all = True
        must_not_fail(self._outgoing_files(), cancel_file, file_who)
        must_not_fail([s for s in self._registry.slots if s.prepared], _cancel_slot, _slot_who)

    def finish(self) -> None:
        """UPDATED -> NORMAL: settle every incoming file and session, then subsystems finish."""
        target = self._step(Event.FINISH)
        incoming = self._incoming
        assert incoming is not None
        self._touched_all = True
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
        self._touched_all = True
        self._preserved.clear()
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
        return records_from_units(self.crash_units(), lambda unit: unit["fd"])

    def crash_units(self, keys: Sequence[UnitKey] | None = None) -> dict[UnitKey, Unit | None]:
        """The crash record as units (``luo.core.crash``), in table order: all of them (``keys``
        None), or just ``keys``, each rendered now (None: the unit does not exist).

        Each unit costs O(1) but an incoming session's, which looks for a file still to retrieve."""
        if keys is None:
            out: dict[UnitKey, Unit | None] = {HEADER: self._header_unit()}
            for pf in self._global.ordered():
                out[("gf", pf.token)] = self._file_unit(pf)
            for session in self._sessions.values():
                out[("s", session.name)] = {"meta": owner_meta(session.owner)}
                for pf in session.files.ordered():
                    out[("sf", session.name, pf.token)] = self._file_unit(pf)
            if self._incoming is not None:
                for inc in self._incoming.files.ordered():
                    if not inc.retrieved:
                        out[("igf", inc.token)] = self._incoming_unit(inc)
                for isession in self._incoming.sessions.values():
                    unit = self._incoming_session_unit(isession)
                    if unit is not None:
                        out[("is", isession.name)] = unit
                        for inc in isession.files.ordered():
                            if not inc.retrieved:
                                out[("isf", isession.name, inc.token)] = self._incoming_unit(inc)
            return out
        return {key: self._render(key) for key in keys}

    def take_crash_changes(self) -> dict[UnitKey, bool] | None:
        """The crash units touched since the last call, or None: any may have changed (render all).

        In the order of their last change (a unit created after another comes after it), each
        with True if it was removed at some point: a session closed and created again must move
        to the end of the order. The header unit is never listed: it is cheap, and
        ``liveupdate_number`` is a plain attribute that a recovery sets; render it every time."""
        if self._touched_all:
            self._touched_all = False
            self._touched = {}
            return None
        touched, self._touched = self._touched, {}
        return touched

    def _touch(self, *keys: UnitKey, gone: bool = False) -> None:
        if self._touched_all:
            return
        for key in keys:
            was_gone = self._touched.pop(key, False)
            self._touched[key] = was_gone or gone

    def _header_unit(self) -> Unit:
        incoming = None
        if self._incoming is not None:
            incoming = {"number": self._incoming.liveupdate_number, "subsystems": dict(self._incoming.subsystems)}
        return {"state": self._state.label, "number": self.liveupdate_number, "incoming": incoming}

    @staticmethod
    def _file_unit(pf: PreservedFile) -> Unit:
        return file_unit(pf.compatible, pf.data, file_meta(pf), pf.fd)

    @staticmethod
    def _incoming_unit(inc: IncomingFile) -> Unit:
        return file_unit(inc.compatible, inc.data, inc.meta, inc.fd)

    @staticmethod
    def _incoming_session_unit(session: IncomingSession) -> Unit | None:
        """Present while something is left to claim: never retrieved, or files not retrieved yet."""
        if session.gone:
            return None
        if session.retrieved and all(inc.retrieved for inc in session.files.ordered()):
            return None
        return {"meta": dict(session.meta)}

    def _render(self, key: UnitKey) -> Unit | None:
        kind = key[0]
        if kind == "h":
            return self._header_unit()
        if kind == "gf":
            return self._file_unit(self._global.get(key[1])) if key[1] in self._global else None
        if kind in ("s", "sf"):
            session = self._sessions.get(key[1])
            if session is None:
                return None
            if kind == "s":
                return {"meta": owner_meta(session.owner)}
            return self._file_unit(session.files.get(key[2])) if key[2] in session.files else None
        if self._incoming is None:
            return None
        if kind == "igf":
            if key[1] not in self._incoming.files:
                return None
            inc = self._incoming.files.get(key[1])
            return None if inc.retrieved else self._incoming_unit(inc)
        isession = self._incoming.sessions.get(key[1])
        if isession is None or self._incoming_session_unit(isession) is None:
            return None
        if kind == "is":
            return self._incoming_session_unit(isession)
        if key[2] not in isession.files:
            return None
        inc = isession.files.get(key[2])
        return None if inc.retrieved else self._incoming_unit(inc)

    def fd_serial(self, fd: int) -> int:
        return self._fds.serial(fd)

    def take_released_fds(self) -> list[int]:
        """fds the core no longer needs; the host closes them. Returns and clears the list."""
        return self._fds.take_released()

    # -------------------------------------------------------------- sessions

    def create_session(self, name: str, owner: Owner | None = None) -> SessionHandle:
        """6.19/v7.2 CREATE_SESSION: a bad name is ``-EINVAL``, a name in use ``-EEXIST``."""
        require("create_session", self._state)
        check_session_name(name)
        if name in self._sessions or self._incoming_unretrieved(name):
            raise LuoError(errno.EEXIST, f"a session named {name!r} already exists")
        session = OutgoingSession(name, owner or Owner())
        self._sessions[name] = session
        self._touch(("s", name))
        return SessionHandle(self, session, "out")

    def retrieve_session(self, name: str, by: Owner | None = None) -> SessionHandle:
        """6.19/v7.2 RETRIEVE_SESSION, over the predecessor's sessions only: unknown (or already
        finished) is ``-ENOENT``, retrieved before ``-EINVAL``."""
        session = self._incoming.sessions.get(name) if self._incoming is not None else None
        if session is None or session.gone:
            raise LuoError(errno.ENOENT, f"no incoming session named {name!r}")
        if session.retrieved:
            raise LuoError(errno.EINVAL, f"session {name!r} was already retrieved")
        session.retrieved = True
        session.retrieved_by = by
        self._touch(("is", name))
        return SessionHandle(self, session, "in")

    def close_session(self, handle: SessionHandle) -> None:
        """Outgoing: unpreserve its files in reverse order and drop it. Incoming: finish it."""
        session = self._open_session(handle)
        if isinstance(session, OutgoingSession):
            require("close_outgoing_session", self._state)
            files = session.files.ordered()
            for pf in reversed(files):
                self._forget_outgoing(pf)
                filetable.unpreserve_file(pf, self._fds)
            self._touch(("s", session.name), *(("sf", session.name, pf.token) for pf in files), gone=True)
            session.files.clear()
            session.gone = True
            del self._sessions[session.name]
        else:
            self._finish_incoming_session(session)

    def sessions(self) -> list[SessionHandle]:
        """Not part of the kernel API: handles on the open outgoing sessions (host bookkeeping)."""
        return [SessionHandle(self, s, "out") for s in self._sessions.values()]

    def _open_session(self, handle: SessionHandle, want: type | None = None) -> OutgoingSession | IncomingSession:
        """The session behind ``handle``. ``want``: the type the operation needs; the other type
        is ``-EINVAL`` (v7.2: PRESERVE_FD only on a created session, RETRIEVE_FD and FINISH only
        on a retrieved one), checked before ``-EBADF`` for a closed one, since a session's type
        does not change when it closes."""
        if handle._orch is not self:
            raise LuoError(errno.EINVAL, "this session belongs to another orchestrator")
        session = handle._session
        if want is OutgoingSession and not isinstance(session, OutgoingSession):
            raise LuoError(errno.EINVAL, f"session {session.name!r} was retrieved: files cannot be added to it")
        if want is IncomingSession and isinstance(session, OutgoingSession):
            raise LuoError(errno.EINVAL, f"session {session.name!r} was created, not retrieved: "
                           "nothing to retrieve or finish")
        if session.gone:
            raise LuoError(errno.EBADF, f"session {handle.name!r} is closed")
        return session

    def _session_preserve(self, handle: SessionHandle, fd: int, token: int) -> int:
        session = self._open_session(handle, OutgoingSession)
        assert isinstance(session, OutgoingSession)
        require("preserve", self._state)
        check_token(token)
        session.files.check_room(token)
        pf = self._preserve_new(fd, token, session.owner, session.name)
        session.files.add(pf)
        self._fds.hold(fd)
        self._touch(("sf", session.name, token))
        return token

    def _session_retrieve_fd(self, handle: SessionHandle, token: int) -> int:
        session = self._open_session(handle, IncomingSession)
        check_token(token)
        fd = filetable.retrieve_file(self._registry, session.files.get(token), self._fds, sticky=True)
        self._touch(("is", session.name))
        self._touch(("isf", session.name, token), gone=True)
        return fd

    def _session_finish(self, handle: SessionHandle) -> None:
        session = self._open_session(handle, IncomingSession)
        assert isinstance(session, IncomingSession)
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
        files = session.files.ordered()
        filetable.finish_files(self._registry, list(reversed(files)), self._fds)
        self._touch(("is", session.name), *(("isf", session.name, inc.token) for inc in files), gone=True)
        session.files.clear()
        session.gone = True

    def _incoming_unretrieved(self, name: str) -> bool:
        if self._incoming is None:
            return False
        session = self._incoming.sessions.get(name)
        return session is not None and not session.gone and not session.retrieved

    # ------------------------------------------------------- which file is it

    def _preserve_new(self, fd: int, token: int, owner: Owner, session: str | None) -> PreservedFile:
        """Checks in the kernel's order (v7.2 ``luo_preserve_file``): a bad fd ``-EBADF``, no
        handler ``-ENOENT``, a file already preserved ``-EBUSY``; then the handler's preserve.
        The caller checked the token (``-EEXIST``) and adds the file to its table."""
        self._fds.check_new(fd)
        handler = self._registry.owner_of(fd)
        ident = filetable.identify(handler, fd)
        if ident is not None and ident in self._preserved:
            other = self._preserved[ident]
            raise LuoError(errno.EBUSY, f"fd {fd} is a file LUO already preserves ({file_who(other)}); "
                           "luo tells files apart by inode")
        pf = filetable.preserve_file(handler, fd, token, owner, session, ident)
        if ident is not None:
            self._preserved[ident] = pf
        return pf

    def _forget_outgoing(self, pf: PreservedFile) -> None:
        if pf.ident is not None and self._preserved.get(pf.ident) is pf:
            del self._preserved[pf.ident]

    def preserved_size(self, ident: Hashable) -> tuple[bool, int | None]:
        """Is the file ``ident`` (a handler identity: ``(st_dev, st_ino)`` for luo's handlers)
        frozen by LUO, and at what size? True for an outgoing preserved file, and for an
        incoming file not finished yet, retrieved or not: the kernel keeps a memfd's size
        frozen from preserve until finish. The size is the handler's ``recorded_size`` (a
        memfd's), None for other kinds. Not part of the kernel API: ``luo run`` asks it to
        refuse a truncate of a preserved memfd with EPERM, as the kernel does. O(1)."""
        pf = self._preserved.get(ident)
        if pf is not None:
            return True, pf.handler.recorded_size(pf.data)
        inc = self._incoming_index().get(ident)
        if inc is None or inc.done:
            return False, None
        handler = self._registry.handler_for(inc.compatible)
        return True, handler.recorded_size(inc.data) if handler is not None else None

    def _incoming_index(self) -> dict[Hashable, IncomingFile]:
        """Identities of the incoming files, built at the first question (not in the successor's
        start-up, which may run inside a blackout); incoming files only ever go away (``done``)."""
        if self._incoming_ids is None:
            self._incoming_ids = {}
            for inc in self._incoming_files():
                handler = self._registry.handler_for(inc.compatible)
                if handler is None:
                    continue
                try:
                    ident = filetable.identify(handler, inc.fd)
                except LuoError:
                    continue
                if ident is not None:
                    self._incoming_ids.setdefault(ident, inc)
        return self._incoming_ids

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

    def session_status(self, handle: SessionHandle) -> dict[str, object]:
        """One session's part of ``status()``, in O(its files) (a session fd's own ``status``)."""
        if handle._orch is not self or handle._session.gone:
            raise LuoError(errno.ENOENT, f"session {handle.name!r} is gone")
        return self._session_json(handle._session)

    @staticmethod
    def _session_json(s: OutgoingSession | IncomingSession) -> dict[str, object]:
        if isinstance(s, OutgoingSession):
            return {"name": s.name, "direction": "out", "owner": status.owner_json(s.owner),
                    "files": [pf.token for pf in s.files.ordered()], "retrieved": False}
        out: dict[str, object] = {"name": s.name, "direction": "in", "owner": owner_from_meta(s.meta),
                                  "files": [inc.token for inc in s.files.ordered()], "retrieved": s.retrieved}
        if s.retrieved_by is not None:
            out["retrieved_by"] = status.owner_json(s.retrieved_by)
        return out

    def status(self) -> dict[str, object]:
        """A JSON-able picture for ``luo status``."""
        files: list[dict[str, object]] = [status.outgoing_file(pf) for pf in self._outgoing_files()]
        files += [status.incoming_file(self._registry, inc) for inc in self._incoming_files()]
        sessions = [self._session_json(s) for s in self._sessions.values()]
        incoming_subsystems: dict[str, int] = {}
        if self._incoming is not None:
            incoming_subsystems = self._incoming.subsystems
            sessions += [self._session_json(s) for s in self._incoming.sessions.values() if not s.gone]
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
