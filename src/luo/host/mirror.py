"""luod's copy of its preserved state in the fd store, and a host rebuilt from it after a crash.

After every request that changed what is preserved, and before that request is answered, the
host brings the store up to date: new fds first, then the metadata, then the keys no longer
used. A crash at any point between leaves a store whose metadata names fds it holds (the
metadata is replaced in one step), so recovery never sees half of a change.

What the metadata describes is the crash record of ``luo.core.crash``, as *units* (one per
file, one per session, a header). Rewriting the whole record for every change cost O(n) per
request, O(n^2) for n sessions made one by one (2000 sessions took minutes: the profile was all
KHO tree building), so the store holds it as a journal (``luo.abi.CRASH_RECORD_FORMAT``):

- a *snapshot*: every unit, JSON in a sealed memfd stored under a key of its own;
- the metadata: the snapshot's key and the changes since (``journal``: one entry per write, each
  a list of ``[unit key, unit or null]``), replaced whole at every write.

A write costs what it changed, plus the metadata's journal (bounded: after ``JOURNAL_MAX``
entries or ``JOURNAL_BYTES`` the next write stores a new snapshot instead, O(n) once in a
while). The orchestrator says which units a request touched (``take_crash_changes``); a new
orchestrator (a successor's, a recovered one), a state change or a lost store means rendering
all of them and writing a snapshot. File units name their fd by store key.

Keys are ``<host nonce>.<orchestrator>.<fd serial>``: unique per host process, per orchestrator
it served (a successor swaps in the final one; serials start again in each) and per holding of an
fd, so a file that got a reused fd number is never mistaken for the one before it; snapshots are
``<host nonce>.snapN``. Recovery reads the v1 format (a whole crash record as two KHO trees) of
older hosts too.

Hand-offs between hosts: the outgoing host stops writing once it has handed over; the successor
learns the predecessor's keys in the prepare-time handover (``store_keys``) and drops them after
its own first write. A restarted host drops every key its metadata does not name.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from luo.abi import CRASH_RECORD_FORMAT, CRASH_RECORD_FORMATS_READ, CRASH_SNAPSHOT_FORMAT
from luo.core.crash import HEADER, CrashRecord, Unit, UnitKey, records_from_units, recover
from luo.core.orchestrator import Orchestrator
from luo.core.participants import FileHandler, Subsystem
from luo.core.session import SessionHandle
from luo.errors import LuoError
from luo.host.handover import blob_memfd, read_blob
from luo.host.wire import close_fds
from luo.keeper.store import FdStore
from luo.kho import parse_tree
from luo.kho.validate import validate

log = logging.getLogger("luod")

JOURNAL_MAX = 128  # journal entries in the metadata before the next write stores a snapshot
JOURNAL_BYTES = 256 << 10  # ... or this many bytes of them

Change = tuple[UnitKey, Unit | None]


def _encode_changes(changes: Sequence[Change]) -> str:
    return json.dumps([[list(key), unit] for key, unit in changes], separators=(",", ":"))


def _apply(units: dict[UnitKey, Unit], changes: Iterable[Change]) -> None:
    """In order: a unit replaces the one of its key in place, or is appended; null removes."""
    for key, unit in changes:
        if unit is None:
            units.pop(key, None)
        else:
            units[key] = unit


def _file_key(unit: Unit | None) -> str | None:
    return unit.get("key") if unit is not None else None


class Mirror:
    """Keeps the fd store equal to what the host preserves."""

    def __init__(self, store: FdStore, stale: Iterable[str] = ()) -> None:
        self.store = store
        self.nonce = f"{os.getpid()}-{time.monotonic_ns() & 0xFFFFFFFF:x}"
        self.units: dict[UnitKey, Unit] = {}  # what the store describes; file units carry "key", not "fd"
        self.kept: set[str] = set()  # keys of ours the store holds (files and the snapshot)
        self.unconfirmed: set[str] = set()  # put, but the metadata naming them was not written yet
        self.stale: set[str] = set(stale)  # keys of a predecessor or a crashed host: dropped after our first write
        self.base: str | None = None  # the snapshot's key
        self.base_size = 0
        self.journal: list[str] = []  # encoded entries since the snapshot
        self.journal_bytes = 0
        self.snapshots = 0
        self.orch: Orchestrator | None = None  # whose changes ``pending`` follows
        self.generation = 0  # counts the orchestrators followed: fd serials start again in each
        self.pending: dict[UnitKey, bool] | None = None  # units to write (None: all of them)
        self.failed: str | None = None  # the last error, for luo status
        self.lost = False  # the store lost what it held (a keeper died and a new one started)
        if hasattr(store, "on_lost"):
            store.on_lost = self._on_lost

    def _on_lost(self) -> None:
        self.lost = True

    @property
    def keys(self) -> list[str]:
        return sorted(self.kept)

    @property
    def fd_count(self) -> int:
        """Preserved fds the store holds for this host (the snapshot is not one of them)."""
        return len(self.kept) - (1 if self.base in self.kept else 0)

    def sync(self, orch: Orchestrator) -> None:
        """Bring the store up to date, if anything changed. Never raises: the host serves on, and
        says in ``luo status`` that its state is not mirrored."""
        if orch.handed_over:
            return  # the successor writes from now on
        changes = orch.take_crash_changes()
        if orch is not self.orch:
            self.orch, self.pending = orch, None
            self.generation += 1
        elif changes is None:
            self.pending = None
        elif self.pending is not None:
            for key, gone in changes.items():
                was_gone = self.pending.pop(key, False)
                self.pending[key] = was_gone or gone
        if (self.pending is not None and not self.pending and self.base is not None and not self.stale
                and self.failed is None and not self.lost
                and orch.crash_units([HEADER])[HEADER] == self.units.get(HEADER)):
            return
        try:
            for _ in range(3):
                if self.lost:  # write everything again: the new store holds nothing of ours
                    log.warning("fd store (%s) was replaced: mirroring everything again", self.store.kind)
                    self.units, self.kept, self.unconfirmed = {}, set(), set()
                    self.base, self.journal, self.journal_bytes = None, [], 0
                    self.pending, self.lost = None, False
                self._write(orch)
                if not self.lost:
                    break
        except (LuoError, OSError) as e:
            self.failed = f"{e}"
            log.error("fd store (%s): cannot mirror the preserved state: %s", self.store.kind, e)
            return
        self.pending = {}
        self.failed = None

    def _changes(self, orch: Orchestrator) -> tuple[list[Change], list[tuple[str, int]]]:
        """What to write: the changed units as stored, and the fds to put first."""
        if self.pending is None:
            rendered = orch.crash_units()
            order = [(key, False) for key in self.units if key not in rendered]
            order += [(key, False) for key in rendered]
        else:
            rendered = orch.crash_units([HEADER, *self.pending])
            order = [(HEADER, False), *self.pending.items()]
        changes: list[Change] = []
        puts: list[tuple[str, int]] = []
        for key, gone in order:
            unit = rendered.get(key)
            if unit is not None and "fd" in unit:
                fd = unit["fd"]
                store_key = f"{self.nonce}.{self.generation}.{orch.fd_serial(fd)}"
                unit = {k: v for k, v in unit.items() if k != "fd"}
                unit["key"] = store_key
                if store_key not in self.kept:
                    puts.append((store_key, fd))
            old = self.units.get(key)
            if gone and old is not None and unit is not None:
                changes += [(key, None), (key, unit)]  # removed and made again: it moves to the end
            elif unit is None:
                if old is not None:
                    changes.append((key, None))
            elif unit != old:
                changes.append((key, unit))
        return changes, puts

    def _write(self, orch: Orchestrator) -> None:
        changes, puts = self._changes(orch)
        entry = _encode_changes(changes) if changes else ""
        snapshot = (self.base is None or len(self.journal) >= JOURNAL_MAX
                    or self.journal_bytes + len(entry) > JOURNAL_BYTES)
        units = self.units
        snap_fd: int | None = None
        base, base_size, journal = self.base, self.base_size, self.journal + ([entry] if entry else [])
        if snapshot:
            units = dict(self.units)
            _apply(units, changes)
            blob = json.dumps({"format": CRASH_SNAPSHOT_FORMAT, "units": [[list(k), u] for k, u in units.items()]},
                              separators=(",", ":")).encode()
            self.snapshots += 1
            base, base_size, journal = f"{self.nonce}.snap{self.snapshots}", len(blob), []
            snap_fd = blob_memfd(blob, "luo-crash-units")
            puts.append((base, snap_fd))
        header = orch.crash_units([HEADER])[HEADER] or {}
        root = json.dumps({
            "format": CRASH_RECORD_FORMAT,
            "state": header.get("state"),
            "liveupdate_number": header.get("number"),
            "time": time.time(),
            "pid": os.getpid(),
            "base": base,
            "base_size": base_size,
        }, separators=(",", ":"))
        meta = (root[:-1] + ',"journal":[' + ",".join(journal) + "]}").encode()
        try:
            if puts:
                self.store.put_many(puts)
                self.unconfirmed.update(key for key, _ in puts)
        finally:
            if snap_fd is not None:
                os.close(snap_fd)
        self.store.set_meta(meta)
        # the metadata names the new state: what it no longer names may go
        referenced = {_file_key(unit) for _, unit in changes} | {base}
        gone = {_file_key(self.units.get(key)) for key, _ in changes} - referenced - {None}
        if snapshot and self.base is not None:
            gone.add(self.base)
        gone |= self.unconfirmed - referenced
        drop = sorted(k for k in gone if k is not None) + sorted(self.stale)
        if drop:
            self.store.drop(drop)
        if snapshot:
            self.units = units
        else:
            _apply(self.units, changes)
        self.kept |= self.unconfirmed & referenced
        self.kept -= gone
        self.unconfirmed = set()
        self.base, self.base_size = base, base_size
        self.journal = journal
        self.journal_bytes = sum(len(e) for e in journal) if snapshot else self.journal_bytes + len(entry)
        self.stale = set()


@dataclass
class Recovered:
    """A host's state as a crash left it."""

    orch: Orchestrator
    sessions: list[SessionHandle]  # outgoing sessions whose owner's session fd died with the host
    stale_keys: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def _take(keys: object, fds: dict[str, int], what: str) -> list[int]:
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise LuoError(errno.EINVAL, f"fd store metadata: {what} keys must be a list of strings")
    missing = [k for k in keys if k not in fds]
    if missing:
        raise LuoError(errno.ENOENT, f"fd store metadata names {len(missing)} {what} fds the store does not hold")
    return [fds.pop(k) for k in keys]


