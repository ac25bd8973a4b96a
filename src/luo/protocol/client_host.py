"""The client↔host channel: what one connection to luod's control socket may ask, and what it
becomes by asking.

A connection is one of four things, and that decides which requests it may send:

- ``control``: a libluo or ``luo`` client (the initial state of every accepted connection).
  Global ops: status, sessions, the RFC v2 events, ``update``, the VM ops, ...
- ``device``: the connection holds ``/dev/liveupdate`` (``open_device``). Under ``luo run`` it is
  a program's own fd, opened with the supervisor's credentials, that the program can write to: it
  may only do what the device's ioctls do (``luo.host.daemon.DEVICE_OPS``); anything else is EPERM,
  so it cannot reach an update, the VMs or a KHO dump. ``close_device`` makes it ``control`` again.
- ``session``: a session fd luod handed out (created or retrieved); the session's own ops only.
  It starts in this state (luod makes it).
- ``participant``: a VMM that registered (``vm_register``); from then on the host sends it
  requests (``luo.protocol.host_vmm``) and what it sends back are replies. A reply that arrives
  after the host stopped waiting is dropped, never dispatched as a request.

Every request is all-or-nothing, as an ioctl is: a refused request changes nothing, so the row's
next state is entered only when the op succeeds. EOF closes the connection from any state.
The protocol has no version (``luo.abi``: ops and fields are only ever added).
"""

from __future__ import annotations

from collections.abc import Collection

from luo.protocol.table import Row, Table

CHANNEL = "client↔host"

CONTROL = "control"
DEVICE = "device"
SESSION = "session"
PARTICIPANT = "participant"
CLOSED = "closed"

# events: what kind of request arrived
OPEN_DEVICE = "open_device"
CLOSE_DEVICE = "close_device"
REGISTER = "vm_register"
DEVICE_OP = "device_op"  # one of the device's ioctls
OTHER_OP = "other_op"  # any other global op (an unknown op is refused by the op table: ENOTTY)
SESSION_OP = "session_op"
LATE_REPLY = "reply"  # a participant's answer to a request the host stopped waiting for
EOF = "eof"

_rows: dict[tuple[str, str], Row] = {
    (CONTROL, OPEN_DEVICE): Row("run", DEVICE),
    (CONTROL, CLOSE_DEVICE): Row("run", CONTROL),  # the op says EINVAL: this connection holds nothing
    (CONTROL, REGISTER): Row("run", PARTICIPANT),
    (CONTROL, DEVICE_OP): Row("run", CONTROL),
    (CONTROL, OTHER_OP): Row("run", CONTROL),
    (DEVICE, OPEN_DEVICE): Row("run", DEVICE),  # the holder asking again keeps it
    (DEVICE, CLOSE_DEVICE): Row("run", CONTROL),
    (DEVICE, DEVICE_OP): Row("run", DEVICE),
    (DEVICE, REGISTER): Row("deny", DEVICE),  # EPERM: not a /dev/liveupdate operation
    (DEVICE, OTHER_OP): Row("deny", DEVICE),
    (SESSION, SESSION_OP): Row("run", SESSION),
    (PARTICIPANT, LATE_REPLY): Row("drop", PARTICIPANT),
    (PARTICIPANT, OTHER_OP): Row("run", PARTICIPANT),
    (PARTICIPANT, DEVICE_OP): Row("run", PARTICIPANT),
}
for _s in (CONTROL, DEVICE, SESSION, PARTICIPANT):
    _rows[(_s, EOF)] = Row("close", CLOSED)

TABLE = Table(CHANNEL, "host", CONTROL, _rows, final=(CLOSED,))


def event_for(state: str, op: object, is_reply: bool, device_ops: Collection[str]) -> str:
    """The event a request is, given the connection's state (a session fd's requests are all
    session ops; a participant's replies are replies). An ``op`` that is not a known name is an
    ``other_op``, which the op table then refuses."""
    if state == SESSION:
        return SESSION_OP
    if state == PARTICIPANT and is_reply:
        return LATE_REPLY
    if not isinstance(op, str):
        return OTHER_OP
    if op in (OPEN_DEVICE, CLOSE_DEVICE, REGISTER):
        return op
    return DEVICE_OP if op in device_ops else OTHER_OP
