"""The host↔successor host channel of ``luo update``: the outgoing luod hands everything to the new one.

The outgoing host (``luo.host.update``, through ``luo.host.successor_link.SuccessorLink``) starts
the successor (``luod-next``, the updated-to installation's ``luo host --successor FD``) with one
end of a SOCK_SEQPACKET socketpair. The messages (JSON, ``luo.host.wire``; the ops and fields are
fixed: other installations speak them) and their order::

    outgoing host                                  successor host
                                               <-  hello (pid, compatibles, protocol): imported
                                                   and warmed, the workloads still running
    refuses protocol < HANDOVER_OLDEST
    (the update's prepare)
    handover stage=prepare (fd_count, tree_size,
      store_keys; + tree memfd, listener)
    fds (index; + up to 253 fds) x n           ->  checks every compatible, parses the tree,
                                                   builds its host on the fds
                                               <-  checked, or {errno, error}
    (the freeze, inside the blackout)
    handover stage=final (tree_size; + memfd)
      or, when freeze changed nothing and the
      successor speaks 3, unchanged: true      ->  adopts the final (or prepared) tree
                                               <-  confirm (errno 0, liveupdate_number,
                                                   timings_ms), or {errno, error, refused_tree}
    (tells the VMMs: handed over)
    ack (phases_ms, timeline)                  ->  becomes the service's main process
                                               <-  adopted; it serves, the outgoing host exits
    abort (any time before ack)                ->  exits (0, or 4 once it had confirmed)

EOF, on either side, means the other end died (or, for the successor, gave up on it and is
killing it). The outgoing host cancels the update on every failure, keeping every fd: it holds
its copies until the successor says ``adopted``. The successor, whose predecessor vanished
without an abort, asks the predecessor's pidfd whether it died (``Watched``): a dead one after
the prepare-time handover means the successor holds the only copies and takes over (from the
prepared tree, or from the final one once confirmed); a live one keeps everything, and the
successor leaves.

Versions (``luo.abi.HANDOVER_PROTOCOL``, announced in ``hello``; ``HANDOVER_UNANNOUNCED`` for a
successor whose hello has no protocol): 1 was the one-stage handover (tree and fds at freeze):
no longer spoken, such a successor is refused at hello (EPROTONOSUPPORT, before anything is
prepared, ``HANDOVER_OLDEST``). 2 is the two-stage handover above. 3 adds the ``unchanged``
final handover: the one row that differs (``UNCHANGED`` in ``prepared``/``checked``), so the
tables are built per protocol (``outgoing(p)``, ``incoming(p)``); the outgoing host speaks the
successor's protocol when it is older and its own when it is newer. Fields added without a bump
(``store_keys``, ``timeline``) are hints a successor that does not know them ignores.

Events are a received message (``successor_event``, ``outgoing_event``: never the peer's raw
``op``), the outgoing host's own sends (fed before the message goes out, so a send out of order
is refused before it reaches the wire) and local events: ``eof``, ``timeout``, ``malformed`` (a
datagram ``recv_msg`` refuses), and the outcome of the successor's long steps (``ok``,
``failed``: its states ``checking`` and ``adopting`` read nothing, so no abort can arrive there).
A send that fails is ``eof`` in the state the send's row led to. The successor's exit status says
where it stopped: 0 aborted, 1 left (it held nothing, or its predecessor dropped the channel but
lives on), 2 refused the final handover, 4 aborted or abandoned after confirming (3: the
``successor-stall-handover`` fault); once serving it exits as any luod does.

What a table refuses: the outgoing host raises EPROTO naming the answers it expected
(``refusal``; after the ack, ``wait_adopted`` answers False instead, and the update rolls back).
The successor answers a refused handover with an error reply, and leaves (2) if it was a final
one; anything else it drops, with its fds (``on_refused``).
"""

from __future__ import annotations

from collections.abc import Mapping

from luo.abi import HANDOVER_OLDEST, HANDOVER_PROTOCOL
from luo.protocol.table import ProtocolError, Row, Table, event_of

CHANNEL = "host↔successor host"
OUTGOING_ROLE = "outgoing host"
SUCCESSOR_ROLE = "successor host"

UNCHANGED_SINCE = 3
"""The first protocol whose successor takes ``unchanged: true`` for a final tree equal to the
prepared one (luo.abi: "3: as 2, and the final tree may be unchanged")."""

# -- the ops of the messages (both ways) ----------------------------------------------------------

