"""Sessions made through `luo run` are ordinary luo sessions, and the other way round: libluo
for Python (luo.client) sees what a C program preserved, and a C program retrieves what
Python preserved, across a real update."""

from __future__ import annotations

import mmap
import os

from luo.testing.host import HostProcess

from .conftest import Programs, Runner, pattern, sessions
from .test_twostage import TOK_BIG, TOK_DATA, TOK_EMPTY, TOK_LATE, TOK_STATE, incoming, stage1, stage2

DATA_LEN, LATE_LEN, BIG_LEN = 3 * 4096 + 123, 8192, 1 << 20


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
        return bytes(m)


def test_python_client_retrieves_c_sessions(progs: Programs, host: HostProcess, luo: Runner) -> None:
    stage1(progs, host, luo, "pv")
    host.update()
    incoming(host, "pv")
    with host.client(timeout=10) as c:
        want = {"a": {TOK_EMPTY: b"", TOK_DATA: pattern(1, DATA_LEN), TOK_LATE: pattern(3, LATE_LEN)},
                "b": {TOK_BIG: pattern(2, BIG_LEN)}, "state": {TOK_STATE: b"2"}}
        for suffix, files in want.items():
            s = c.retrieve_session(f"pv_{suffix}")
            for token, data in files.items():
                fd = s.retrieve_fd(token)
                try:
                    assert read_all(fd) == data, f"pv_{suffix} token {token:#x}"
                finally:
                    os.close(fd)
            s.finish()
            s.close()
    assert not [n for n in sessions(host) if n.startswith("pv_")]


def test_c_program_retrieves_python_sessions(progs: Programs, host: HostProcess, luo: Runner) -> None:
    """Python plays stage 1 (libluo, memfd_create(name, 0)); the C stage 2 retrieves it all."""
    files = {"state": {TOK_STATE: b"2"},
             "a": {TOK_EMPTY: b"", TOK_DATA: pattern(1, DATA_LEN), TOK_LATE: pattern(3, LATE_LEN)},
             "b": {TOK_BIG: pattern(2, BIG_LEN)}}
    with host.client() as c:
        held = []
        for suffix, tokens in files.items():
            s = c.create_session(f"py_{suffix}")
            held.append(s)
            for token, data in tokens.items():
                fd = os.memfd_create(f"py{token}", 0)
                try:
                    os.write(fd, data)
                    s.preserve_fd(fd, token)
                finally:
                    os.close(fd)
        host.update()
        incoming(host, "py")
        stage2(progs, luo, "py")
    assert not [n for n in sessions(host) if n.startswith("py_")]
