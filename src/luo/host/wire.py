"""Messages on the control socket: one JSON object per SOCK_SEQPACKET datagram, fds as SCM_RIGHTS.

SEQPACKET keeps message boundaries and ties the passed fds to the message that carries them,
which is what an ioctl argument struct does in the kernel. A reply always carries ``errno``
(0 on success), so every failure reaches libluo as the errno the kernel would give.
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

from luo.errors import LuoError

MAX_MSG = 4 << 20
SCM_MAX_FD = 253  # the kernel's limit of fds per SCM_RIGHTS message


def send_msg(sock: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(fds) > SCM_MAX_FD:
        raise LuoError(22, f"{len(fds)} fds in one message; at most {SCM_MAX_FD}")
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.sendall(data) if sock.type == socket.SOCK_STREAM else sock.send(data)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and its fds (close-on-exec), or None at EOF."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(SCM_MAX_FD * fds.itemsize),
                                       socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data and not fds:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise LuoError(90, "control message truncated")  # EMSGSIZE
    try:
        msg = json.loads(data)
    except ValueError as e:
        for fd in fds:
            os.close(fd)
        raise LuoError(22, f"malformed control message: {e}") from None
    if not isinstance(msg, dict):
        for fd in fds:
            os.close(fd)
        raise LuoError(22, "malformed control message: not an object")
    return msg, list(fds)


def ok(**fields: Any) -> dict[str, Any]:
    return {"errno": 0, **fields}


def error_reply(err: LuoError) -> dict[str, Any]:
    return {"errno": err.errno, "error": err.message}


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    """Turn an error reply back into the LuoError the host raised."""
    e = int(reply.get("errno", 0))
    if e:
        raise LuoError(e, str(reply.get("error", "")))
    return reply
