"""Fault injection points, for the failure tests (like the kernel's fault injection).

Faults are asked for per update (``luo update --fault NAME``, honoured only by a host started
with ``LUO_ALLOW_FAULTS=1``) or for a whole process tree with ``LUO_FAULTS`` (comma-separated).
The update hands its faults to the processes it starts (successor host, successor VMMs) through
``LUO_FAULTS``. Each name acts at exactly one point; nothing here is active unless asked for.

- ``corrupt-tree``: the outgoing host damages the KHO blob it hands over.
- ``successor-stall-handover``: the successor writes ``<runtime>/successor.stalled`` (its pid) after
  receiving the handover and never confirms, so a test can kill it right there.
- ``successor-exit-after-confirm``: the successor dies between its confirmation and taking over.
- ``successor-forget=<compatible>``: the successor acts as a version that does not know that compatible.
- ``successor-protocol=<n>``: the successor announces handover protocol n (as an older version would).
- ``host-hold=<point>``: the outgoing host stops at ``prepared`` (the successor checked the tree),
  ``frozen`` (before the final tree), ``handover`` (final tree sent, confirmation not read) or
  ``confirmed`` (before telling VMMs), writes ``<runtime>/host.held`` ("<point> <pid>") and waits
  to be killed: how the crash tests kill a host at an exact point. Never passed to children.
- ``fault=<participant>:<event>:<kind>``: the fault matrix (docs/reliability.md). participant is
  ``handler`` (the probe file handler, luo.testing.probe), ``subsystem`` (a probe subsystem),
  ``vmm`` (the running VMM, the vmm subsystem's participant), ``successor`` (the successor host) or
  ``vmm-successor``; event is ``prepare``, ``freeze``, ``handover``, ``finish`` or ``cancel``; kind
  is ``error`` (fails with EIO), ``crash`` (SIGKILL of its own process) or ``hang`` (never returns:
  whoever waits on it must give up at its timeout, ``LUO_PARTICIPANT_TIMEOUT``).
- ``vmm-successor-fail-warm``: a successor VMM cannot build its VM at prepare.
- ``qemu-successor-dies``: the successor QEMU of a QEMU VM is killed right after it started, so the
  migration of the switch fails and the old QEMU must take the guest back.
- ``qemu-migration-cancelled``: the old QEMU VMM cancels the switch's migration half way (held
  before the switchover by QEMU's ``pause-before-switchover``); the old QEMU must take the guest back. Read from the VMM's
  environment (``LUO_FAULTS`` of the host that started it).
- ``vmm-successor-stall-restore``: a successor VMM writes ``<vm dir>/successor.stalled`` before restoring
  and waits, so a test can kill it during restore.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from luo.errors import LuoError

_override: set[str] = set()


def active() -> set[str]:
    raw = os.environ.get("LUO_FAULTS", "")
    return {w.strip() for w in raw.split(",") if w.strip()} | _override


def enabled(name: str) -> bool:
    return name in active()


def values(prefix: str) -> list[str]:
    """The arguments of every ``prefix=value`` fault."""
    return [w.split("=", 1)[1] for w in active() if w.startswith(prefix + "=")]


def set_for_update(names: list[str]) -> None:
    if names and os.environ.get("LUO_ALLOW_FAULTS") != "1":
        raise LuoError(errno.EPERM, "fault injection needs a host started with LUO_ALLOW_FAULTS=1")
    _override.clear()
    _override.update(names)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    inherited = {f for f in active() if not f.startswith("host-")}
    if inherited:
        env["LUO_FAULTS"] = ",".join(sorted(inherited))
    else:
        env.pop("LUO_FAULTS", None)
    return env


def hold(point: str, runtime_root: Path) -> None:
    """At ``host-hold=<point>``: say so in ``<runtime>/host.held`` and wait until killed."""
    if point not in values("host-hold"):
        return
    from luo.host.runtime import write_atomic

    write_atomic(runtime_root / "host.held", f"{point} {os.getpid()}\n")
    while True:
        signal.pause()


KINDS = ("error", "crash", "hang")


def point(participant: str, event: str) -> None:
    """The fault point of ``participant`` at ``event``: acts if ``fault=participant:event:kind`` is on."""
    for spec in values("fault"):
        p, _, rest = spec.partition(":")
        e, _, kind = rest.partition(":")
        if p != participant or e != event:
            continue
        if kind == "error":
            raise LuoError(errno.EIO, f"{participant} fails {event} (fault injected)")
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:  # only a timeout (an exception from a signal handler) or a kill ends this
                time.sleep(3600)


DEFAULT_PARTICIPANT_TIMEOUT = 30.0


def participant_timeout(default: float = DEFAULT_PARTICIPANT_TIMEOUT) -> float:
    """How long anyone waits on a participant (a callback, a VMM, a successor) before giving up:
    ``default`` unless ``LUO_PARTICIPANT_TIMEOUT`` (seconds) is lower."""
    try:
        cap = float(os.environ.get("LUO_PARTICIPANT_TIMEOUT", "inf"))
    except ValueError:
        cap = float("inf")
    return min(default, cap) if cap > 0 else default
