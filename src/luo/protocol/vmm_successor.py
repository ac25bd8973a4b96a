"""The VMM↔successor VMM channel: a running VMM hands its guest to the VMM the host warmed for it.

The host starts the successor VMM (the updated-to installation's) at the update's prepare and gives
the running VMM one end of a socketpair; the other end is the successor's ``--channel``. The
messages (JSON, ``luo.host.wire``) and their order, protocol 1 (``luo.abi.VMM_CHANNEL_PROTOCOL``,
oldest spoken ``VMM_CHANNEL_OLDEST``)::

    running VMM                                      successor VMM
    warm (pid, name, mem, cpus, info, protocol,  ->  checks the protocol, builds the VM on the
          oldest; + RAM and state memfds)            RAM memfd (the guest runs on meanwhile)
                                                 <-  warm (errno 0, pid, protocol, oldest,
                                                     timings_ms), or {errno, error} and it exits
    (the host's handover: the guest still runs)
    pauses, saves into the state memfd
    saved (paused_at, saved_at, parts_ms,        ->  restores the VM from the state memfd
           timeline)
    go (right behind saved)                      ->  resumes the guest
                                                 <-  resumed; the running VMM exits
    abort (any time before go)                   ->  stops its VM and exits

The version is checked at ``warm`` on both sides (``luo.abi.negotiate``): the successor before it
builds anything (an error reply), the running VMM on the reply (it then drops the successor), so
a refusal fails the update's prepare while the guest runs. The tables below are protocol 1; a
protocol 2 that changes the messages or their order gets tables of its own, chosen by the
negotiated version, and these stay for protocol-1 peers. The ops and fields never change
(installations that speak them exist).

**Who owns the guest** (docs/reliability.md), as the tables encode it: the running VMM owns it
until it sends ``go`` (``RUNNING_OWNS``: idle, warming, warm, saved); the successor owns it from
``go``, or when its predecessor died after ``saved`` (``SUCCESSOR_OWNS``: resuming, orphaned,
running). ``go`` passes it; once sent, the running VMM never takes it back without first killing
the successor and waiting until it is gone (``go-sent`` -> ``reclaiming`` -> ``drop``, whose
action kills; the loop enters the row's state only once the kill is done), and the successor
gives it up only by exiting with the VM stopped. ``drop`` (keep the guest here) has a row in every
state of the running end but the final one: keeping the guest is never refused, and wherever a
successor may exist it kills it. An EOF counts as the predecessor's death only with a pidfd that
says so (``eof_predecessor_dead``): a live predecessor that drops the channel is taking the guest
back. So no pair of states the two ends can be in at once has both owning the guest
(``tests/protocol/test_vmm_successor.py`` explores every interleaving of the two ends).

Events are a received message's ``op`` (``running_event``, ``successor_event``: never the peer's
raw value), the running VMM's own sends (``send_*``: it asks the table before it sends) and local
events: ``eof``, ``timeout``, an ``error_reply``, the outcome of the long steps (``built``,
``restore_done``, ...) and ``protocol_error``, which the loops feed (``take``) when a message has no
row in the state it arrived in: every state that reads has a row for it, so a confused or hostile
peer leads to the same safe place as an EOF, never to a guess.
"""

from __future__ import annotations

import errno

from luo.errors import LuoError
from luo.protocol.table import Cursor, ProtocolError, Row, Table, event_of

CHANNEL = "VMM↔successor VMM"

# -- messages (their ``op``) ---------------------------------------------------------------------

WARM = "warm"  # both ways: the running VMM's request (+ memfds), the successor's reply
SAVED = "saved"
GO = "go"
ABORT = "abort"
RESUMED = "resumed"
TO_SUCCESSOR = (WARM, SAVED, GO, ABORT)
TO_RUNNING = (WARM, RESUMED)

# -- local events --------------------------------------------------------------------------------

# the running VMM's sends: fed before the message goes out, so a send out of order is refused here
SEND_WARM = "send_warm"
SEND_SAVED = "send_saved"
SEND_GO = "send_go"
DROP = "drop"  # the guest stays here: abort the successor, kill it and wait until it is gone
# received, as seen by the loop
ERROR_REPLY = "error_reply"  # a reply with a non-zero errno (the successor refused or failed)
EOF = "eof"  # the channel ended (or broke, or carried a malformed message)
EOF_PREDECESSOR_DEAD = "eof_predecessor_dead"  # (successor) EOF, and the pidfd says the predecessor is dead
TIMEOUT = "timeout"  # (running) no answer in time
PROTOCOL_ERROR = "protocol_error"  # a message with no row in this state (``take``)
# (successor) the outcome of its own long steps
BUILT = "built"
BUILD_FAILED = "build_failed"  # refused the protocol, bad warm, the VM could not be built
RESTORE_DONE = "restore_done"
RESTORE_FAILED = "restore_failed"
RESUME_DONE = "resume_done"
RESUME_FAILED = "resume_failed"

