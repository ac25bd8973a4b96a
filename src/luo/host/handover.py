"""The handover itself: the KHO blob and every preserved fd, passed to the successor.

The blob travels in a sealed memfd (the userspace stand-in for KHO's preserved FDT page) and the
fds in batches of at most SCM_MAX_FD per message. Nothing is copied: each fd names the same open
file description on both sides.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from luo.errors import LuoError
from luo.host.wire import SCM_MAX_FD, recv_msg, send_msg

# The host-to-host message protocol (HANDOVER_PROTOCOL) is versioned in luo.abi, with its rule.
MAX_TREE = 64 << 20  # a tree claiming more is refused before it is read
MAX_FDS = 1 << 20

F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8


def blob_memfd(blob: bytes, name: str = "luo-kho-fdt") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, blob)
    import fcntl

    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL)
    return fd


def read_blob(fd: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@dataclass
class Handover:
    blob: bytes
    fds: list[int]
    listener: int
    store_keys: list[str]


def send_handover(ch: socket.socket, blob: bytes, fds: list[int], listener: int,
                  store_keys: list[str] | None = None) -> None:
    """The prepare-time handover: the tree as prepared, every preserved fd, the listening socket.

    Preserving and unpreserving are refused from prepare on, so these fds are exactly the ones
    the final tree will name; the freeze then only sends the final tree (send_final_tree).
    """
    tree = blob_memfd(blob)
    try:
        # store_keys: the outgoing host's keys in the fd store, which the successor replaces with
        # its own (luo.host.mirror); a successor that does not know the field ignores it.
        send_msg(ch, {"op": "handover", "stage": "prepare", "fd_count": len(fds), "tree_size": len(blob),
                      "store_keys": store_keys or []}, (tree, listener))
    finally:
        os.close(tree)
    for i in range(0, len(fds), SCM_MAX_FD):
        send_msg(ch, {"op": "fds", "index": i}, fds[i : i + SCM_MAX_FD])


def send_final_tree(ch: socket.socket, blob: bytes | None) -> None:
    """The freeze-time tree; None when it equals the prepared one (nothing changed at freeze)."""
    if blob is None:
        send_msg(ch, {"op": "handover", "stage": "final", "unchanged": True})
        return
    tree = blob_memfd(blob)
    try:
        send_msg(ch, {"op": "handover", "stage": "final", "tree_size": len(blob)}, (tree,))
    finally:
        os.close(tree)


def recv_handover(ch: socket.socket, first: dict, first_fds: list[int]) -> Handover:
    """Receive the rest of a handover whose first message was already read."""
    if len(first_fds) != 2:
        for fd in first_fds:
            os.close(fd)
        raise LuoError(errno.EPROTO, "handover message must carry the tree memfd and the listening socket")
    tree, listener = first_fds
    size, want = first.get("tree_size"), first.get("fd_count")
    if not (isinstance(size, int) and 0 < size <= MAX_TREE and isinstance(want, int) and 0 <= want <= MAX_FDS):
        os.close(tree)
        os.close(listener)
        raise LuoError(errno.EINVAL, f"handover: tree_size {size!r} must be 1..{MAX_TREE}, fd_count {want!r} "
                       f"0..{MAX_FDS}")
    try:
        blob = read_blob(tree, size)
    finally:
        os.close(tree)
    fds: list[int] = []
    while len(fds) < want:
        got = recv_msg(ch)
        if got is None:
            for fd in fds + [listener]:
                os.close(fd)
            raise LuoError(errno.ECONNRESET, "the outgoing host went away in the middle of the handover")
        msg, more = got
        if msg.get("op") != "fds" or msg.get("index") != len(fds) or len(fds) + len(more) > want:
            for fd in fds + more + [listener]:
                os.close(fd)
            raise LuoError(errno.EPROTO, f"handover fd batch out of order: {msg}")
        fds.extend(more)
    keys = first.get("store_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and len(k) <= 200 for k in keys):
        keys = []  # only a cleanup hint: never worth refusing the update for
    return Handover(blob, fds, listener, keys)
