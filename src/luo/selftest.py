"""``luo selftest``: the upstream two-stage live-update selftest, against a running host.

Stage 1 (no incoming state session): create sessions of memfds with known contents, record what
they hold in a well-known state session, and keep every session fd open in a small daemon (closing
a session fd unpreserves it, as in 6.19). Then the operator updates the host. Stage 2 (the state
session came across): retrieve every session, compare every memfd bit for bit, finish them, and
print PASS or what differs. The stage is found the way upstream finds it: by whether the state
session exists on the incoming side.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import sys
from typing import Any

from luo.client import Client, Session
from luo.errors import LuoError

STATE_SESSION = "luo-selftest-state"
PREFIX = "luo-selftest-"


def _contents(seed: str, session: int, file: int, size: int) -> bytes:
    """Deterministic bytes: stage 2 can check them without a copy having crossed."""
    block = hashlib.sha256(f"{seed}/{session}/{file}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    return fd


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.pread(fd, 1 << 20, len(out)):
        out += chunk
    return bytes(out)


def stage1(c: Client, sessions: int, files: int, size: int) -> list[Session]:
    seed = os.urandom(8).hex()
    held: list[Session] = []
    plan: dict[str, Any] = {"seed": seed, "size": size, "sessions": {}}
    for i in range(sessions):
        name = f"{PREFIX}{i}"
        s = c.create_session(name)
        held.append(s)
        for j in range(files):
            data = _contents(seed, i, j, size + j)
            fd = _memfd(f"{name}-{j}", data)
            s.preserve_fd(fd, j)
            os.close(fd)
        plan["sessions"][name] = [hashlib.sha256(_contents(seed, i, j, size + j)).hexdigest() for j in range(files)]
    state = c.create_session(STATE_SESSION)
    held.append(state)
    fd = _memfd(STATE_SESSION, json.dumps(plan).encode())
    state.preserve_fd(fd, 0)
    os.close(fd)
    return held


def hold_in_daemon(held: list[Session]) -> int:
    """Fork a daemon that keeps the session fds open until the host that has them goes away."""
    pid = os.fork()
    if pid:
        for s in held:
            s.detach()
        return pid
    os.setsid()
    fds = [s.fileno() for s in held]
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    while fds:  # every session fd reads EOF once its host exits (after the update)
        ready, _, _ = select.select(fds, [], [])
        for fd in ready:
            try:
                if not os.read(fd, 4096):
                    fds.remove(fd)
            except OSError:
                fds.remove(fd)
    os._exit(0)


def stage2(c: Client, state: Session) -> list[str]:
    plan = json.loads(_read_all(state.retrieve_fd(0)))
    problems: list[str] = []
    for name, shas in plan["sessions"].items():
        try:
            s = c.retrieve_session(name)
        except LuoError as e:
            problems.append(f"session {name}: {e}")
            continue
        for token, want in enumerate(shas):
            try:
                got = hashlib.sha256(_read_all(s.retrieve_fd(token))).hexdigest()
            except LuoError as e:
                problems.append(f"session {name} token {token}: {e}")
                continue
            if got != want:
                problems.append(f"session {name} token {token}: contents differ (sha256 {got[:16]}, want {want[:16]})")
        s.finish()
        s.close()
    state.finish()
    state.close()
    return problems


def run_selftest(runtime_dir: str | None, sessions: int = 4, files: int = 3, size: int = 256 << 10) -> int:
    c = Client(runtime_dir)
    try:
        state = c.retrieve_session(STATE_SESSION)
    except LuoError as e:
        if e.errno != errno.ENOENT:
            raise
        try:
            held = stage1(c, sessions, files, size)
        except LuoError as e2:
            if e2.errno == errno.EEXIST:
                raise LuoError(errno.EEXIST, "stage 1 already ran on this host: run `luo update`, "
                                             "then `luo selftest` again") from None
            raise
        pid = hold_in_daemon(held)
        print(f"selftest stage 1: {sessions} sessions of {files} memfds preserved (fds held by pid {pid}); "
              f"now run `luo update`, then `luo selftest` again")
        return 0
    problems = stage2(c, state)
    if problems:
        for p in problems:
            print(f"selftest FAIL: {p}", file=sys.stderr)
        return 1
    print(f"selftest stage 2: PASS: every preserved memfd came back bit-exact (liveupdate-number "
          f"{c.status()['liveupdate_number']})")
    return 0
