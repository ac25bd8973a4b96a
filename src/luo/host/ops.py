"""The control-socket operations: /dev/liveupdate's ioctls, one function each.

Each op receives the connection, the request and the fds that came with it (closed by the loop
afterwards, so an op ``os.dup``s what it keeps) and returns the reply and fds to send back. Each
op checks every field it reads, and the fds, through luo.host.fields before it changes anything:
a request is refused whole or carried out.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
from typing import TYPE_CHECKING, Any, cast

from luo.core.participants import SESSION_NAME_MAX
from luo.errors import LuoError
from luo.host import fields
from luo.host.wire import ok

if TYPE_CHECKING:
    from luo.host.daemon import Conn, Host, Reply


def _name(msg: dict[str, Any]) -> str:
    """A session name: the kernel's is a NUL-terminated ``char name[64]``."""
    return fields.text(msg, "name", SESSION_NAME_MAX)


def sessions_of(host: Host) -> list[dict[str, Any]]:
    """The sessions part of the orchestrator's status (JSON-shaped)."""
    return cast(list[dict[str, Any]], host.orch.status().get("sessions", []))


def install(host: Host) -> None:

    def get_state(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "get_state")
        return ok(state=int(host.orch.state), label=host.orch.state.label, pid=os.getpid(),
                  liveupdate_number=host.orch.liveupdate_number), []

    def preserve_fd(c: Conn, msg: dict, fds: list[int]) -> Reply:
        (one,) = fields.fds_exactly(fds, 1, "preserve_fd")
        token = fields.u64(msg, "token", None)  # RFC v2: no token means the kernel assigns one
        fd = os.dup(one)
        try:
            token = host.orch.preserve_fd(fd, token, owner=c.peer.owner())
        except BaseException:
            os.close(fd)
            raise
        return ok(token=token), []

    def unpreserve_fd(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "unpreserve_fd")
        host.orch.unpreserve_fd(fields.u64(msg, "token"))
        return ok(), []

    def restore_fd(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "restore_fd")
        return ok(), [host.orch.restore_fd(fields.u64(msg, "token"))]

    def event(name: str):
        def run(c: Conn, msg: dict, fds: list[int]) -> Reply:
            fields.no_fds(fds, name)
            try:
                getattr(host.orch, name)()
            finally:
                host.settle()
            return ok(state=int(host.orch.state), label=host.orch.state.label), []

        return run

    def session_fd(c: Conn, handle: Any) -> int:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host.add_conn(mine, c.peer, session=handle)
        fd = theirs.detach()
        return fd

    def create_session(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "create_session")
        handle = host.orch.create_session(_name(msg), owner=c.peer.owner())
        return ok(name=handle.name), [session_fd(c, handle)]

    def retrieve_session(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "retrieve_session")
        name = _name(msg)
        kept = host.recovered_sessions.pop(name, None)
        if kept is not None and not kept.closed:  # an outgoing session luod held for its owner since a crash
            return ok(name=name, recovered=True), [session_fd(c, kept)]
        handle = host.orch.retrieve_session(name)
        return ok(name=handle.name), [session_fd(c, handle)]

    def status(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "status")
        st = host.orch.status()
        st["pid"] = os.getpid()
        st["runtime_dir"] = str(host.runtime.root)
        if host.mirror is not None:
            st["fd_store"] = {"kind": host.mirror.store.kind, "keys": len(host.mirror.kept),
                              "error": host.mirror.failed}
        if host.recovered is not None:
            st["recovered"] = {**host.recovered, "held_sessions": sorted(
                n for n, h in host.recovered_sessions.items() if not h.closed)}
        for ext in host.extensions:
            st.update(ext.status())
        if host.last_update:
            st["last_update"] = host.last_update
        return ok(status=st), []

    def kho_dump(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "kho_dump")
        which = fields.choice(msg, "which", ("incoming", "outgoing"), "incoming")
        if which == "incoming":
            if host.incoming_blob is None:
                raise LuoError(errno.ENODATA, "no incoming KHO tree: this host did not start from a live update")
            blob = host.incoming_blob
        else:
            from luo.host.tree import outgoing_blob

            blob = outgoing_blob(host)
        return ok(blob=base64.b64encode(blob).decode()), []

    def update(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Its fields are checked by run_update, before anything starts."""
        from luo.host.update import run_update

        fields.no_fds(fds, "update")
        return ok(**run_update(host, msg)), []

    host.ops.update({
        "get_state": (get_state, False),
        "preserve_fd": (preserve_fd, True),
        "unpreserve_fd": (unpreserve_fd, True),
        "restore_fd": (restore_fd, True),
        "prepare": (event("prepare"), True),
        "freeze": (event("freeze"), True),
        "cancel": (event("cancel"), True),
        "finish": (event("finish"), True),
        "create_session": (create_session, True),
        "retrieve_session": (retrieve_session, True),
        "status": (status, False),
        "kho_dump": (kho_dump, False),
        "update": (update, True),
    })

    # -- on a session fd ---------------------------------------------------------------
    def s_preserve(c: Conn, msg: dict, fds: list[int]) -> Reply:
        (one,) = fields.fds_exactly(fds, 1, "preserve_fd")
        token = fields.u64(msg, "token")
        fd = os.dup(one)
        try:
            c.session.preserve_fd(fd, token)
        except BaseException:
            os.close(fd)
            raise
        return ok(), []

    def s_retrieve(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "retrieve_fd")
        return ok(), [c.session.retrieve_fd(fields.u64(msg, "token"))]

    def s_finish(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "finish")
        c.session.finish()
        return ok(), []

    def s_status(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "status")
        name = c.session.name
        for s in sessions_of(host):
            if s.get("name") == name:
                return ok(session=s), []
        raise LuoError(errno.ENOENT, f"session {name!r} is gone")

    host.session_ops.update({
        "preserve_fd": (s_preserve, True),
        "retrieve_fd": (s_retrieve, True),
        "finish": (s_finish, True),
        "status": (s_status, False),
    })
