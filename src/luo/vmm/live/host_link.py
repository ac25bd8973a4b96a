"""The VMM's side of the host: libluo session + a registration connection for host requests.

The VMM and the host may be different installations (a VMM outlives the host that started it), so
the registration carries the VMM-host protocol both ways and each side checks the other's
(``luo.abi.VMM_HOST_PROTOCOL``, ``negotiate``) before the VMM serves any request.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from luo import abi
from luo.abi import VM_RAM_TOKEN, VM_STATE_TOKEN
from luo.client import Client, Session
from luo.client.connection import open_socket
from luo.errors import LuoError
from luo.host.runtime import RuntimeDir
from luo.host.vms import session_name
from luo.host.wire import raise_for, recv_msg, send_msg

log = logging.getLogger("luo.vmm")

T = TypeVar("T")


TAKEN_TIMEOUT = 15.0


def _while_taken(fn: Callable[[], T], what: str) -> T:
    """Retry ``fn`` while the VM's name is still taken (EEXIST) by the VMM it replaces, or while
    the host refuses new sessions (EBUSY) in the middle of an update.

    After a successor VMM resumes the guest, its predecessor exits within milliseconds and the
    host then drops the old session and registration; only in a host that survived a failed
    handover can they still be there when the successor asks. Polling is all there is: the
    host tells nobody when another process's session goes.
    """
    deadline = time.monotonic() + TAKEN_TIMEOUT
    while True:
        try:
            return fn()
        except LuoError as e:
            if e.errno not in (errno.EEXIST, errno.EBUSY) or time.monotonic() >= deadline:
                raise  # EBUSY: the host is between prepare and the end of an update
            log.info("the VM's %s is not available yet (%s); retrying", what, e.message)
        time.sleep(0.02)


class HostLink:
    def __init__(self, runtime: RuntimeDir, name: str, ram_in_pool: bool = False) -> None:
        self.runtime = runtime
        self.name = name
        # guest RAM in the host's memory pool (luo.pool): the pool preserves it, as extents the VM
        # owns, so the VM's session holds only its state memfd (the pool's memfd is preserved once)
        self.ram_in_pool = ram_in_pool
        self.client = Client(runtime.root, timeout=30.0)
        self.session: Session | None = None
        self.sock: socket.socket | None = None
        self.seq: object = None  # the host request being answered: its reply carries it back
        self.host_protocol = abi.UNVERSIONED  # what this VMM and its host speak, once registered

    def preserve(self, ram_fd: int, state_fd: int) -> None:
        """(Re)create the VM's session and preserve its RAM and state memfds in it."""
        s = _while_taken(lambda: self.client.create_session(session_name(self.name)), "session")
        if not self.ram_in_pool:
            s.preserve_fd(ram_fd, VM_RAM_TOKEN)
        s.preserve_fd(state_fd, VM_STATE_TOKEN)
        self.session = s

    def take_incoming(self) -> tuple[int, int]:
        """Retrieve the VM's session from the (new) host: its RAM and state fds."""
        s = self.client.retrieve_session(session_name(self.name))
        ram = -1 if self.ram_in_pool else s.retrieve_fd(VM_RAM_TOKEN)  # -1: the pool holds it
        state = s.retrieve_fd(VM_STATE_TOKEN)
        self.session = s
        return ram, state

    def finish_incoming(self) -> None:
        if self.session is not None and self.session.incoming:
            self.session.finish()
            self.session.close()
            self.session = None

    def drop_stale_incoming(self) -> None:
        """After a failed successor: finish whatever is left of the VM's incoming session."""
        try:
            s = self.client.retrieve_session(session_name(self.name))
        except LuoError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise
            return
        try:
            s.finish()
        except LuoError as e:  # a session kept for us after a host crash is outgoing: closing drops it
            if e.errno != errno.EINVAL:
                raise
        finally:
            s.close()

    def register(self, info: dict[str, Any], report: dict[str, Any] | None = None) -> socket.socket:
        return _while_taken(lambda: self._register(info, report), "registration")

    def _register(self, info: dict[str, Any], report: dict[str, Any] | None) -> socket.socket:
        sock = open_socket(self.runtime.socket, 60.0)
        send_msg(sock, {"op": "vm_register", "name": self.name, "pid": os.getpid(), "info": info,
                        "report": report, **abi.announce(abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST)})
        got = recv_msg(sock)
        if got is None:
            raise LuoError(errno.ECONNRESET, "the host went away while the VM registered")
        try:
            raise_for(got[0])  # a host that refuses this VMM's protocol says EPROTONOSUPPORT here
            self.host_protocol = abi.negotiate("VMM-host protocol", (abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST),
                                               abi.announced(got[0]), "the host", f"this VMM of VM {self.name!r}")
        except LuoError:
            sock.close()
            raise
        self.sock = sock
        return sock

    def answer(self, reply: dict[str, Any]) -> None:
        if self.sock is not None:
            try:
                send_msg(self.sock, {"reply": True, "seq": self.seq, "errno": 0, **reply})
            except OSError:
                pass

    def answer_error(self, err: LuoError) -> None:
        if self.sock is not None:
            try:
                send_msg(self.sock, {"reply": True, "seq": self.seq, "errno": err.errno, "error": err.message})
            except OSError:
                pass
