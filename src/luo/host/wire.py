"""Messages on the control socket: one JSON object per SOCK_SEQPACKET datagram, fds as SCM_RIGHTS.

SEQPACKET keeps message boundaries and ties the passed fds to the message that carries them,
which is what an ioctl argument struct does in the kernel. A reply always carries ``errno``
(0 on success), so every failure reaches libluo as the errno the kernel would give.
"""

from __future__ import annotations

import array
import errno
import itertools
import json
import math
import os
import re
import socket
import threading
from collections.abc import Iterable
from typing import Any

from luo.errors import LuoError

MAX_MSG = 4 << 20
# A reply above INLINE_MAX travels in a sealed memfd (``{"$blob": size}`` + the memfd as its last
# fd): a SOCK_SEQPACKET datagram cannot exceed the socket's send buffer (wmem_max, ~208 KiB by
# default), and ``luo status`` of 2000 sessions is about a megabyte. Bounded by MAX_BLOB.
INLINE_MAX = 128 << 10
MAX_BLOB = 64 << 20
BLOB_KEY = "$blob"
SCM_MAX_FD = 253  # the kernel's limit of fds per SCM_RIGHTS message
MAX_DEPTH = 32  # levels of JSON nesting a message may have; requests use three or four
MAX_ERROR = 1000  # characters of an error sentence in a reply

# A JSON string, or an unterminated one up to the end (still one match, so the scan stays linear).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 16


def send_msg(sock: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = (), *,
             large: bool = False) -> None:
    """Send one message. ``large``: a message above INLINE_MAX goes in a sealed memfd (replies of
    luod, which recv_msg unpacks); otherwise it must fit one datagram."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    if large and len(data) > INLINE_MAX and len(fds) < SCM_MAX_FD:
        if len(data) > MAX_BLOB:
            raise LuoError(errno.EMSGSIZE, f"message of {len(data)} bytes; at most {MAX_BLOB}")
        blob = _sealed_memfd(data)
        try:  # errno rides along, for a reader that only looks at it
            send_msg(sock, {"errno": msg.get("errno", 0), BLOB_KEY: len(data)}, [*fds, blob])
        finally:
            os.close(blob)
        return
    if len(fds) > SCM_MAX_FD:
        raise LuoError(22, f"{len(fds)} fds in one message; at most {SCM_MAX_FD}")
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.sendall(data) if sock.type == socket.SOCK_STREAM else sock.send(data)


def _sealed_memfd(data: bytes) -> int:
    import fcntl

    fd = os.memfd_create("luo-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                    | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unblob(msg: dict[str, Any], blob: int) -> dict[str, Any]:
    """The message a ``{"$blob": size}`` stands for, read from its memfd ``blob`` (not closed here)."""
    size = msg[BLOB_KEY]
    if set(msg) - {BLOB_KEY, "errno"} or isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_BLOB:
        raise LuoError(errno.EINVAL, "malformed control message: a bad $blob")
    out = bytearray()
    try:
        while len(out) < size:
            chunk = os.pread(blob, size - len(out), len(out))
            if not chunk:
                raise LuoError(errno.EINVAL, f"malformed control message: $blob of {len(out)} bytes, not {size}")
            out += chunk
    except OSError as e:
        raise LuoError(errno.EINVAL, f"malformed control message: $blob unreadable: {e.strerror}") from None
    inner = parse(bytes(out))
    if BLOB_KEY in inner:
        raise LuoError(errno.EINVAL, "malformed control message: a $blob inside a $blob")
    return inner


_local = threading.local()


def _buffer(size: int) -> memoryview:
    """A receive buffer of ``size`` bytes, reused by this thread: ``recvmsg(4 MiB)`` would allocate
    (mmap and unmap) 4 MiB for every message, about 20 µs each time, for replies of a few bytes."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _local.buf = bytearray(size)
    return memoryview(buf)[:size]