# -- the running VMM's end -----------------------------------------------------------------------

IDLE = "idle"  # no successor (before any update, or after one was dropped)
WARMING = "warming"  # warm sent, waiting for the reply
R_WARM = "warm"  # the successor built its VM and speaks our protocol: kept until the switch
R_SAVED = "saved"  # paused and saved, the successor told: still ours, until go
GO_SENT = "go-sent"  # the ownership has passed; waiting for resumed
RECLAIMING = "reclaiming"  # the successor failed after go: it must be gone before we resume
HANDED_OVER = "handed-over"  # the successor runs the guest; this VMM exits

# running VMM actions
A_SEND_WARM = "send_warm"  # send warm with the memfds, wait (WARM_TIMEOUT) for the reply
A_NEGOTIATE = "negotiate"  # keep the successor if its protocol is ours too, else DROP
A_CLOSE = "close"  # close the channel: a successor that failed or never answered exits by itself
A_SEND_SAVED = "send_saved"
A_SEND_GO = "send_go"  # send go, wait (RESUME_TIMEOUT) for resumed
A_EXIT = "exit"  # stop the VM here (it runs there now) and leave
A_FALL_BACK = "fall_back"  # resume here: DROP first (kill and reap), then preserve with the host
A_ABORT = "abort"  # send abort, close, kill the successor and wait until it is gone

_running: dict[tuple[str, str], Row] = {
    (IDLE, SEND_WARM): Row(A_SEND_WARM, WARMING),
    # a plain ``luo freeze`` (no update, no successor) pauses and saves with nobody to tell
    (IDLE, SEND_SAVED): Row("", IDLE),
    # every path that keeps the guest drops the successor; with none there is nothing to do
    (IDLE, DROP): Row("", IDLE),
    (WARMING, WARM): Row(A_NEGOTIATE, R_WARM),
    # the successor refused (our protocol, a bad warm) or could not build: it exits by itself
    (WARMING, ERROR_REPLY): Row(A_CLOSE, IDLE),
    (WARMING, EOF): Row(A_CLOSE, IDLE),  # it died
    # it may still be building: closing the channel makes it stop (EOF in warm) once it gets there
    (WARMING, TIMEOUT): Row(A_CLOSE, IDLE),
    (WARMING, PROTOCOL_ERROR): Row(A_CLOSE, IDLE),
    # keeping the guest is never refused: a request cut short mid-exchange (its watchdog) leaves
    # this end in warming or go-sent, and whatever successor there is gets killed
    (WARMING, DROP): Row(A_ABORT, IDLE),
    (R_WARM, SEND_SAVED): Row(A_SEND_SAVED, R_SAVED),
    (R_WARM, DROP): Row(A_ABORT, IDLE),  # cancel, the host gone, a refused protocol, a failed save
    # go only behind saved: a successor told go without saved would find nothing to restore
    (R_SAVED, SEND_GO): Row(A_SEND_GO, GO_SENT),
    (R_SAVED, DROP): Row(A_ABORT, IDLE),  # still ours: it was saved, but go was not sent
    (GO_SENT, RESUMED): Row(A_EXIT, HANDED_OVER),
    # dead, hung, or talking nonsense after go: it may be running the guest, so kill it first
    (GO_SENT, EOF): Row(A_FALL_BACK, RECLAIMING),
    (GO_SENT, TIMEOUT): Row(A_FALL_BACK, RECLAIMING),
    (GO_SENT, PROTOCOL_ERROR): Row(A_FALL_BACK, RECLAIMING),
    (GO_SENT, DROP): Row(A_ABORT, IDLE),
    (RECLAIMING, DROP): Row(A_ABORT, IDLE),  # killed and reaped: the guest is ours again
}

RUNNING = Table(CHANNEL, "running VMM", IDLE, _running, final=(HANDED_OVER,))

RUNNING_OWNS = frozenset({IDLE, WARMING, R_WARM, R_SAVED})
"""The running VMM's states in which the guest is its own: every state before ``go`` is sent."""

# -- the successor VMM's end ---------------------------------------------------------------------

S_IDLE = "idle"  # started by the host, waiting for warm
BUILDING = "building"  # checking the protocol and the warm, building the VM
S_WARM = "warm"  # replied warm; waiting for saved
RESTORING = "restoring"  # restoring the saved state into the VM
RESTORED = "restored"  # waiting for go
RESUMING = "resuming"  # got go: the guest is ours
ORPHANED = "orphaned"  # the predecessor died after saved: the guest is ours, nobody else can run it
S_RUNNING = "running"  # the guest runs here: this VMM now serves the host as a running VMM
GONE = "gone"  # exited, the VM (if built) stopped: the guest was never ours, or was given back

