"""Where update records live in a runtime dir, which one is the latest, and waiting for one.

An update leaves ``<runtime>/updates/NNNNNN.json`` (the full record, written once every VM that
crossed reported its blackout) and ``NNNNNN-host.json`` (the successor host's part, written when
it starts serving; for an update without VMs it is the only one). The full record is preferred.
"""

from __future__ import annotations

import errno
import re
import time
from pathlib import Path

from luo.errors import LuoError

_FULL = re.compile(r"^(\d{6,12})\.json$")
_HOST = re.compile(r"^(\d{6,12})-host\.json$")


def updates_dir(runtime: Path) -> Path:
    return runtime / "updates"


def record_paths(runtime: Path) -> dict[int, Path]:
    """Every liveupdate number with a record, to its best file (the full one if written)."""
    found: dict[int, Path] = {}
    try:
        names = sorted(p.name for p in updates_dir(runtime).iterdir())
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise LuoError(e.errno or errno.EIO, f"cannot list {updates_dir(runtime)}: {e.strerror}") from None
    for name in names:
        if m := _HOST.match(name):
            found.setdefault(int(m.group(1)), updates_dir(runtime) / name)
    for name in names:
        if m := _FULL.match(name):
            found[int(m.group(1))] = updates_dir(runtime) / name
    return dict(sorted(found.items()))


def find_record(runtime: Path, number: int | None = None) -> Path:
    """The record of liveupdate ``number`` (default: the latest); ENOENT saying what exists."""
    paths = record_paths(runtime)
    if not paths:
        raise LuoError(errno.ENOENT, f"no update record in {updates_dir(runtime)}: no live update happened here")
    if number is None:
        return paths[max(paths)]
    if number not in paths:
        have = ", ".join(map(str, list(paths)[-10:]))
        raise LuoError(errno.ENOENT, f"no record of liveupdate {number} in {updates_dir(runtime)} "
                       f"(records: {have})")
    return paths[number]


def wait_for_record(runtime: Path, number: int, with_vms: bool, timeout: float = 10.0,
                    interval: float = 0.02) -> Path:
    """The record of the update just made, once written: the full one if VMs crossed (only it has
    their blackouts), else either. Polls until a deadline (the record is written by another
    process, the new host) and fails with ETIMEDOUT naming the file it waited for."""
    full = updates_dir(runtime) / f"{number:06d}.json"
    host = updates_dir(runtime) / f"{number:06d}-host.json"
    deadline = time.monotonic() + timeout
    while True:
        if full.exists():
            return full
        if not with_vms and host.exists():
            return host
        if time.monotonic() >= deadline:
            raise LuoError(errno.ETIMEDOUT, f"the record of liveupdate {number} ({full}"
                           f"{'' if with_vms else f' or {host.name}'}) did not appear within {timeout:g} s")
        time.sleep(interval)