def recv_msg(sock: socket.socket, max_size: int = MAX_MSG,
             recv_flags: int = 0) -> tuple[dict[str, Any], list[int]] | None:
    """One message of at most ``max_size`` bytes and its fds (close-on-exec), or None at EOF.
    (The buffer is allocated once per thread, see ``_buffer``.) ``recv_flags``: e.g. MSG_DONTWAIT.

    Whatever the peer sent, this raises only OSError (from the socket) or LuoError: EMSGSIZE for a
    truncated message, EINVAL for anything that is not a JSON object within MAX_DEPTH levels with
    finite numbers. The received fds are closed on every error path: the caller never sees them.
    """
    fds = array.array("i")
    buf = _buffer(max_size)
    size, anc, flags, _ = sock.recvmsg_into([buf], socket.CMSG_SPACE(SCM_MAX_FD * fds.itemsize),
                                            socket.MSG_CMSG_CLOEXEC | recv_flags)
    data = bytes(buf[:size])
    try:
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data and not fds:
            return None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise LuoError(errno.EMSGSIZE, f"message truncated (at most {max_size} bytes and {SCM_MAX_FD} fds, "
                           "and only as many fds as the receiver may open)")
        msg = parse(data)
        if BLOB_KEY in msg:
            if not fds:
                raise LuoError(errno.EINVAL, "malformed control message: a $blob without its memfd")
            blob = fds.pop()
            try:
                msg = _unblob(msg, blob)
            finally:
                os.close(blob)
        return msg, list(fds)
    except BaseException:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise


def parse(data: bytes) -> dict[str, Any]:
    """A control message's JSON object, or LuoError(EINVAL) saying why not."""
    try:
        text = data.decode()  # UTF-8 only: json.loads would also guess UTF-16 and UTF-32
    except UnicodeDecodeError as e:
        raise LuoError(errno.EINVAL, f"malformed control message: not UTF-8 ({e.reason} at byte {e.start})") from None
    check_depth(data)
    try:
        msg = _DECODER.decode(text)
    except LuoError:
        raise
    except (ValueError, RecursionError, MemoryError) as e:  # RecursionError: cannot happen, see check_depth
        raise LuoError(errno.EINVAL, f"malformed control message: {_short(e)}") from None
    if not isinstance(msg, dict):
        raise LuoError(errno.EINVAL, "malformed control message: not an object")
    return msg


def check_depth(data: bytes, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before parsing it.

    json.loads recurses once per level: about 1,000 levels (a few KB of ``[``) raise
    RecursionError, and more could exhaust the C stack. No request needs more than a few levels.
    A message with at most ``limit`` brackets cannot be too deep, which is every normal request;
    otherwise strings are removed (a bracket inside a string is text; the message is UTF-8, where
    no byte of a multi-byte character is ASCII) and the running depth is computed in C over the
    remaining brackets, a chunk at a time so that a deep prefix stops it early.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return
    brackets = _STRING.sub(b"", data).translate(_DEPTH_STEP, _NOT_BRACKET)
    depth = 0
    for start in range(0, len(brackets), _CHUNK):
        running = list(itertools.accumulate(memoryview(brackets[start : start + _CHUNK]).cast("b"), initial=depth))
        if max(running) > limit:
            raise LuoError(errno.EINVAL, f"malformed control message: nested deeper than {limit} levels")
        depth = running[-1]


def _no_constant(name: str) -> Any:
    raise LuoError(errno.EINVAL, f"malformed control message: {name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity
        raise LuoError(errno.EINVAL, f"malformed control message: {_short(text)} is not a finite number")
    return value


# one decoder for every message: json.loads with hooks would build a new one per call (~4 µs)
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def _short(x: object, n: int = 200) -> str:
    s = str(x)
    return s if len(s) <= n else s[:n] + "..."


def ok(**fields: Any) -> dict[str, Any]:
    return {"errno": 0, **fields}


def error_reply(err: LuoError) -> dict[str, Any]:
    """The reply for a refusal; the sentence is bounded, so a reply always fits one datagram."""
    return {"errno": err.errno, "error": _short(err.message, MAX_ERROR)}


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    """Turn an error reply back into the LuoError the host raised."""
    e = int(reply.get("errno", 0))
    if e:
        raise LuoError(e, str(reply.get("error", "")))
    return reply


def close_fds(fds: Iterable[int]) -> None:
    """Close fds that are ours to drop; one already gone is no error (error paths call this)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