HELLO = "hello"  # successor -> outgoing, first: pid, compatibles, protocol
HANDOVER = "handover"  # outgoing -> successor: stage "prepare" (+ tree memfd, listener) or "final"
FDS = "fds"  # outgoing -> successor: a batch of preserved fds behind a prepare-time handover
CHECKED = "checked"  # successor -> outgoing: the prepared tree is understood, the host built
CONFIRM = "confirm"  # successor -> outgoing: the final tree is adopted
ACK = "ack"  # outgoing -> successor: the successor owns everything; take over
ABORT = "abort"  # outgoing -> successor: the update is cancelled; exit
ADOPTED = "adopted"  # successor -> outgoing: it is the service's main process now
OPS = (HELLO, HANDOVER, FDS, CHECKED, CONFIRM, ACK, ABORT, ADOPTED)

STAGE_PREPARE = "prepare"  # a handover's ``stage``; any other stage is the final handover
STAGE_FINAL = "final"

# -- events: received messages --------------------------------------------------------------------

# to the successor (a handover is one of three events by its stage and ``unchanged``)
PREPARE = "prepare"  # handover stage=prepare; its fd batches are read with it (recv_handover)
FINAL = "final"  # handover stage=final with the final tree
UNCHANGED = "unchanged"  # handover stage=final, unchanged: the prepared tree stands (protocol 3)
TO_SUCCESSOR = (PREPARE, FINAL, UNCHANGED, FDS, ACK, ABORT)
# to the outgoing host
ERROR = "error"  # a reply with a non-zero errno, whatever its op: the successor refused or failed
TO_OUTGOING = (HELLO, CHECKED, CONFIRM, ADOPTED, ERROR)

# -- events: local ----------------------------------------------------------------------------------

EOF = "eof"  # the channel ended or broke (a recv at EOF, or a send that failed): the other end died
MALFORMED = "malformed"  # a datagram recv_msg refused (truncated, not JSON, too deep)
TIMEOUT = "timeout"  # (outgoing) no answer within the wait
WARMED = "warmed"  # (successor) imports done and paths warmed: time to say hello
OK = "ok"  # (successor) the step its state is named after succeeded
FAILED = "failed"  # (successor) ... or raised (LuoError), with the error to answer
# the outgoing host's sends are fed under the name of the event they are for the successor:
# PREPARE, FINAL, UNCHANGED, ACK, ABORT

# -- the outgoing host's end (SuccessorLink) --------------------------------------------------------

O_STARTING = "starting"  # spawned; waiting for hello (the successor imports and warms)
O_READY = "ready"  # hello accepted: nothing sent yet
O_CHECKING = "checking"  # the prepare-time handover sent; waiting for checked
O_PREPARED = "prepared"  # checked: the successor holds every fd and has built its host
O_CONFIRMING = "confirming"  # the final handover sent (inside the blackout); waiting for confirm
O_CONFIRMED = "confirmed"  # confirm: the successor adopted everything; the VMMs are told
O_ACKED = "acked"  # ack sent: no way back; waiting for adopted
O_ADOPTED = "adopted"  # the successor is the main process: our copies go, we exit
O_BROKEN = "broken"  # refused, died, timed out or garbled before ack: only the abort remains
O_ABORTED = "aborted"  # abort sent (or the channel was dead): the update was cancelled here
O_LOST = "lost"  # no adopted after ack: the update rolls back (``_abandon_handover``)

# outgoing actions (SuccessorLink methods)
A_CHECK_PROTOCOL = "check_protocol"  # keep the hello; EPROTONOSUPPORT below HANDOVER_OLDEST
A_SEND_PREPARE = "send_prepare"  # the tree memfd, listener, then every fd in batches
A_SEND_FINAL = "send_final"  # the final tree in a sealed memfd
A_SEND_UNCHANGED = "send_unchanged"  # unchanged: true, no fd
A_SEND_ACK = "send_ack"  # with the phases and timeline for the update record
A_SEND_ABORT = "send_abort"  # best effort: the process is killed right after in any case
A_RAISE_REFUSED = "raise_refused"  # LuoError with the successor's errno (and its refused tree)
A_RAISE_GONE = "raise_gone"  # ESRCH, with the successor's exit status
A_RAISE_TIMED_OUT = "raise_timed_out"  # ETIMEDOUT
A_RAISE_MALFORMED = "raise_malformed"  # the error recv_msg raised (EINVAL, EMSGSIZE)
A_NOT_ADOPTED = "not_adopted"  # wait_adopted answers False: the update rolls back

