"""A stand-in successor: a real child process that receives fds by SCM_RIGHTS, as luod's does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest

TIMEOUT = 20.0

# The child gets its end of a socketpair (its number in argv[1]); it receives one message with fds, runs the
# test's body (which sees ``fds``, ``payload`` and ``reply(bytes)``), and exits.
_PRELUDE = """
import os, socket, sys
chan = socket.socket(fileno=int(sys.argv[1]))
chan.settimeout({timeout})
payload, fds, _flags, _addr = socket.recv_fds(chan, 65536, 16)
payload = payload[1:]  # the marker byte: a stream socket carries no fds with zero bytes
def reply(data: bytes) -> None:
    chan.sendall(data)
"""

Successor = Callable[[str, list[int], bytes], bytes]


def _run_successor(body: str, fds: list[int], payload: bytes) -> bytes:
    parent, child = socket.socketpair()
    with parent, child:
        parent.settimeout(TIMEOUT)
        script = _PRELUDE.format(timeout=TIMEOUT) + textwrap.dedent(body)
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        child.close()  # the child holds its end; EOF on ours then means it is gone
        try:
            socket.send_fds(parent, [b"!" + payload], fds)
            chunks: list[bytes] = []
            try:
                while chunk := parent.recv(65536):
                    chunks.append(chunk)
            except TimeoutError:
                proc.kill()
            _out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, f"the successor failed ({proc.returncode}): {err.decode()}"
        return b"".join(chunks)


@pytest.fixture
def successor() -> Successor:
    """``successor(body, fds, payload) -> everything the child replied``."""
    return _run_successor


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest ram", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * 1024)
    yield fd
    os.close(fd)
