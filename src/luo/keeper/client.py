"""luod's side of the keeper: connect (starting a keeper if none runs) and make synchronous calls.

Each call waits for its reply, so a put that returned is held by the keeper. If the connection
breaks (the keeper was killed, or restarted), the call reconnects once, starting a new keeper,
and is retried: put, drop and meta are idempotent, so a retry after a request the old keeper had
already handled does no harm. A new keeper holds nothing: the store notices the change of keeper
``instance`` on reconnect and calls ``on_lost`` so that the caller can put everything again.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from luo.abi import KEEPER_PROTOCOL
from luo.errors import LuoError
from luo.host.handover import blob_memfd, read_blob
from luo.host.wire import close_fds, raise_for, send_msg
from luo.keeper.proto import LOG_NAME, MAX_SOCKET_PATH, SOCKET_NAME, recv
from luo.keeper.store import BATCH, MAX_META, validate_key

# What the keeper must not inherit from luod's environment: it talks to no service manager, and
# systemd's socket-passing variables describe luod's fds, not its own.
_NOT_INHERITED = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "FDSTORE", "WATCHDOG_PID",
                  "WATCHDOG_USEC")


def keeper_command() -> list[str]:
    return [sys.executable, "-m", "luo"]


def log_tail(root: Path, lines: int = 5) -> str:
    try:
        with open(root / LOG_NAME, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


def spawn_keeper(root: Path) -> subprocess.Popen[bytes]:
    """Start ``luo keeper`` detached from the caller: a session of its own (a signal to luod's
    process group or session does not reach it), stdin/stdout on /dev/null, stderr appended to
    ``<root>/keeper.log``, no fds but those three."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    with open(root / LOG_NAME, "ab") as logf:
        return subprocess.Popen([*keeper_command(), "--runtime-dir", str(root), "keeper"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                                env=env, cwd="/", start_new_session=True, close_fds=True)


def _try_connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(str(path))
        return s
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    except PermissionError:
        s.close()
        raise LuoError(errno.EACCES, f"not allowed to connect to {path} (root or the keeper's user only)") from None
    except OSError as e:
        s.close()
        raise LuoError(e.errno or errno.EIO, f"cannot connect to {path}: {e.strerror}") from None


def connect_keeper(root: Path, timeout: float = 10.0, start: bool = True) -> socket.socket:
    """A connection to the keeper of ``root``, starting one when nothing listens.

    Waiting for the new keeper polls connect() with a short backoff: a socket file appearing is no
    event one can wait on. Two callers starting keepers at once is fine (the keeper's lock lets one
    serve; the other exits 0 and its starter connects to the winner). A started keeper that exits
    with an error ends the wait at once, with the tail of keeper.log.
    """
    root = root.absolute()  # the keeper runs in /, and kill_all finds it by this path
    path = root / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LuoError(errno.ENAMETOOLONG, f"{path}: too long for a unix socket (at most {MAX_SOCKET_PATH} bytes)")
    s = _try_connect(path)
    if s is not None:
        return s
    if not start:
        raise LuoError(errno.ECONNREFUSED, f"no fd keeper listens on {path}")
    proc = spawn_keeper(root)
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        s = _try_connect(path)
        if s is not None:
            return s
        code = proc.poll()
        if code not in (None, 0):  # 0: another keeper won the start; wait for it to listen
            raise LuoError(errno.ESRCH, f"the fd keeper exited with status {code} before listening on {path}: "
                           f"{log_tail(root) or 'nothing in ' + LOG_NAME}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise LuoError(errno.ETIMEDOUT, f"no fd keeper listens on {path} {timeout:g} s after starting one: "
                           f"{log_tail(root) or 'nothing in ' + LOG_NAME}")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)


