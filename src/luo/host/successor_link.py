"""The outgoing host's end of the channel to its successor process.

The order of the messages and what each answer means are ``luo.protocol.host_successor.OUTGOING``
(per protocol: ``outgoing``); this class does the I/O. Every send is fed to the table before it
goes out (a send out of order is refused, EPROTO, before it reaches the wire) and every answer is
fed as it arrives: the row names the method that runs (``_ACTIONS``), and an answer the table has
no row for is refused with EPROTO naming the answers that were expected.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luo.abi import HANDOVER_OLDEST, HANDOVER_PROTOCOL, HANDOVER_UNANNOUNCED
from luo.errors import LuoError
from luo.host import faults
from luo.host.handover import send_final_tree, send_handover
from luo.host.procname import start_in_background
from luo.host.runtime import RuntimeDir
from luo.host.wire import recv_msg, send_msg
from luo.protocol import host_successor as hs
from luo.protocol.table import Cursor, ProtocolError

log = logging.getLogger("luod")


@dataclass
class Answer:
    """What the successor sent (or failed to send) while the link waited, for the row's action."""

    msg: dict[str, Any] = field(default_factory=dict)
    doing: str = ""  # what the successor was to do: "check the outgoing tree", ...
    timeout: float = 0.0
    error: LuoError | None = None  # the malformed message's error


