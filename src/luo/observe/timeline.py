"""An update record's timeline: read it, refuse it if malformed, and lay out where the time went.

Every process of an update (the outgoing host, its successor, each VM's VMM and successor VMM)
stamps its phases on CLOCK_MONOTONIC, one clock for the whole machine, so the spans of different
processes can be drawn on one axis. The record (``<runtime>/updates/NNNNNN.json``) carries them as
``"timeline": [{"lane", "pid", "phase", "start_ns", "end_ns"}, ...]`` and, per VM, the blackout as
``"blackout_ns": [first vCPU paused, last vCPU resumed]`` (docs/observe.md).

A record from disk is hostile input: anyone who can write the runtime dir can put anything there,
and a version of luo we never met may have written it. Every field this module uses is checked
before use and a bad one is refused with one ``LuoError(EINVAL)`` naming the field, never a
traceback. Fields it does not use are ignored, so newer records still show, unless their
``format`` (``luo.abi.UPDATE_RECORD_FORMAT``) says the fields used here changed meaning.

Records written before the timeline existed only have per-phase durations (host ``phases_ms``,
each VM's ``parts_ms``). Those are laid end to end (``measured`` is False) and every view says
so: the order is right, the gaps between processes are not known.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luo.abi import UPDATE_RECORD_FORMAT
from luo.errors import LuoError

MAX_RECORD_BYTES = 16 << 20  # a record with a few VMs is a few KiB; anything this large is not one
MAX_EVENTS = 100_000  # timeline entries; an update has a dozen per process
MAX_NS = (1 << 63) - 1  # CLOCK_MONOTONIC in a signed 64-bit ns counter
MAX_MS = 1e9  # 11 days: no phase of an update lasts longer; bigger is a corrupt value
VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")  # as luod accepts (luo.host.vms.entry)

# Lanes in the order they are shown: the hosts, then each VM's two VMMs, then anything else.
HOST_LANES = ("host", "successor-host")
VMM_PREFIXES = ("vmm:", "vmm-successor:")

NO_TIMELINE = "no timeline in this record: phases laid end to end"

# Without a timeline, which VMM did each blackout part (the rest goes to the outgoing VMM's lane).
_SUCCESSOR_PARTS = frozenset({"restore", "resume", "enter"})


@dataclass(frozen=True)
class Phase:
    """One span of one process: ``name`` ran in ``lane`` (process ``pid``) from start to end."""

    lane: str
    pid: int
    name: str
    start_ns: int
    end_ns: int

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass(frozen=True)
class Lane:
    """One process's row: its phases in start order (a lane may name more than one pid)."""

    name: str
    phases: tuple[Phase, ...]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(p.pid for p in self.phases))


@dataclass(frozen=True)
class VmBlackout:
    """A VM's blackout: what the VMMs reported, and when on the timeline (None if not known)."""

    name: str
    blackout_ms: float
    parts_ms: dict[str, float]
    start_ns: int | None = None
    end_ns: int | None = None


@dataclass
class Timeline:
    """The phases of one update on one clock, and each VM's blackout."""

    number: int | None
    phases: list[Phase]
    vms: dict[str, VmBlackout]
    measured: bool  # False: the record had no timeline; phases were laid end to end
    record: dict[str, Any] = field(repr=False)
    source: str = ""

    @property
    def note(self) -> str | None:
        """What every view must say when the times are not measured."""
        if self.measured:
            return None
        return NO_TIMELINE + (" (VM parts from the host's freeze)" if self.vms else "")

    @property
    def origin_ns(self) -> int:
        """The first event: every view counts from here."""
        starts = [p.start_ns for p in self.phases] + [v.start_ns for v in self.vms.values() if v.start_ns is not None]
        return min(starts, default=0)

    @property
    def end_ns(self) -> int:
        ends = [p.end_ns for p in self.phases] + [v.end_ns for v in self.vms.values() if v.end_ns is not None]
        return max(ends, default=self.origin_ns)

    @property
    def total_ms(self) -> float:
        """From the first event to the last."""
        return (self.end_ns - self.origin_ns) / 1e6

    def ms(self, ns: int) -> float:
        """A CLOCK_MONOTONIC time as ms from the first event."""
        return (ns - self.origin_ns) / 1e6

    def lanes(self) -> list[Lane]:
        """Every lane with its phases: hosts first, then each VM's VMM and successor VMM."""
        by_lane: dict[str, list[Phase]] = {}
        for p in sorted(self.phases, key=lambda p: (p.start_ns, p.end_ns)):
            by_lane.setdefault(p.lane, []).append(p)
        return [Lane(n, tuple(by_lane[n])) for n in sorted(by_lane, key=lane_order)]

    def to_json(self) -> dict[str, Any]:
        """The laid-out timeline (what ``luo timeline --json`` prints): ms from the first event."""
        def r(x: float) -> float:
            return round(x, 3)

        return {
            "liveupdate_number": self.number,
            "measured": self.measured,
            "note": self.note,
            "source": self.source,
            "origin_ns": self.origin_ns if self.measured else None,
            "total_ms": r(self.total_ms),
            "lanes": [{"lane": ln.name, "pids": list(ln.pids),
                       "phases": [{"phase": p.name, "pid": p.pid, "start_ms": r(self.ms(p.start_ns)),
                                   "end_ms": r(self.ms(p.end_ns)), "duration_ms": r(p.duration_ns / 1e6)}
                                  for p in ln.phases]}
                      for ln in self.lanes()],
            "vms": {n: {"blackout_ms": v.blackout_ms, "parts_ms": v.parts_ms,
                        "start_ms": None if v.start_ns is None else r(self.ms(v.start_ns)),
                        "end_ms": None if v.end_ns is None else r(self.ms(v.end_ns))}
                    for n, v in sorted(self.vms.items())},
        }


