"""The control-socket operations: /dev/liveupdate's ioctls, one function each.

Each op receives the connection, the request and the fds that came with it (closed by the loop
afterwards, so an op ``os.dup``s what it keeps) and returns the reply and fds to send back. Each
op checks every field it reads, and the fds, through luo.host.fields before it changes anything:
a request is refused whole or carried out.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import os
import socket
from typing import TYPE_CHECKING, Any, cast

from luo.abi import HOST_SESSION_PREFIX
from luo.core.participants import PROGRAM_MAX, SESSION_NAME_MAX
from luo.errors import LuoError
from luo.host import fields
from luo.host.wire import ok

if TYPE_CHECKING:
    from luo.host.daemon import Conn, Host, Reply


def _name(msg: dict[str, Any]) -> str:
    """A client's session name: the kernel's is a NUL-terminated ``char name[64]``; names starting
    with ``luo:`` are the host's own (the memory pool's memfd crosses in one), EPERM (a luo rule
    the kernel does not have)."""
    name = fields.text(msg, "name", SESSION_NAME_MAX)
    if name.startswith(HOST_SESSION_PREFIX):
        raise LuoError(errno.EPERM, f"session names starting with {HOST_SESSION_PREFIX!r} are the host's own")
    return name


def _program(msg: dict[str, Any]) -> str:
    """What the client says it acts for (``luo run``: "selftest pid 123"): optional, shown in
    status as the client's claim, never trusted for anything."""
    return fields.text(msg, "program", PROGRAM_MAX, "")


def device_holder(host: Host) -> dict[str, Any] | None:
    """``{"pid", "program"}`` of the connection holding /dev/liveupdate (op ``open_device``), or None."""
    c = host.device
    if c is None:
        return None
    return {"pid": c.peer.pid, "program": c.extra.get("program", "")}


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
        """EINVAL for a bad name, EEXIST for a name in use (6.19 and v7.2)."""
        fields.no_fds(fds, "create_session")
        name, program = _name(msg), _program(msg)
        handle = host.orch.create_session(name, owner=dataclasses.replace(c.peer.owner(), program=program))
        return ok(name=handle.name), [session_fd(c, handle)]

    def retrieve_session(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """ENOENT for a name the predecessor did not hand over, EINVAL when retrieved before (6.19, v7.2)."""
        fields.no_fds(fds, "retrieve_session")
        name, program = _name(msg), _program(msg)
        kept = host.recovered_sessions.pop(name, None)
        if kept is not None and not kept.closed:  # an outgoing session luod held for its owner since a crash
            return ok(name=name, recovered=True), [session_fd(c, kept)]
        handle = host.orch.retrieve_session(name, by=dataclasses.replace(c.peer.owner(), program=program))
        return ok(name=handle.name), [session_fd(c, handle)]

    def open_device(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Make this connection the one opener of /dev/liveupdate, for ``luo run``'s emulation:
        6.19/v7.2 let one process at a time hold it, a second open is EBUSY. Only exclusion among
        openers: every other client of the socket works as before (luod is the LUO agent). The
        holder asking again keeps it (its program is updated)."""
        fields.no_fds(fds, "open_device")
        program = _program(msg)
        holder = host.device
        if holder is not None and holder is not c and holder.sock.fileno() >= 0:
            what = holder.extra.get("program") or "no program given"
            raise LuoError(errno.EBUSY, f"/dev/liveupdate is open: held by pid {holder.peer.pid} "
                           f"({what}) until it closes it")
        host.device = c
        c.extra["program"] = program
        return ok(pid=os.getpid(), liveupdate_number=host.orch.liveupdate_number), []

    def close_device(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Let /dev/liveupdate go (also done when the holder's connection closes)."""
        fields.no_fds(fds, "close_device")
        if host.device is not c:
            raise LuoError(errno.EINVAL, "this connection does not hold /dev/liveupdate (open_device first)")
        host.device = None
        return ok(), []

    def preserved_size(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """Is the file with inode (``dev``, ``ino``) frozen by LUO (outgoing preserved, or incoming
        and not finished), and at which size (a memfd's; null for other kinds)? For ``luo run``,
        which refuses ftruncate/fallocate on such a memfd with EPERM, as the kernel does from
        preserve until finish. Reading, so not privileged: it names no file, it answers for an
        inode the asker already has open."""
        fields.no_fds(fds, "preserved_size")
        dev, ino = fields.u64(msg, "dev"), fields.u64(msg, "ino")
        preserved, size = host.orch.preserved_size((dev, ino))
        return ok(preserved=preserved, size=size), []

    def status(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "status")
        st = host.orch.status()
        st["pid"] = os.getpid()
        st["device"] = device_holder(host)
        st["runtime_dir"] = str(host.runtime.root)
        if host.mirror is not None:
            st["fd_store"] = {"kind": host.mirror.store.kind, "keys": host.mirror.fd_count,
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
        "open_device": (open_device, True),
        "close_device": (close_device, True),
        "preserved_size": (preserved_size, False),
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
        """``reserved`` is FINISH's ``u32 reserved``: non-zero is EINVAL (v7.3; before, ignored)."""
        fields.no_fds(fds, "finish")
        if fields.u64(msg, "reserved", 0) != 0:
            raise LuoError(errno.EINVAL, "reserved: must be 0")
        c.session.finish()
        return ok(), []

    def s_get_name(c: Conn, msg: dict, fds: list[int]) -> Reply:
        """v7.2 GET_NAME, on a created and on a retrieved session."""
        fields.no_fds(fds, "get_name")
        return ok(name=c.session.get_name()), []

    def s_status(c: Conn, msg: dict, fds: list[int]) -> Reply:
        fields.no_fds(fds, "status")
        return ok(session=host.orch.session_status(c.session)), []

    host.session_ops.update({
        "preserve_fd": (s_preserve, True),
        "retrieve_fd": (s_retrieve, True),
        "finish": (s_finish, True),
        "get_name": (s_get_name, False),
        "status": (s_status, False),
    })
