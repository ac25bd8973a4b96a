"""The outgoing host's end of the channel to its successor process."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from luo.abi import HANDOVER_OLDEST, HANDOVER_PROTOCOL, HANDOVER_UNANNOUNCED
from luo.errors import LuoError
from luo.host import faults
from luo.host.handover import send_final_tree, send_handover
from luo.host.procname import start_in_background
from luo.host.runtime import RuntimeDir
from luo.host.wire import recv_msg, send_msg


class SuccessorLink:
    def __init__(self, proc: subprocess.Popen[bytes], ch: socket.socket, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.ch = ch
        self.hello = hello
        self.runtime_root = Path(".")

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
            link.hello = link._expect("hello", start_timeout, "start and import")
            link.check_protocol()
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
        return self.protocol >= 3

    def _expect(self, what: str, timeout: float, doing: str) -> dict[str, Any]:
        timeout = faults.participant_timeout(timeout)
        self.ch.settimeout(timeout)
        try:
            got = recv_msg(self.ch)
        except TimeoutError:
            raise LuoError(errno.ETIMEDOUT, f"successor pid {self.pid} did not {doing} within {timeout:g} s") from None
        except OSError:
            got = None
        if got is None:
            try:
                code = self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
            raise LuoError(errno.ESRCH, f"successor pid {self.pid} exited (status {code}) before it could {doing}")
        msg, fds = got
        for fd in fds:
            os.close(fd)
        if msg.get("errno"):
            kept = f" (refused tree kept in {msg['refused_tree']})" if msg.get("refused_tree") else ""
            raise LuoError(int(msg["errno"]), f"successor pid {self.pid} refused: {msg.get('error', '')}{kept}")
        if msg.get("op", what) != what:
            raise LuoError(errno.EPROTO, f"successor answered {msg.get('op')!r}, expected {what!r}")
        return msg

    def prepare(self, blob: bytes, fds: list[int], listener: int, timeout: float,
                store_keys: list[str] | None = None) -> None:
        """Hand over everything but the final tree while the workloads run; the successor checks
        it understands every compatible and builds its host. Nothing is frozen yet."""
        try:
            send_handover(self.ch, blob, fds, listener, store_keys)
        except OSError as e:
            raise LuoError(errno.ESRCH, f"successor pid {self.pid} is gone: {e.strerror}") from None
        self._expect("checked", timeout, "check the outgoing tree")

    def handover(self, blob: bytes | None, timeout: float) -> dict[str, Any]:
        try:
            send_final_tree(self.ch, blob)
        except OSError as e:
            raise LuoError(errno.ESRCH, f"successor pid {self.pid} is gone: {e.strerror}") from None
        faults.hold("handover", self.runtime_root)
        return self._expect("confirm", timeout, "confirm the handover")

    def acknowledge(self, phases_ms: dict[str, float], timeline: list[dict[str, Any]] | None = None) -> None:
        try:
            send_msg(self.ch, {"op": "ack", "phases_ms": phases_ms, "timeline": timeline or []})
        except OSError as e:
            raise LuoError(errno.ESRCH, f"successor pid {self.pid} died after confirming: {e.strerror}") from None

    def wait_adopted(self, timeout: float = 5.0) -> bool:
        """Wait until the successor has taken over as the service's main process (see sdnotify)."""
        try:
            self.ch.settimeout(timeout)
            got = recv_msg(self.ch)
        except (TimeoutError, OSError):
            return False
        return got is not None and got[0].get("op") == "adopted"

    def kill(self) -> None:
        try:
            send_msg(self.ch, {"op": "abort"})
        except OSError:
            pass
        self.ch.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
        self.proc.wait()