def lane_order(lane: str) -> tuple[int, str, int]:
    """Sort key: host, successor-host, then per VM its VMM and successor VMM, then other lanes."""
    if lane in HOST_LANES:
        return (0, "", HOST_LANES.index(lane))
    for i, prefix in enumerate(VMM_PREFIXES):
        if lane.startswith(prefix):
            return (1, lane[len(prefix):], i)
    return (2, lane, 0)


# -- reading ------------------------------------------------------------------------------

def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a record file; a missing file keeps its errno, anything malformed is EINVAL."""
    p = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted in the runtime dir must not hang the reader
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise LuoError(e.errno or errno.EIO, f"cannot read update record {p}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LuoError(errno.EINVAL, f"update record {p} is not a regular file")
        blob = f.read(MAX_RECORD_BYTES + 1)
    if len(blob) > MAX_RECORD_BYTES:
        raise LuoError(errno.EINVAL, f"update record {p} is larger than {MAX_RECORD_BYTES >> 20} MiB")
    return parse_record(blob, str(p))


def parse_record(blob: bytes | str, source: str = "update record") -> dict[str, Any]:
    """Decode and check a record; returns it (unchanged) if every field used here is well formed."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        rec = json.loads(blob, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise LuoError(errno.EINVAL, f"{source}: not JSON: {str(e)[:200]}") from None
    check_record(rec, source)
    return rec


def load(path: str | os.PathLike[str]) -> Timeline:
    """The timeline of the record in ``path``."""
    return from_record(read_record(path), str(path))


# -- checking -----------------------------------------------------------------------------

def _bad(source: str, what: str, why: str) -> LuoError:
    return LuoError(errno.EINVAL, f"{source}: {what} {why}")