_BROKEN = {  # how a wait before the ack ends when the answer is not the one awaited
    ERROR: Row(A_RAISE_REFUSED, O_BROKEN),
    EOF: Row(A_RAISE_GONE, O_BROKEN),
    TIMEOUT: Row(A_RAISE_TIMED_OUT, O_BROKEN),
    MALFORMED: Row(A_RAISE_MALFORMED, O_BROKEN),
}


def _outgoing_rows(protocol: int) -> dict[tuple[str, str], Row]:
    rows: dict[tuple[str, str], Row] = {
        # the successor speaks first, once warmed: nothing is prepared before its protocol is known
        (O_STARTING, HELLO): Row(A_CHECK_PROTOCOL, O_READY),
        **{(O_STARTING, e): r for e, r in _BROKEN.items()},  # it failed to start, or never warmed
        # the prepare-time handover: everything but the final tree, the workloads running
        (O_READY, PREPARE): Row(A_SEND_PREPARE, O_CHECKING),
        (O_CHECKING, CHECKED): Row("", O_PREPARED),
        # a refusal here (EOPNOTSUPP: a compatible it does not know) fails the update's prepare
        **{(O_CHECKING, e): r for e, r in _BROKEN.items()},
        # the freeze is done: the final tree, or (3) "unchanged" when it equals the prepared one
        (O_PREPARED, FINAL): Row(A_SEND_FINAL, O_CONFIRMING),
        (O_CONFIRMING, CONFIRM): Row("", O_CONFIRMED),
        # a refusal, death or silence here cancels the frozen update, every fd kept
        **{(O_CONFIRMING, e): r for e, r in _BROKEN.items()},
        # the point of no return: the successor starts serving on the ack
        (O_CONFIRMED, ACK): Row(A_SEND_ACK, O_ACKED),
        (O_ACKED, ADOPTED): Row("", O_ADOPTED),
        # it died or went silent between ack and adopted: the VMMs re-attach, the update rolls back
        (O_ACKED, ERROR): Row(A_NOT_ADOPTED, O_LOST),
        (O_ACKED, EOF): Row(A_NOT_ADOPTED, O_LOST),
        (O_ACKED, TIMEOUT): Row(A_NOT_ADOPTED, O_LOST),
        (O_ACKED, MALFORMED): Row(A_RAISE_MALFORMED, O_LOST),
    }
    if protocol >= UNCHANGED_SINCE:
        rows[(O_PREPARED, UNCHANGED)] = Row(A_SEND_UNCHANGED, O_CONFIRMING)
    # the update cancels (a failure anywhere, the caller gone): abort, in every state before the
    # ack, a broken link included (the successor may still read it). After the ack nothing is sent.
    for state in (O_STARTING, O_READY, O_CHECKING, O_PREPARED, O_CONFIRMING, O_CONFIRMED, O_BROKEN):
        rows[(state, ABORT)] = Row(A_SEND_ABORT, O_ABORTED)
    return rows


# -- the successor's end (luo.host.successor) -------------------------------------------------------

S_STARTING = "starting"  # importing and warming every handover path
S_WAITING = "waiting"  # hello sent; holds nothing (again, after a refused prepare)
S_CHECKING = "checking"  # reading the fd batches, checking the tree, building the host
S_CHECKED = "checked"  # holds the prepared tree, every fd and the listener; waiting for the final tree
S_ADOPTING = "adopting"  # reading the final tree, swapping in its orchestrator
S_REFUSED = "refused"  # refused the final tree: the reply goes out, then it exits 2
S_CONFIRMED = "confirmed"  # adopted and confirmed; waiting for the ack (the outgoing host may still cancel)
S_SERVING = "serving"  # acknowledged: the service's main process
S_CANCELLED = "cancelled"  # aborted: exits without serving
S_LEFT = "left"  # the outgoing host went away while it held nothing (or lives on): exits
S_ORPHANED = "orphaned"  # the outgoing host went away holding nothing more: serves if it died

# successor actions (luo.host.successor)
A_SAY_HELLO = "say_hello"
A_CHECK_PREPARED = "check_prepared"  # recv_handover, check every compatible, build the host
A_SEND_CHECKED = "send_checked"
A_REFUSE_PREPARED = "refuse_prepared"  # drop what arrived, error reply; it may be prepared again
A_REPLY_ERROR = "reply_error"  # an error reply; nothing else changes
A_IGNORE = "ignore"  # close the message's fds; nothing else (no reply: nobody waits for one)
A_EXIT_CANCELLED = "exit_cancelled"  # exit 0 (the cancel fault point)
A_LEAVE = "leave"  # drop our copies, exit 1: the outgoing host keeps its own
A_ORPHANED = "orphaned"  # predecessor dead (pidfd): take over from the prepared tree; alive: leave
A_ADOPT_FINAL = "adopt_final"  # read the final tree, check it names the prepared files, adopt it
A_ADOPT_PREPARED = "adopt_prepared"  # the orchestrator built at prepare stands
A_SEND_CONFIRM = "send_confirm"
A_REFUSE_FINAL = "refuse_final"  # error reply (the refused tree kept for the operator), exit 2
A_TAKE_OVER = "take_over"  # become the main process, say adopted, serve
A_EXIT_CANCELLED_AFTER_CONFIRM = "exit_cancelled_after_confirm"  # exit 4: the outgoing host keeps it all
A_ORPHANED_AFTER_CONFIRM = "orphaned_after_confirm"  # predecessor dead: serve the final tree; alive: exit 4