# successor VMM actions
A_BUILD = "build"
A_REPLY_WARM = "reply_warm"
A_REPLY_ERROR = "reply_error"  # errno and a sentence, then exit 1
A_QUIT = "quit"  # exit 1, nothing built, nothing to answer
A_RESTORE = "restore"
A_STOP = "stop"  # not ours: stop the VM, exit 0 (the cancel fault point)
A_FAIL = "fail"  # cannot go on: stop the VM, exit 1; the predecessor (alive) resumes the guest
A_RESUME = "resume"  # go: resume, then say resumed
A_TAKE_OVER = "take_over"  # orphaned: resume, and preserve the guest with whichever host serves
A_SEND_RESUMED = "send_resumed"
A_REPORT_ORPHANED = "report_orphaned"  # nobody to tell: log and say so in the report

_successor: dict[tuple[str, str], Row] = {
    (S_IDLE, WARM): Row(A_BUILD, BUILDING),
    (S_IDLE, EOF): Row(A_QUIT, GONE),  # the running VMM never came (it died, or failed its prepare)
    (S_IDLE, PROTOCOL_ERROR): Row(A_QUIT, GONE),
    (BUILDING, BUILT): Row(A_REPLY_WARM, S_WARM),
    (BUILDING, BUILD_FAILED): Row(A_REPLY_ERROR, GONE),  # before the pause: the prepare fails
    (S_WARM, SAVED): Row(A_RESTORE, RESTORING),
    (S_WARM, ABORT): Row(A_STOP, GONE),
    (S_WARM, EOF): Row(A_STOP, GONE),
    # dead before saved: the guest died running (its CPU state never saved): nothing to take
    (S_WARM, EOF_PREDECESSOR_DEAD): Row(A_STOP, GONE),
    (S_WARM, PROTOCOL_ERROR): Row(A_STOP, GONE),  # go without saved among them
    (RESTORING, RESTORE_DONE): Row("", RESTORED),
    (RESTORING, RESTORE_FAILED): Row(A_FAIL, GONE),  # the predecessor, without resumed, resumes
    (RESTORED, GO): Row(A_RESUME, RESUMING),
    # the one way to the guest without go: its whole state is in the preserved state memfd
    (RESTORED, EOF_PREDECESSOR_DEAD): Row(A_TAKE_OVER, ORPHANED),
    (RESTORED, ABORT): Row(A_STOP, GONE),
    (RESTORED, EOF): Row(A_STOP, GONE),  # alive and gone from the channel: it takes the guest back
    (RESTORED, PROTOCOL_ERROR): Row(A_STOP, GONE),
    (RESUMING, RESUME_DONE): Row(A_SEND_RESUMED, S_RUNNING),
    # given back: never started, and the predecessor, with no resumed, kills us before it resumes
    (RESUMING, RESUME_FAILED): Row(A_FAIL, GONE),
    (ORPHANED, RESUME_DONE): Row(A_REPORT_ORPHANED, S_RUNNING),
    (ORPHANED, RESUME_FAILED): Row(A_FAIL, GONE),  # lost: nobody else can run it either
}

SUCCESSOR = Table(CHANNEL, "successor VMM", S_IDLE, _successor, final=(S_RUNNING, GONE))

SUCCESSOR_OWNS = frozenset({RESUMING, ORPHANED, S_RUNNING})
"""The successor's states in which the guest is its own: from ``go``, or from its predecessor's
death after ``saved``."""


# -- helpers for the loops (no I/O either) --------------------------------------------------------

def running_event(msg: dict[str, object]) -> str:
    """The event a reply to the running VMM is: an error reply (any op) by its errno, else its op."""
    return ERROR_REPLY if msg.get("errno") else event_of(msg, TO_RUNNING)


def successor_event(msg: dict[str, object]) -> str:
    """The event a message to the successor is."""
    return event_of(msg, TO_SUCCESSOR)


def take(cursor: Cursor, event: str) -> tuple[str, ProtocolError | None]:
    """Feed a received event; one the state has no row for becomes ``protocol_error`` (the loop
    logs the error returned). A state that has no row for that either raises the first error."""
    try:
        return cursor.feed(event), None
    except ProtocolError as e:
        if (cursor.state, PROTOCOL_ERROR) not in cursor.table.rows:
            raise
        return cursor.feed(PROTOCOL_ERROR), e


def running_end() -> Cursor:
    """A fresh running VMM's end: no successor yet."""
    return Cursor(RUNNING)


def unhandled(cursor: Cursor, action: str) -> LuoError:
    """A row whose action the loop has no code for: the table and its loop disagree (a bug, EPROTO)."""
    return LuoError(errno.EPROTO, f"{cursor.table.channel} ({cursor.table.role}): no code for action "
                                  f"{action!r} in state {cursor.state}")


def eof_needs_pidfd(state: str) -> bool:
    """Whether the successor must ask its predecessor's pidfd what an EOF in ``state`` is (a wait
    of up to a few seconds): only where the predecessor's death changes the row."""
    dead = SUCCESSOR.rows.get((state, EOF_PREDECESSOR_DEAD))
    return dead is not None and dead != SUCCESSOR.rows.get((state, EOF))