def _int(v: Any, source: str, what: str, lo: int = 0, hi: int = MAX_NS) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _bad(source, what, f"must be an integer, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise _bad(source, what, f"{v} is out of range [{lo}, {hi}]")
    return v


def _ms(v: Any, source: str, what: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise _bad(source, what, f"must be a number of ms, not {type(v).__name__}")
    if not (math.isfinite(v) and 0 <= v <= MAX_MS):
        raise _bad(source, what, f"{v} is not a duration in ms")
    return float(v)


def _label(v: Any, source: str, what: str, max_len: int = 100) -> str:
    """A name shown on a terminal and in a plot: printable, not empty, bounded."""
    if not isinstance(v, str):
        raise _bad(source, what, f"must be a string, not {type(v).__name__}")
    if not v or len(v) > max_len or not v.isprintable():
        raise _bad(source, what, f"{v[:40]!r} is not a name (1 to {max_len} printable characters)")
    return v


def _dict(v: Any, source: str, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(source, what, f"must be an object, not {type(v).__name__}")
    return v


def _ms_map(v: Any, source: str, what: str) -> dict[str, float]:
    return {_label(k, source, f"{what} key", 64): _ms(x, source, f"{what}[{k!r}]")
            for k, x in _dict(v, source, what).items()}


def check_record(rec: Any, source: str = "update record") -> None:
    """Refuse (EINVAL, naming the field) a record whose fields used here are malformed."""
    rec = _dict(rec, source, "the record")
    if "format" in rec:  # none: written before it was added (1 or 2, told apart by the timeline)
        fmt = _int(rec["format"], source, "format", 1, 1 << 31)
        if fmt > UPDATE_RECORD_FORMAT:
            raise _bad(source, "format", f"{fmt} is newer than this luo reads (up to {UPDATE_RECORD_FORMAT}): "
                       "read it with the luo that wrote it")
    if "liveupdate_number" in rec or "failed" not in rec:  # a failed update may have no number
        _int(rec.get("liveupdate_number"), source, "liveupdate_number")
    if "failed" in rec:
        if not isinstance(rec["failed"], str):
            raise _bad(source, "failed", "must be a string")
        if "stage" in rec:
            _label(rec["stage"], source, "stage", 64)
    for key in ("phases_ms", "successor_ms"):
        if rec.get(key) is not None:
            _ms_map(rec[key], source, key)
    if rec.get("total_ms") is not None:
        _ms(rec["total_ms"], source, "total_ms")
    if rec.get("timeline") is not None:
        tl = rec["timeline"]
        if not isinstance(tl, list):
            raise _bad(source, "timeline", f"must be a list, not {type(tl).__name__}")
        if len(tl) > MAX_EVENTS:
            raise _bad(source, "timeline", f"has {len(tl)} entries, more than {MAX_EVENTS}")
        for i, e in enumerate(tl):
            _check_event(e, source, f"timeline[{i}]")
    if rec.get("vms") is not None:
        for name, vm in _dict(rec["vms"], source, "vms").items():
            if not VM_NAME.match(name):
                raise _bad(source, f"vms key {name[:60]!r}", "is not a VM name")
            _check_vm(vm, source, f"vms[{name!r}]")


def _check_event(e: Any, source: str, what: str) -> None:
    e = _dict(e, source, what)
    for key in ("lane", "pid", "phase", "start_ns", "end_ns"):
        if key not in e:
            raise _bad(source, what, f"has no {key!r}")
    _label(e["lane"], source, f"{what}.lane")
    _label(e["phase"], source, f"{what}.phase", 64)
    _int(e["pid"], source, f"{what}.pid", 0, 1 << 31)
    start = _int(e["start_ns"], source, f"{what}.start_ns")
    end = _int(e["end_ns"], source, f"{what}.end_ns")
    if end < start:
        raise _bad(source, what, f"ends before it starts (end_ns {end} < start_ns {start})")


def _check_vm(vm: Any, source: str, what: str) -> None:
    vm = _dict(vm, source, what)
    if "blackout_ms" not in vm:
        raise _bad(source, what, "has no 'blackout_ms'")
    _ms(vm["blackout_ms"], source, f"{what}.blackout_ms")
    if vm.get("pid") is not None:
        _int(vm["pid"], source, f"{what}.pid", 0, 1 << 31)
    if vm.get("parts_ms") is not None:
        _ms_map(vm["parts_ms"], source, f"{what}.parts_ms")
    if vm.get("blackout_ns") is not None:
        b = vm["blackout_ns"]
        if not isinstance(b, list) or len(b) != 2:
            raise _bad(source, f"{what}.blackout_ns", "must be [start_ns, end_ns]")
        start = _int(b[0], source, f"{what}.blackout_ns[0]")
        end = _int(b[1], source, f"{what}.blackout_ns[1]")
        if end < start:
            raise _bad(source, f"{what}.blackout_ns", f"ends before it starts ({end} < {start})")


# -- laying out ---------------------------------------------------------------------------

def from_record(rec: dict[str, Any], source: str = "update record") -> Timeline:
    """The timeline of a record (checked here too: callers may pass one they built)."""
    check_record(rec, source)
    number = rec.get("liveupdate_number")
    vms_raw: dict[str, Any] = rec.get("vms") or {}
    events = rec.get("timeline") or []
    if events:
        phases = [Phase(e["lane"], e["pid"], e["phase"], e["start_ns"], e["end_ns"]) for e in events]
        vms = {n: _measured_blackout(n, v, phases) for n, v in vms_raw.items()}
        return Timeline(number, phases, vms, True, rec, source)
    return _end_to_end(rec, number, vms_raw, source)


def _measured_blackout(name: str, vm: dict[str, Any], phases: list[Phase]) -> VmBlackout:
    """The VM's blackout window: ``blackout_ns`` if the record has it, else (a VMM of a version
    that did not send it) from its outgoing VMM's pause for ``blackout_ms``, else unplaced."""
    ms = float(vm["blackout_ms"])
    parts = dict(vm.get("parts_ms") or {})
    if vm.get("blackout_ns"):
        a, b = vm["blackout_ns"]
        return VmBlackout(name, ms, parts, a, b)
    pauses = [p.start_ns for p in phases if p.lane == f"vmm:{name}" and p.name == "pause"]
    if pauses:
        return VmBlackout(name, ms, parts, pauses[-1], pauses[-1] + int(ms * 1e6))
    return VmBlackout(name, ms, parts)


def _end_to_end(rec: dict[str, Any], number: int | None, vms_raw: dict[str, Any], source: str) -> Timeline:
    """No timeline: host phases back to back from 0; each VM's parts back to back from the start
    of the host's freeze (where VMMs paused in the versions that wrote no timeline)."""
    phases: list[Phase] = []
    t = 0
    freeze_at = 0
    for name, ms in (rec.get("phases_ms") or {}).items():
        d = round(ms * 1e6)
        if name == "freeze":
            freeze_at = t
        phases.append(Phase("host", 0, name, t, t + d))
        t += d
    vms: dict[str, VmBlackout] = {}
    for vm_name, vm in vms_raw.items():
        t = freeze_at
        parts = dict(vm.get("parts_ms") or {})
        for part, ms in parts.items():
            d = round(ms * 1e6)
            lane = f"vmm-successor:{vm_name}" if part in _SUCCESSOR_PARTS else f"vmm:{vm_name}"
            phases.append(Phase(lane, int(vm.get("pid") or 0) if lane.startswith("vmm-successor") else 0,
                                part, t, t + d))
            t += d
        ms = float(vm["blackout_ms"])
        vms[vm_name] = VmBlackout(vm_name, ms, parts, freeze_at, freeze_at + round(ms * 1e6))
    return Timeline(number, phases, vms, False, rec, source)