def _incoming_rows(protocol: int) -> dict[tuple[str, str], Row]:
    rows: dict[tuple[str, str], Row] = {
        # an action's send that fails is an EOF in the state its row leads to (here: waiting)
        (S_STARTING, WARMED): Row(A_SAY_HELLO, S_WAITING),
        (S_WAITING, PREPARE): Row(A_CHECK_PREPARED, S_CHECKING),
        (S_WAITING, ABORT): Row(A_EXIT_CANCELLED, S_CANCELLED),  # e.g. the update's prepare failed
        (S_WAITING, EOF): Row(A_LEAVE, S_LEFT),  # nothing held: a restarted host recovers from the store
        (S_WAITING, MALFORMED): Row(A_REPLY_ERROR, S_WAITING),
        (S_CHECKING, OK): Row(A_SEND_CHECKED, S_CHECKED),
        # EOPNOTSUPP, a bad tree, the prepare fault: answered; the outgoing host aborts
        (S_CHECKING, FAILED): Row(A_REFUSE_PREPARED, S_WAITING),
        (S_CHECKING, EOF): Row(A_LEAVE, S_LEFT),  # the channel broke between the fd batches
        (S_CHECKED, FINAL): Row(A_ADOPT_FINAL, S_ADOPTING),
        (S_CHECKED, ABORT): Row(A_EXIT_CANCELLED, S_CANCELLED),  # a failed freeze or hold
        # it holds every fd and the listener, and preserving is refused from prepare on: if the
        # outgoing host died, nothing changed since the prepared tree, which it serves from
        (S_CHECKED, EOF): Row(A_ORPHANED, S_ORPHANED),
        (S_CHECKED, MALFORMED): Row(A_REPLY_ERROR, S_CHECKED),
        (S_ADOPTING, OK): Row(A_SEND_CONFIRM, S_CONFIRMED),
        (S_ADOPTING, FAILED): Row(A_REFUSE_FINAL, S_REFUSED),  # the outgoing host cancels
        (S_ADOPTING, EOF): Row(A_ORPHANED, S_ORPHANED),  # the final tree's memfd would not read
        # the refusal could not be sent: the outgoing host went away, as in checked
        (S_REFUSED, EOF): Row(A_ORPHANED, S_ORPHANED),
        (S_CONFIRMED, ACK): Row(A_TAKE_OVER, S_SERVING),
        # cancelled after all (its VMMs or the ack failed): it still holds its own copies
        (S_CONFIRMED, ABORT): Row(A_EXIT_CANCELLED_AFTER_CONFIRM, S_CANCELLED),
        # no ack: dead (pidfd), it can no longer cancel, so serve; alive, it keeps everything
        (S_CONFIRMED, EOF): Row(A_ORPHANED_AFTER_CONFIRM, S_ORPHANED),
        (S_CONFIRMED, MALFORMED): Row(A_ORPHANED_AFTER_CONFIRM, S_ORPHANED),  # no ack either
    }
    if protocol >= UNCHANGED_SINCE:
        rows[(S_CHECKED, UNCHANGED)] = Row(A_ADOPT_PREPARED, S_ADOPTING)
    return rows


# -- the tables, per protocol -----------------------------------------------------------------------

def speaks(protocol: int) -> int:
    """The protocol whose tables serve a peer announcing ``protocol``: a newer one gets ours, and
    one older than HANDOVER_OLDEST (only ever the successor-protocol fault: the outgoing host
    refuses it at hello) the oldest's."""
    return max(HANDOVER_OLDEST, min(protocol, HANDOVER_PROTOCOL))


_OUTGOING = {p: Table(f"{CHANNEL}, protocol {p}", OUTGOING_ROLE, O_STARTING, _outgoing_rows(p),
                      final=(O_ADOPTED, O_ABORTED, O_LOST))
             for p in range(HANDOVER_OLDEST, HANDOVER_PROTOCOL + 1)}
