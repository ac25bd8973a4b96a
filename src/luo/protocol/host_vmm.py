"""The host↔VMM channel: a VMM registers with the host, then answers the host's update requests.

Messages (JSON on the VMM's registration connection, ``luo.host.wire``):

- VMM → host: ``vm_register`` (name, pid, info, report, the VMM-host protocol it speaks); later
  only replies (``reply: true``, the request's ``seq``, ``errno``).
- host → VMM: ``prepare`` (with one fd: the channel to the successor VMM the host started),
  ``freeze`` (a plain ``luo freeze``, or a protocol-1 VMM in an update), ``cancel``,
  ``handed_over`` (the new host holds everything: switch now; no reply, the VMM either leaves or
  registers again), ``stop``.

Versions (``luo.abi.VMM_HOST_PROTOCOL``): 1 pauses at ``freeze`` during an update; 2 runs on
through the host's freeze and switches on ``handed_over``. Registration negotiates the version
both ways before any request.

Two tables, one per end. ``HOST`` is the host's view of one VMM: its rows are the requests the
host sends and their outcomes (``ok``/``failed``), and ``eof`` (the VMM is gone). Its states are
what ``luo status`` calls the VMM's link. ``VMM`` is what the VMM accepts in each state; its
actions are the VMM's handlers, and each handler that can fail leads to a transient state left by
``done`` or ``failed``. In both, a request in the wrong state is a protocol error: the host never
sends one (the core's own table keeps the order), so one that arrives is refused and changes
nothing.
"""

from __future__ import annotations

from luo.protocol.table import UNKNOWN, Row, Table

CHANNEL = "host↔VMM"

# host -> VMM requests (their ``op``)
PREPARE = "prepare"
FREEZE = "freeze"
CANCEL = "cancel"
HANDED_OVER = "handed_over"
STOP = "stop"
REQUESTS = (PREPARE, FREEZE, CANCEL, HANDED_OVER, STOP)

# local events
REGISTERED = "registered"  # (host) vm_register accepted on a connection
OK = "ok"  # (host) the VMM answered the request without an errno
FAILED = "failed"  # (host) an errno, no answer in time, or the send failed; (VMM) the handler raised
DONE = "done"  # (VMM) the handler returned
SWITCHED = "switched"  # (VMM) the successor VMM runs the guest: this VMM exits
KEPT = "kept"  # (VMM) the guest stayed here (fell back) and the VMM registered again
EOF = "eof"  # the other end closed: (host) the VMM died or exited; (VMM) the host died

# -- the host's end, per VMM --------------------------------------------------------------------

STARTING = "starting"
RUNNING = "running"
PREPARING = "preparing"
PREPARED = "prepared"
FREEZING = "freezing"
FROZEN = "frozen"
CANCELLING = "cancelling"
HANDED_OVER_STATE = "handed-over"
STOPPING = "stopping"
STOPPED = "stopped"
EXITED = "exited"

HOST_SERVING = frozenset({RUNNING, PREPARED, FROZEN})  # the VMM answers requests
HOST_IN_UPDATE = frozenset({PREPARED, FROZEN})  # prepared for an update: a cancel or handed_over follows

_host: dict[tuple[str, str], Row] = {
    (STARTING, REGISTERED): Row("", RUNNING),
    # a VMM registers again on a new connection: after its host died and another one serves, or
    # after it kept the guest when a switch failed (the old connection ended first: EOF below)
    (EXITED, REGISTERED): Row("", RUNNING),
    (HANDED_OVER_STATE, REGISTERED): Row("", RUNNING),
    (RUNNING, PREPARE): Row("send", PREPARING),  # with the channel to a successor VMM just started
    (PREPARING, OK): Row("", PREPARED),
    (PREPARING, FAILED): Row("", RUNNING),  # the VMM dropped its successor; the subsystem cancels the others
    (PREPARED, FREEZE): Row("send", FREEZING),
    (FREEZING, OK): Row("", FROZEN),
    (FREEZING, FAILED): Row("", FROZEN),  # paused or not, the cancel that follows resumes it
    (PREPARED, CANCEL): Row("send", CANCELLING),
    (FROZEN, CANCEL): Row("send", CANCELLING),
    (CANCELLING, OK): Row("", RUNNING),
    (CANCELLING, FAILED): Row("", RUNNING),  # a VMM that fails its cancel still keeps its guest
    # the update's switch: no answer; the VMM either exits (its successor registers) or registers again
    (PREPARED, HANDED_OVER): Row("send", HANDED_OVER_STATE),
    (RUNNING, HANDED_OVER): Row("send", HANDED_OVER_STATE),  # one that joined after prepare: it stays, re-attaches
    (FROZEN, HANDED_OVER): Row("send", HANDED_OVER_STATE),
    (RUNNING, STOP): Row("send", STOPPING),  # not during an update: EBUSY, as the core refuses changes then
    (STOPPING, OK): Row("", STOPPED),
    (STOPPING, FAILED): Row("", RUNNING),
    (STOPPED, EOF): Row("", STOPPED),  # the stopped VMM's connection ends after its answer
}
for _s in (STARTING, RUNNING, PREPARING, PREPARED, FREEZING, FROZEN, CANCELLING, HANDED_OVER_STATE, STOPPING):
    _host[(_s, EOF)] = Row("", EXITED)

HOST = Table(CHANNEL, "host", STARTING, _host)

# -- the VMM's end ------------------------------------------------------------------------------

SERVING = "serving"
WARMING = "warming"
V_PREPARED = "prepared"
V_FREEZING = "freezing"
V_FROZEN = "frozen"
SWITCHING = "switching"
GONE = "gone"
V_STOPPED = "stopped"

VMM_ANSWERS = frozenset({SERVING, V_PREPARED, V_FROZEN})  # where the VMM's loop waits for a request

_vmm: dict[tuple[str, str], Row] = {
    (SERVING, PREPARE): Row("prepare", WARMING),  # warm a successor VMM while the guest runs
    (WARMING, DONE): Row("", V_PREPARED),
    (WARMING, FAILED): Row("", SERVING),  # the successor was dropped; the guest never stopped
    (V_PREPARED, FREEZE): Row("freeze", V_FREEZING),
    (V_FREEZING, DONE): Row("", V_FROZEN),
    (V_FREEZING, FAILED): Row("", V_FROZEN),  # the host cancels next; cancel resumes a paused guest
    # cancel keeps the guest here; idempotent, so a late cancel for an update this VMM never joined is harmless
    (SERVING, CANCEL): Row("cancel", SERVING),
    (V_PREPARED, CANCEL): Row("cancel", SERVING),
    (V_FROZEN, CANCEL): Row("cancel", SERVING),
    (SWITCHING, SWITCHED): Row("", GONE),
    (SWITCHING, KEPT): Row("", SERVING),
    (SWITCHING, FAILED): Row("", SERVING),  # the switch raised: it kept the guest before raising
}
for _s in (SERVING, V_PREPARED, V_FROZEN):
    # handed_over with no prepared successor (a VMM that joined late) falls back: the guest stays here
    _vmm[(_s, HANDED_OVER)] = Row("switch", SWITCHING)
    _vmm[(_s, STOP)] = Row("stop", V_STOPPED)
    _vmm[(_s, EOF)] = Row("host_gone", SERVING)  # keeps the guest, then waits for a host to register with
    _vmm[(_s, UNKNOWN)] = Row("refuse", _s)  # ENOTTY: an op this version does not know

VMM = Table(CHANNEL, "VMM", SERVING, _vmm, final=(GONE, V_STOPPED))
