"""Registration order and who owns what: anything else is accepted by no handler."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from luo.core.participants import COMPATIBLE_MAX, FileHandler
from luo.handlers import ListenSocketHandler, MemfdHandler, default_handlers


def _owner(handlers: list[FileHandler], fd: int) -> str | None:
    return next((h.compatible for h in handlers if h.can_preserve(fd)), None)


def test_order_and_compatibles() -> None:
    hs = default_handlers()
    assert [type(h) for h in hs] == [MemfdHandler, ListenSocketHandler]
    assert [h.compatible for h in hs] == ["memfd-v1", "socket-listen-v1"]
    assert all(len(h.compatible.encode()) <= COMPATIBLE_MAX for h in hs)
    assert default_handlers()[0] is not hs[0]  # fresh instances each call


def test_who_owns_what(tmp_path: Path) -> None:
    hs = default_handlers()
    mfd = os.memfd_create("m", os.MFD_ALLOW_SEALING)
    listener = socket.create_server(("127.0.0.1", 0))
    devnull = os.open("/dev/null", os.O_RDWR)
    regular = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
    r, w = os.pipe()
    try:
        assert _owner(hs, mfd) == "memfd-v1"
        assert _owner(hs, listener.fileno()) == "socket-listen-v1"
        for fd in (devnull, regular, r, w):
            assert _owner(hs, fd) is None
    finally:
        for fd in (mfd, devnull, regular, r, w):
            os.close(fd)
        listener.close()
