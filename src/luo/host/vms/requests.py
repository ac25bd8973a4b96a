"""Requests from the host to VMM processes: sent to all, then every answer collected.

The VMMs work in parallel (each warms its successor, pauses or resumes its own guest), so a
request goes out to every VMM before the first answer is awaited. Each answer carries the request's
``seq``: a late answer to an earlier request is never taken for this one's.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from luo.errors import LuoError
from luo.host.vms.entry import VmEntry
from luo.host.wire import recv_msg, send_msg


class PartialFailure(LuoError):
    """Some VMMs failed a request: the errno of the first one that gave one (else EIO), every reason."""

    def __init__(self, answers: dict[str, dict[str, Any]], errors: list[str]) -> None:
        errnos = [int(a["errno"]) for a in answers.values() if a.get("errno")]
        super().__init__(errnos[0] if errnos else errno.EIO, "; ".join(errors))
        self.answers = answers


class Requests:
    def __init__(self, drop_conn: Callable[[Any], None]) -> None:
        self.drop_conn = drop_conn  # the host forgets a connection whose VMM is dead
        self.seq = 0

    def ask(self, vms: Sequence[VmEntry], msg: dict[str, Any], timeout: float,
            fds_for: dict[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
        """Send ``msg`` to each VMM, then collect every answer by ``timeout``. Raises
        PartialFailure (with the good answers) when any VMM refused, timed out or died."""
        sent: list[VmEntry] = []
        errors: list[str] = []
        self.seq += 1
        msg = {**msg, "seq": self.seq}
        for v in vms:
            try:
                if v.conn is None:
                    raise OSError(errno.ENOTCONN, "not connected")
                send_msg(v.conn.sock, msg, (fds_for or {}).get(v.name, []))
                sent.append(v)
            except OSError as e:
                errors.append(f"{v.name}: {e.strerror}")
        answers: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        for v in sent:
            got, gone = self._answer(v, msg["seq"], deadline)
            if gone and v.conn is not None:
                # say so now, not at the next turn of the loop: its successor VMM may own the guest
                # already (a VMM that dies after saving hands it on), and must not be killed for it
                self.drop_conn(v.conn)
            if got is None:
                errors.append(f"{v.name}: VMM pid {v.pid} did not answer {msg['op']}")
                continue
            answers[v.name] = got
            if got.get("errno"):
                errors.append(f"{v.name}: {got.get('error', os.strerror(int(got['errno'])))}")
        if errors:
            raise PartialFailure(answers, errors)
        return answers

    @staticmethod
    def _answer(v: VmEntry, seq: int, deadline: float) -> tuple[dict[str, Any] | None, bool]:
        """(the answer or None, whether the VMM's connection ended)."""
        conn = v.conn
        assert conn is not None
        try:
            while True:
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                got = recv_msg(conn.sock)
                if got is None:
                    return None, True  # EOF: the VMM is dead
                reply, fds = got
                for fd in fds:
                    os.close(fd)
                if reply.get("seq") == seq:
                    return reply, False
        except (TimeoutError, OSError, LuoError):
            return None, False
        finally:
            if conn.sock.fileno() >= 0:
                conn.sock.settimeout(None)