def _units_v2(doc: dict[str, Any], fds: dict[str, int]) -> dict[UnitKey, Unit]:
    """The units a v2 metadata describes: its snapshot (consumed from ``fds``), then its journal."""
    base, size = doc.get("base"), doc.get("base_size")
    if not isinstance(base, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise LuoError(errno.EINVAL, "fd store metadata: no snapshot key and size")
    if base not in fds:
        raise LuoError(errno.ENOENT, f"fd store metadata names snapshot {base!r}, which the store does not hold")
    fd = fds.pop(base)
    try:
        blob = read_blob(fd, size)
    finally:
        os.close(fd)
    snap = json.loads(blob)
    if not isinstance(snap, dict) or snap.get("format") != CRASH_SNAPSHOT_FORMAT:
        raise LuoError(errno.EPROTO, f"fd store snapshot is not {CRASH_SNAPSHOT_FORMAT}")
    units: dict[UnitKey, Unit] = {}
    _apply(units, ((tuple(k), u) for k, u in snap["units"]))
    for entry in doc["journal"]:
        _apply(units, ((tuple(k), u) for k, u in entry))
    for key, unit in units.items():
        if not isinstance(unit, dict) or not key or not all(isinstance(k, (str, int)) for k in key):
            raise LuoError(errno.EINVAL, f"fd store metadata: unit {list(key)!r} is not an object")
    return units


def _record_v2(doc: dict[str, Any], fds: dict[str, int], taken: list[int]) -> CrashRecord:
    units = _units_v2(doc, fds)

    def fd_of(unit: Unit) -> int:
        key = unit.get("key")
        if not isinstance(key, str) or key not in fds:
            raise LuoError(errno.ENOENT, f"fd store metadata names fd {key!r}, which the store does not hold")
        fd = fds.pop(key)
        taken.append(fd)
        return fd

    cr = records_from_units(units, fd_of)
    # the rules a handover tree follows (and a v1 record was checked against by parse_tree)
    validate(cr.outgoing, [], len(cr.outgoing_fds))
    if cr.incoming is not None:
        validate(cr.incoming, [], len(cr.incoming_fds))
    return cr


def _record_v1(doc: dict[str, Any], fds: dict[str, int], taken: list[int]) -> CrashRecord:
    number = doc.get("liveupdate_number")
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 1 << 64:
        raise LuoError(errno.EINVAL, "fd store metadata: liveupdate_number is not a u64")
    out_fds = _take(doc.get("outgoing_keys"), fds, "outgoing")
    taken += out_fds
    in_fds = _take(doc.get("incoming_keys"), fds, "incoming")
    taken += in_fds
    outgoing, _ = parse_tree(base64.b64decode(doc["outgoing"]), fd_count=len(out_fds))
    incoming = None
    if doc.get("incoming") is not None:
        incoming, _ = parse_tree(base64.b64decode(doc["incoming"]), fd_count=len(in_fds))
    return CrashRecord(number, outgoing, out_fds, incoming, in_fds)


def recover_host(meta: bytes, fds: dict[str, int], handlers: Sequence[FileHandler],
                 subsystems: Sequence[Subsystem]) -> Recovered:
    """The orchestrator a restarted host serves from. Consumes ``fds``: every fd ends up in the
    orchestrator or is closed. Raises LuoError (fds closed) for metadata it cannot use."""
    stale = list(fds)
    taken: list[int] = []
    try:
        doc = json.loads(meta)
        if not isinstance(doc, dict) or doc.get("format") not in CRASH_RECORD_FORMATS_READ:
            got = doc.get("format") if isinstance(doc, dict) else None
            raise LuoError(errno.EPROTO, f"fd store metadata is format {str(got)[:40]!r}; this luod reads "
                           f"{', '.join(CRASH_RECORD_FORMATS_READ)} (luo.abi)")
        if doc["format"] == CRASH_RECORD_FORMAT:
            cr = _record_v2(doc, fds, taken)
        else:
            cr = _record_v1(doc, fds, taken)
    except Exception as e:  # whatever the metadata holds, it is refused cleanly, every fd closed
        close_fds([*fds.values(), *taken])
        if isinstance(e, LuoError):
            raise
        raise LuoError(errno.EINVAL, f"fd store metadata unreadable: {e!r}") from None
    close_fds([*fds.values()])  # held by the store under no key the metadata names
    orch, sessions, refused = recover(cr.liveupdate_number, cr.outgoing, cr.outgoing_fds, cr.incoming,
                                      cr.incoming_fds, handlers, subsystems)
    close_fds(refused)
    outgoing, incoming = cr.outgoing, cr.incoming
    report = {
        "time": time.time(),
        "crashed_pid": doc.get("pid"),
        "crashed_state": doc.get("state"),
        "state": orch.state.label,
        "liveupdate_number": cr.liveupdate_number,
        "files": len(outgoing.all_files()) + (len(incoming.all_files()) if incoming else 0),
        "sessions": [s.name for s in outgoing.sessions] + ([s.name for s in incoming.sessions] if incoming else []),
        "fds": len(cr.outgoing_fds) + len(cr.incoming_fds) - len(refused),
        "refused_fds": len(refused),
    }
    log.warning("recovered from the fd store after a crash of pid %s (%s): %s", doc.get("pid"), doc.get("state"),
                report)
    return Recovered(orch, sessions, stale, report)
