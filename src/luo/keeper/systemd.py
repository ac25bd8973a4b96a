"""systemd's fd store as an FdStore: the service manager keeps the fds, and hands them back as
$LISTEN_FDS when it restarts luod.

Messages on $NOTIFY_SOCKET (sd_notify's protocol; a path, or ``@name`` for an abstract socket):

- put: ``FDSTOREREMOVE=1 FDNAME=<key>``, then ``FDSTORE=1 FDNAME=<key> FDPOLL=0`` with the fd.
  systemd keeps every fd sent under a name (a name is not a key to it), so replacing needs the
  removal first. FDPOLL=0: by default systemd drops a stored fd as soon as it polls POLLHUP or
  POLLERR (a pipe whose other end closed, say), and nothing luod preserved may vanish that way.
- drop: ``FDSTOREREMOVE=1 FDNAME=<key>``.
- meta: a sealed memfd stored, the same way, under FDNAME ``luo-meta``.

systemd never answers. What it does not take is lost silently, so this backend refuses what it
can foresee: a put beyond $FDSTORE (FileDescriptorStoreMax=) raises ENOSPC instead of being
dropped by systemd with a line in the journal. Two limits it cannot check: systemd removes
duplicates, so the same open file description stored under two keys comes back under one only;
and a unit without NotifyAccess=all drops messages from any process but the main one.

load() takes the fds systemd passed to this process at start (LISTEN_PID must be ours; fds 3..,
named by LISTEN_FDNAMES), once: the variables are then removed so that no child inherits them,
and systemd's store cannot be read back otherwise. systemd still holds its copies: what load()
returns is a duplicate set.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
from collections.abc import Iterable, MutableMapping
from typing import Any

from luo.abi import STORE_META_NAME
from luo.errors import LuoError
from luo.host.handover import blob_memfd, read_blob
from luo.keeper.store import MAX_META, validate_key

log = logging.getLogger("luod")

SD_LISTEN_FDS_START = 3
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify_address(value: str) -> str:
    """The AF_UNIX address of a $NOTIFY_SOCKET value (``@`` starts an abstract name)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise LuoError(errno.EAFNOSUPPORT, f"NOTIFY_SOCKET={value!r}: only unix socket paths and @abstract names")


def passed_fds(environ: MutableMapping[str, str]) -> list[tuple[int, str]] | None:
    """[(fd, name)] systemd passed this process, or None when it passed none to *this* process
    (no LISTEN_PID, or another process's: the variables were inherited, the fds were not)."""
    try:
        if int(environ.get("LISTEN_PID", "")) != os.getpid():
            return None
        n = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return None
    names = environ.get("LISTEN_FDNAMES", "")
    split = names.split(":") if names else []
    split += ["unknown"] * (n - len(split))  # systemd's name for an unnamed fd
    return [(SD_LISTEN_FDS_START + i, split[i]) for i in range(max(0, n))]


class SystemdStore:
    """The FdStore on systemd's fd store. ``environ`` is the environment to read $NOTIFY_SOCKET,
    $FDSTORE and $LISTEN_* from, and to remove $LISTEN_* from (default: os.environ)."""

    kind = "systemd"

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        self.env: MutableMapping[str, str] = os.environ if environ is None else environ
        value = self.env.get("NOTIFY_SOCKET", "")
        if not value:
            raise LuoError(errno.EINVAL, "no NOTIFY_SOCKET: not run by systemd, so no systemd fd store")
        self.address = notify_address(value)
        try:
            self.capacity = int(self.env.get("FDSTORE", "0")) or None
        except ValueError:
            self.capacity = None
        passed = passed_fds(self.env) or []
        # what systemd holds (as far as this process knows), to refuse a put it would drop
        self.names = {name for _, name in passed}
        self.loaded = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def _send(self, text: str, fds: list[int] | tuple[int, ...] = ()) -> None:
        anc: list[tuple[int, int, Any]] = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            self.sock.sendmsg([text.encode()], anc, 0, self.address)
        except OSError as e:
            shown = self.address.replace("\0", "@", 1)
            raise LuoError(e.errno or errno.EIO, f"systemd's notify socket {shown}: {e.strerror}") from None

    def _store(self, name: str, fd: int) -> None:
        if self.capacity is not None and name not in self.names and len(self.names) >= self.capacity:
            raise LuoError(errno.ENOSPC, f"systemd's fd store for this unit is full ({self.capacity} fds, "
                           "FileDescriptorStoreMax=); it would drop the fd")
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}")
        self._send(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", (fd,))
        self.names.add(name)

    # -- FdStore -----------------------------------------------------------------------------
    def put(self, key: str, fd: int) -> None:
        self._store(validate_key(key), fd)

    def put_many(self, items: Iterable[tuple[str, int]]) -> None:
        for key, fd in items:
            self.put(key, fd)

    def drop(self, keys: Iterable[str]) -> None:
        for key in [validate_key(k) for k in keys]:
            self._send(f"FDSTOREREMOVE=1\nFDNAME={key}")
            self.names.discard(key)

    def set_meta(self, meta: bytes) -> None:
        if len(meta) > MAX_META:
            raise LuoError(errno.EFBIG, f"fd store metadata of {len(meta)} bytes; at most {MAX_META}")
        fd = blob_memfd(bytes(meta), STORE_META_NAME)
        try:
            self._store(STORE_META_NAME, fd)
        finally:
            os.close(fd)

    def load(self) -> tuple[bytes | None, dict[str, int]]:
        """What systemd passed at start. Once per process: later calls raise EALREADY."""
        if self.loaded:
            raise LuoError(errno.EALREADY, "systemd's fds were already loaded (it passes them once, at start)")
        self.loaded = True
        passed = passed_fds(self.env)
        for var in LISTEN_VARS:
            self.env.pop(var, None)
        meta: bytes | None = None
        out: dict[str, int] = {}
        for fd, name in passed or []:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                log.warning("systemd passed fd %d (%s), but it is not open", fd, name)
                continue
            if name == STORE_META_NAME and meta is None:
                try:
                    meta = read_blob(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
            elif name != STORE_META_NAME and name not in out:
                out[name] = fd
            else:  # a second fd under one name: systemd still holds it; the next put or drop removes it
                log.warning("systemd passed a second fd named %r; closing it", name)
                os.close(fd)
        return meta, out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SystemdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