_INCOMING = {p: Table(f"{CHANNEL}, protocol {p}", SUCCESSOR_ROLE, S_STARTING, _incoming_rows(p),
                      final=(S_SERVING, S_CANCELLED, S_LEFT, S_ORPHANED))
             for p in range(HANDOVER_OLDEST, HANDOVER_PROTOCOL + 1)}


def outgoing(protocol: int) -> Table:
    """The outgoing host's table for a successor announcing ``protocol``."""
    return _OUTGOING[speaks(protocol)]


def incoming(protocol: int) -> Table:
    """The successor's table when it announced ``protocol``."""
    return _INCOMING[speaks(protocol)]


OUTGOING = outgoing(HANDOVER_PROTOCOL)
INCOMING = incoming(HANDOVER_PROTOCOL)
TABLES: Mapping[int, tuple[Table, Table]] = {p: (_OUTGOING[p], _INCOMING[p]) for p in _OUTGOING}
"""(outgoing, incoming) for every protocol this version speaks."""

SENDS: Mapping[str, tuple[str, ...]] = {
    # outgoing actions -> events they are for the successor
    A_SEND_PREPARE: (PREPARE,),  # its fd batches belong to it
    A_SEND_FINAL: (FINAL,),
    A_SEND_UNCHANGED: (UNCHANGED,),
    A_SEND_ACK: (ACK,),
    A_SEND_ABORT: (ABORT,),
    # successor actions -> events they are for the outgoing host
    A_SAY_HELLO: (HELLO,),
    A_SEND_CHECKED: (CHECKED,),
    A_REFUSE_PREPARED: (ERROR,),
    A_REPLY_ERROR: (ERROR,),
    A_SEND_CONFIRM: (CONFIRM,),
    A_REFUSE_FINAL: (ERROR,),
    A_TAKE_OVER: (ADOPTED,),
    A_ORPHANED_AFTER_CONFIRM: (ADOPTED,),  # to nobody, in the end: sent only if the peer died
}
"""The messages each action sends, as the events they are at the other end; an action not listed
sends nothing."""

LOCAL = frozenset({EOF, MALFORMED, TIMEOUT, WARMED, OK, FAILED})
"""Events no peer sends: a table that refuses one of them has a hole, not a hostile peer."""


# -- helpers for the loops (no I/O either) ----------------------------------------------------------

def successor_event(msg: Mapping[str, object]) -> str:
    """The event a message to the successor is. A handover is ``prepare`` by its stage, otherwise
    final (``unchanged`` when it says so): the stage of a final handover was never checked."""
    if msg.get("op") == HANDOVER:
        if msg.get("stage") == STAGE_PREPARE:
            return PREPARE
        return UNCHANGED if msg.get("unchanged") else FINAL
    return event_of(msg, (FDS, ACK, ABORT))


def outgoing_event(msg: Mapping[str, object]) -> str:
    """The event an answer to the outgoing host is: an error reply (any op) by its errno, else its op."""
    return ERROR if msg.get("errno") else event_of(msg, (HELLO, CHECKED, CONFIRM, ADOPTED))


def refusal(table: Table, state: str, event: str, said: str | None = None) -> ProtocolError:
    """The EPROTO error for ``event`` refused in ``state``, naming the messages ``state`` accepts
    (``said``: how the peer's message is to be named, e.g. its raw op, instead of the event)."""
    peer = TO_SUCCESSOR if table.role == SUCCESSOR_ROLE else TO_OUTGOING
    wanted = [e for e in table.expects(state) if e in peer and e != ERROR]
    why = "expected " + " or ".join(repr(e) for e in wanted) if wanted else "no message was expected"
    if said is None:
        return ProtocolError(f"{table.channel} ({table.role}): {event!r} is not allowed in state {state}; {why}",
                             state, event)
    return ProtocolError(f"{said} in state {state} ({table.channel}, {table.role}); {why}", state, event)


def on_refused(state: str, event: str) -> str:
    """What the successor does with a message its table refuses, as it always did: a handover gets
    an error reply (the outgoing host waits for an answer to it), and a final one out of place
    ends the update (exit 2: the outgoing host, frozen, cancels); anything else is dropped with
    its fds. Once confirmed, only ack, abort or the end of the channel decide: the rest is dropped."""
    if state in (S_WAITING, S_CHECKED):
        if event == PREPARE:
            return A_REPLY_ERROR
        if event in (FINAL, UNCHANGED):
            return A_REFUSE_FINAL
    return A_IGNORE
