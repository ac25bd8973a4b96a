"""luod's copy of its preserved state in the fd store, and a host rebuilt from it after a crash.

After every request that changed what is preserved, and before that request is answered, the
host brings the store up to date: new fds first, then the metadata, then the keys no longer
used. A crash at any point between leaves a store whose metadata names fds it holds (the
metadata is replaced in one step), so recovery never sees half of a change.

The metadata is the crash record of ``luo.core.crash`` in the handover's own format: two KHO
trees (outgoing; incoming still unclaimed) and the store key of each tree's fd_index. Keys are
``<host nonce>.<fd serial>``: unique per host process and per holding of an fd, so a file that
got a reused fd number is never mistaken for the one before it.

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

from luo.core.crash import recover
from luo.core.orchestrator import Orchestrator
from luo.core.participants import FileHandler, Subsystem
from luo.core.session import SessionHandle
from luo.errors import LuoError
from luo.host.tree import tree_for
from luo.host.wire import close_fds
from luo.keeper.store import FdStore
from luo.kho import parse_tree

log = logging.getLogger("luod")

META_FORMAT = "luo-crash-record-v1"


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


class Mirror:
    """Keeps the fd store equal to what the host preserves."""

    def __init__(self, store: FdStore, stale: Iterable[str] = ()) -> None:
        self.store = store
        self.nonce = f"{os.getpid()}-{time.monotonic_ns() & 0xFFFFFFFF:x}"
        self.kept: dict[tuple[int, int], str] = {}  # (fd, serial) -> key
        self.stale: set[str] = set(stale)  # keys of a predecessor or a crashed host: dropped after our first write
        self.revision: Any = None
        self.meta: bytes | None = None
        self.failed: str | None = None  # the last error, for luo status
        self.lost = False  # the store lost what it held (a keeper died and a new one started)
        if hasattr(store, "on_lost"):
            store.on_lost = self._on_lost

    def _on_lost(self) -> None:
        self.lost = True

    @property
    def keys(self) -> list[str]:
        return sorted(self.kept.values())

    def sync(self, orch: Orchestrator) -> None:
        """Bring the store up to date, if anything changed. Never raises: the host serves on, and
        says in ``luo status`` that its state is not mirrored."""
        if orch.handed_over:
            return  # the successor writes from now on
        revision = orch.revision()
        if revision == self.revision and not self.stale and self.failed is None:
            return
        try:
            for _ in range(3):
                if self.lost:  # write everything again: the new store holds nothing of ours
                    log.warning("fd store (%s) was replaced: mirroring everything again", self.store.kind)
                    self.kept, self.meta, self.lost = {}, None, False
                self._write(orch)
                if not self.lost:
                    break
        except (LuoError, OSError) as e:
            self.failed = f"{e}"
            log.error("fd store (%s): cannot mirror the preserved state: %s", self.store.kind, e)
            return
        self.revision = revision
        self.failed = None

    def _write(self, orch: Orchestrator) -> None:
        cr = orch.crash_record()
        wanted: dict[tuple[int, int], str] = {}
        for fd in [*cr.outgoing_fds, *cr.incoming_fds]:
            ident = (fd, orch.fd_serial(fd))
            wanted[ident] = self.kept.get(ident) or f"{self.nonce}.{ident[1]}"
        new = [(key, ident[0]) for ident, key in wanted.items() if ident not in self.kept]
        meta = json.dumps({
            "format": META_FORMAT,
            "state": orch.state.label,
            "liveupdate_number": cr.liveupdate_number,
            "time": time.time(),
            "pid": os.getpid(),
            "outgoing": _b64(tree_for(cr.outgoing)),
            "outgoing_keys": [wanted[(fd, orch.fd_serial(fd))] for fd in cr.outgoing_fds],
            "incoming": _b64(tree_for(cr.incoming)) if cr.incoming is not None else None,
            "incoming_keys": [wanted[(fd, orch.fd_serial(fd))] for fd in cr.incoming_fds],
        }, separators=(",", ":")).encode()
        if new:
            self.store.put_many(new)
        if meta != self.meta:
            self.store.set_meta(meta)
            self.meta = meta
        gone = [key for ident, key in self.kept.items() if ident not in wanted] + sorted(self.stale)
        if gone:
            self.store.drop(gone)
        self.kept = wanted
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


def recover_host(meta: bytes, fds: dict[str, int], handlers: Sequence[FileHandler],
                 subsystems: Sequence[Subsystem]) -> Recovered:
    """The orchestrator a restarted host serves from. Consumes ``fds``: every fd ends up in the
    orchestrator or is closed. Raises LuoError (fds closed) for metadata it cannot use."""
    stale = list(fds)
    out_fds: list[int] = []
    in_fds: list[int] = []
    try:
        doc = json.loads(meta)
        if not isinstance(doc, dict) or doc.get("format") != META_FORMAT:
            raise LuoError(errno.EPROTO, f"fd store metadata is not {META_FORMAT}")
        number = doc.get("liveupdate_number")
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 1 << 64:
            raise LuoError(errno.EINVAL, "fd store metadata: liveupdate_number is not a u64")
        out_fds = _take(doc.get("outgoing_keys"), fds, "outgoing")
        in_fds = _take(doc.get("incoming_keys"), fds, "incoming")
        outgoing, _ = parse_tree(base64.b64decode(doc["outgoing"]), fd_count=len(out_fds))
        incoming = None
        if doc.get("incoming") is not None:
            incoming, _ = parse_tree(base64.b64decode(doc["incoming"]), fd_count=len(in_fds))
    except (ValueError, KeyError, TypeError, LuoError) as e:
        close_fds([*fds.values(), *out_fds, *in_fds])
        if isinstance(e, LuoError):
            raise
        raise LuoError(errno.EINVAL, f"fd store metadata unreadable: {e}") from None
    close_fds([*fds.values()])  # held by the store under no key the metadata names
    orch, sessions, refused = recover(number, outgoing, out_fds, incoming, in_fds, handlers, subsystems)
    close_fds(refused)
    report = {
        "time": time.time(),
        "crashed_pid": doc.get("pid"),
        "crashed_state": doc.get("state"),
        "state": orch.state.label,
        "liveupdate_number": number,
        "files": len(outgoing.files) + (len(incoming.files) if incoming else 0),
        "sessions": [s.name for s in outgoing.sessions] + ([s.name for s in incoming.sessions] if incoming else []),
        "fds": len(out_fds) + len(in_fds) - len(refused),
        "refused_fds": len(refused),
    }
    log.warning("recovered from the fd store after a crash of pid %s (%s): %s", doc.get("pid"), doc.get("state"),
                report)
    return Recovered(orch, sessions, stale, report)