class SuccessorLink:
    """The outgoing host's end: spawn (hello), prepare (checked), handover (confirm), acknowledge,
    wait_adopted; kill at any point to cancel."""

    def __init__(self, proc: subprocess.Popen[bytes], ch: socket.socket, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.ch = ch
        self.hello = hello
        self.runtime_root = Path(".")
        # our protocol's table until the hello says which one the successor speaks
        self.cursor = Cursor(hs.OUTGOING)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def spawn(cls, cmd: list[str], runtime: RuntimeDir, start_timeout: float) -> SuccessorLink:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [*cmd, "host", "--successor", str(theirs.fileno()), "--runtime-dir", str(runtime.root)]
        try:
            proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], start_new_session=True,
                                    stdin=subprocess.DEVNULL, env=faults.child_env())
        except OSError as e:
            mine.close()
            theirs.close()
            raise LuoError(errno.ENOEXEC, f"cannot start successor {argv[0]!r}: {e.strerror}") from None
        theirs.close()
        start_in_background(proc.pid)
        link = cls(proc, mine, {})
        link.runtime_root = runtime.root
        try:
            link._await(start_timeout, "start and import")  # hello: check_protocol
        except BaseException:
            link.kill()
            raise
        return link

    @property
    def protocol(self) -> int:
        """The successor's handover protocol; versions before it was announced spoke 2."""
        return int(self.hello.get("protocol", HANDOVER_UNANNOUNCED))

    def check_protocol(self) -> None:
        """Refuse, before anything is prepared, a successor whose messages this host cannot speak."""
        if self.protocol < HANDOVER_OLDEST:
            raise LuoError(errno.EPROTONOSUPPORT,
                           f"successor pid {self.pid} speaks handover protocol {self.protocol}; "
                           f"this host speaks {HANDOVER_OLDEST} to {HANDOVER_PROTOCOL}")

    @property
    def takes_unchanged(self) -> bool:
        """Whether the successor accepts "unchanged" for a final tree equal to the prepared one."""
        return hs.UNCHANGED in hs.outgoing(self.protocol).expects(hs.O_PREPARED)

    # -- the table's two kinds of events: our sends, and what arrives ------------------------------

    def _send(self, event: str, **args: Any) -> None:
        """Feed one of our sends to the table (EPROTO out of order, nothing sent) and run its row."""
        _ACTIONS[self.cursor.feed(event)](self, **args)

    def _await(self, timeout: float, doing: str, capped: bool = True) -> dict[str, Any]:
        """Read the successor's next message (or its absence) and run the row it selects; returns
        the message. The rows for anything but the awaited answer raise."""
        if capped:
            timeout = faults.participant_timeout(timeout)
        answer = Answer(doing=doing, timeout=timeout)
        try:
            self.ch.settimeout(timeout)
            got = recv_msg(self.ch)
        except TimeoutError:
            event = hs.TIMEOUT
        except OSError:
            event = hs.EOF
        except LuoError as e:
            event, answer.error = hs.MALFORMED, e
        else:
            if got is None:
                event = hs.EOF
            else:
                answer.msg, fds = got
                for fd in fds:
                    os.close(fd)
                event = hs.outgoing_event(answer.msg)
        try:
            action = self.cursor.feed(event)
        except ProtocolError:
            raise hs.refusal(self.cursor.table, self.cursor.state, event,
                             f"successor pid {self.pid} answered {answer.msg.get('op')!r}") from None
        _ACTIONS[action](self, answer=answer)
        return answer.msg

    # -- what the update calls -----------------------------------------------------------------

    def prepare(self, blob: bytes, fds: list[int], listener: int, timeout: float,
                store_keys: list[str] | None = None) -> None:
        """Hand over everything but the final tree while the workloads run; the successor checks
        it understands every compatible and builds its host. Nothing is frozen yet."""
        self._send(hs.PREPARE, blob=blob, fds=fds, listener=listener, store_keys=store_keys)
        self._await(timeout, "check the outgoing tree")

    def handover(self, blob: bytes | None, timeout: float) -> dict[str, Any]:
        """The final tree (None: unchanged, for a successor that takes it); returns its confirm."""
        self._send(hs.UNCHANGED if blob is None else hs.FINAL, blob=blob)
        faults.hold("handover", self.runtime_root)
        return self._await(timeout, "confirm the handover")

    def acknowledge(self, phases_ms: dict[str, float], timeline: list[dict[str, Any]] | None = None) -> None:
        self._send(hs.ACK, phases_ms=phases_ms, timeline=timeline)

    def wait_adopted(self, timeout: float = 5.0) -> bool:
        """Wait until the successor has taken over as the service's main process (see sdnotify).
        An answer out of place is no adoption either: logged, and the update rolls back."""
        try:
            self._await(timeout, "take over", capped=False)
        except ProtocolError as e:
            log.warning("%s", e.message)
            return False
        return self.cursor.state == hs.O_ADOPTED

    def kill(self) -> None:
        """Cancel: abort (before the ack; after it nothing reads the channel), then end the process."""
        try:
            self._send(hs.ABORT)
        except ProtocolError:
            pass  # acknowledged, or aborted already: only the process is left to end
        self.ch.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
        self.proc.wait()

    # -- the actions the rows name ---------------------------------------------------------------

    def _check_hello(self, answer: Answer) -> None:
        self.hello = answer.msg
        self.check_protocol()
        self.cursor.table = hs.outgoing(self.protocol)  # from here on, the protocol it speaks

    def _send_prepare(self, blob: bytes, fds: list[int], listener: int, store_keys: list[str] | None) -> None:
        try:
            send_handover(self.ch, blob, fds, listener, store_keys)
        except OSError as e:
            raise LuoError(errno.ESRCH, f"successor pid {self.pid} is gone: {e.strerror}") from None

    def _send_final(self, blob: bytes | None) -> None:
        try:
            send_final_tree(self.ch, blob)
        except OSError as e:
            raise LuoError(errno.ESRCH, f"successor pid {self.pid} is gone: {e.strerror}") from None

    def _send_ack(self, phases_ms: dict[str, float], timeline: list[dict[str, Any]] | None) -> None:
        try:
            send_msg(self.ch, {"op": hs.ACK, "phases_ms": phases_ms, "timeline": timeline or []})
        except OSError as e:
            raise LuoError(errno.ESRCH, f"successor pid {self.pid} died after confirming: {e.strerror}") from None

    def _send_abort(self) -> None:
        try:
            send_msg(self.ch, {"op": hs.ABORT})
        except OSError:
            pass  # gone already: the kill that follows is for a process that may not have seen EOF

    def _accept(self, answer: Answer) -> None:
        """The awaited answer: the table has moved on; ``_await`` returns it."""

    def _raise_refused(self, answer: Answer) -> None:
        msg = answer.msg
        kept = f" (refused tree kept in {msg['refused_tree']})" if msg.get("refused_tree") else ""
        raise LuoError(int(msg["errno"]), f"successor pid {self.pid} refused: {msg.get('error', '')}{kept}")

    def _raise_gone(self, answer: Answer) -> None:
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        raise LuoError(errno.ESRCH, f"successor pid {self.pid} exited (status {code}) before it could {answer.doing}")

    def _raise_timed_out(self, answer: Answer) -> None:
        raise LuoError(errno.ETIMEDOUT,
                       f"successor pid {self.pid} did not {answer.doing} within {answer.timeout:g} s")

    def _raise_malformed(self, answer: Answer) -> None:
        assert answer.error is not None
        raise answer.error

    def _not_adopted(self, answer: Answer) -> None:
        """Dead, silent or refusing after the ack: ``wait_adopted`` answers False."""


_ACTIONS: dict[str, Callable[..., None]] = {
    "": SuccessorLink._accept,
    hs.A_CHECK_PROTOCOL: SuccessorLink._check_hello,
    hs.A_SEND_PREPARE: SuccessorLink._send_prepare,
    hs.A_SEND_FINAL: SuccessorLink._send_final,
    hs.A_SEND_UNCHANGED: SuccessorLink._send_final,  # blob None: send_final_tree says unchanged
    hs.A_SEND_ACK: SuccessorLink._send_ack,
    hs.A_SEND_ABORT: SuccessorLink._send_abort,
    hs.A_RAISE_REFUSED: SuccessorLink._raise_refused,
    hs.A_RAISE_GONE: SuccessorLink._raise_gone,
    hs.A_RAISE_TIMED_OUT: SuccessorLink._raise_timed_out,
    hs.A_RAISE_MALFORMED: SuccessorLink._raise_malformed,
    hs.A_NOT_ADOPTED: SuccessorLink._not_adopted,
}
"""Every action of the outgoing tables, as the method that runs it."""