class KeeperStore:
    """The FdStore backed by a keeper process (see luo.keeper.server).

    ``on_lost`` (settable) is called when a reconnect finds a different keeper than before: the
    old one died and everything it held is gone, so the caller should put it all again. It runs
    before the call that noticed is retried, on a working connection.
    """

    kind = "keeper"

    def __init__(self, runtime_root: Path, *, timeout: float = 10.0, start: bool = True) -> None:
        self.root = Path(runtime_root).absolute()
        self.timeout = timeout
        self.start = start
        self.on_lost: Callable[[], None] | None = None
        self.instance: str | None = None
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._ensure()

    # -- connection ------------------------------------------------------------------------
    def _ensure(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = connect_keeper(self.root, self.timeout, self.start)
        try:
            send_msg(sock, {"op": "ping"})
            got = recv(sock)
            if got is None:
                raise LuoError(errno.ECONNRESET, "the fd keeper closed the connection")
            reply, fds = got
            for fd in fds:
                os.close(fd)
            raise_for(reply)
            if reply.get("protocol") != KEEPER_PROTOCOL:  # exact match: the rule is in luo.abi
                raise LuoError(errno.EPROTO, f"the fd keeper speaks protocol {reply.get('protocol')}, "
                               f"this luo {KEEPER_PROTOCOL}")
        except BaseException:
            sock.close()
            raise
        previous, self.instance, self.pid = self.instance, str(reply["instance"]), int(reply["pid"])
        self._sock = sock
        if previous is not None and previous != self.instance and self.on_lost is not None:
            self.on_lost()
        return sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _request(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
                 ) -> tuple[dict[str, Any], list[int]] | None:
        """Send ``msg`` and return the reply with its fds (error replies raised, their fds
        closed); None when the connection broke, which also disconnects."""
        sock = self._ensure()
        try:
            send_msg(sock, msg, fds)
        except OSError as e:
            return self._broken(e)
        got = self._recv()
        if got is None:
            return None
        reply, rfds = got
        try:
            raise_for(reply)
        except LuoError:
            close_fds(rfds)
            raise
        return reply, rfds

    def _recv(self) -> tuple[dict[str, Any], list[int]] | None:
        assert self._sock is not None
        try:
            got = recv(self._sock)
        except OSError as e:
            return self._broken(e)
        if got is None:
            self._disconnect()
        return got

    def _broken(self, e: OSError) -> None:
        """A connection that broke (the keeper died) is dropped, to be redone; any other error is
        the caller's."""
        if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN):
            raise LuoError(e.errno or errno.EIO, f"fd keeper: {e.strerror}") from None
        self._disconnect()
        return None

    def _call(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
        for _ in range(2):
            got = self._request(msg, fds)
            if got is not None:
                close_fds(got[1])
                return got[0]
        raise LuoError(errno.EPIPE, f"the fd keeper on {self.root / SOCKET_NAME} went away twice during one call")

    # -- FdStore -----------------------------------------------------------------------------
    def put(self, key: str, fd: int) -> None:
        self._call({"op": "put", "key": validate_key(key)}, (fd,))

    def put_many(self, items: Iterable[tuple[str, int]]) -> None:
        batch: list[tuple[str, int]] = []
        for key, fd in items:
            batch.append((validate_key(key), fd))
            if len(batch) == BATCH:
                self._put_batch(batch)
                batch = []
        if batch:
            self._put_batch(batch)

    def _put_batch(self, batch: list[tuple[str, int]]) -> None:
        self._call({"op": "put", "keys": [k for k, _ in batch]}, [fd for _, fd in batch])

    def drop(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(validate_key(key))
            if len(batch) == BATCH:  # bounded, so the datagram stays small (keys are <= 200 bytes)
                self._call({"op": "drop", "keys": batch})
                batch = []
        if batch:
            self._call({"op": "drop", "keys": batch})

    def set_meta(self, meta: bytes) -> None:
        if len(meta) > MAX_META:
            raise LuoError(errno.EFBIG, f"fd store metadata of {len(meta)} bytes; at most {MAX_META}")
        fd = blob_memfd(bytes(meta), "luo-keeper-meta")
        try:
            self._call({"op": "meta", "size": len(meta)}, (fd,))
        finally:
            os.close(fd)

    def load(self) -> tuple[bytes | None, dict[str, int]]:
        for _ in range(2):
            got = self._load_once()
            if got is not None:
                return got
        raise LuoError(errno.EPIPE, f"the fd keeper on {self.root / SOCKET_NAME} went away twice during a load")

    def _load_once(self) -> tuple[bytes | None, dict[str, int]] | None:
        got = self._request({"op": "load"})
        if got is None:
            return None
        head, head_fds = got
        out: dict[str, int] = {}
        complete = False
        try:
            meta_size = head.get("meta_size")
            meta: bytes | None = None
            if meta_size is not None:
                if len(head_fds) != 1 or not isinstance(meta_size, int):
                    raise LuoError(errno.EPROTO, f"keeper load reply: {len(head_fds)} fds, meta_size {meta_size!r}")
                meta = read_blob(head_fds[0], meta_size)
                if len(meta) != meta_size:
                    raise LuoError(errno.EPROTO, f"keeper meta memfd holds {len(meta)} bytes, not {meta_size}")
            elif head_fds:
                raise LuoError(errno.EPROTO, "keeper load reply carries fds but no metadata")
            count = head.get("count")
            if not isinstance(count, int):
                raise LuoError(errno.EPROTO, f"keeper load reply: count {count!r}")
            while len(out) < count:
                got = self._recv()
                if got is None:
                    return None
                msg, fds = got
                keys = msg.get("keys")
                if (msg.get("op") != "fds" or msg.get("index") != len(out) or not isinstance(keys, list)
                        or len(keys) != len(fds) or not fds):
                    close_fds(fds)
                    raise LuoError(errno.EPROTO, f"keeper load batch out of order at {len(out)} of {count}")
                for i, (key, fd) in enumerate(zip(keys, fds, strict=True)):
                    if not isinstance(key, str) or key in out:
                        close_fds(fds[i:])
                        raise LuoError(errno.EPROTO, f"keeper load names {key!r} twice or badly")
                    out[key] = fd
            complete = True
            return meta, out
        finally:
            close_fds(head_fds)
            if not complete:
                close_fds(list(out.values()))
                self._disconnect()  # the rest of this load must not be read as replies to later calls

    def ping(self) -> dict[str, Any]:
        """The keeper's pid, instance, protocol, count of held fds and meta size."""
        return self._call({"op": "ping"})

    def close(self) -> None:
        self._disconnect()

    def __enter__(self) -> KeeperStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

