"""socket-listen-v1 on real sockets: queued connections survive the handover."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo.errors import LuoError
from luo.handlers import ListenSocketHandler

from .conftest import TIMEOUT, Successor
from .helpers import incoming, preserved


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    s = socket.create_server(("127.0.0.1", 0), backlog=8)
    yield s
    s.close()


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "ctl.sock"))
    s.listen(8)
    yield s
    s.close()


def test_listening_sockets_accepted(tcp_listener: socket.socket, unix_listener: socket.socket) -> None:
    h = ListenSocketHandler()
    assert h.can_preserve(tcp_listener.fileno())
    assert h.can_preserve(unix_listener.fileno())
    assert preserved(tcp_listener.fileno(), h).data == socket.AF_INET
    assert preserved(unix_listener.fileno(), h).data == socket.AF_UNIX
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as seq:
        seq.bind(b"\0luo-test-abstract-%d" % os.getpid())
        seq.listen()
        assert h.can_preserve(seq.fileno())
        assert h.describe(seq.fileno())["address"] == f"@luo-test-abstract-{os.getpid()}"


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback here")
def test_ipv6_listener_accepted() -> None:
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as s:
        h = ListenSocketHandler()
        assert preserved(s.fileno(), h).data == socket.AF_INET6
        assert h.describe(s.fileno())["address"] == f"[::1]:{s.getsockname()[1]}"


def test_other_sockets_and_files_refused(tcp_listener: socket.socket, tmp_path: Path) -> None:
    h = ListenSocketHandler()
    client = socket.create_connection(tcp_listener.getsockname(), timeout=TIMEOUT)
    server_side, _ = tcp_listener.accept()
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pair = socket.socketpair()
    netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    devnull = os.open("/dev/null", os.O_RDWR)
    regular = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    r, w = os.pipe()
    try:
        for s in (client, server_side, bound, udp, *pair, netlink):
            assert not h.can_preserve(s.fileno()), s
        for fd in (devnull, regular, r, w, 9999):
            assert not h.can_preserve(fd)
        with pytest.raises(LuoError) as ei:
            preserved(client.fileno(), h)
        assert ei.value.errno == errno.ENOENT
    finally:
        for s in (client, server_side, bound, udp, *pair, netlink):
            s.close()
        for fd in (devnull, regular, r, w):
            os.close(fd)


def test_describe(tcp_listener: socket.socket, unix_listener: socket.socket, tmp_path: Path) -> None:
    h = ListenSocketHandler()
    host, port = tcp_listener.getsockname()
    assert h.describe(tcp_listener.fileno()) == {
        "family": "AF_INET",
        "type": "SOCK_STREAM",
        "address": f"{host}:{port}",
    }
    assert h.describe(unix_listener.fileno())["address"] == str(tmp_path / "ctl.sock")
    assert h.describe(9999) == {}


def test_queued_connection_is_accepted_by_the_successor(
    tcp_listener: socket.socket, successor: Successor
) -> None:
    h = ListenSocketHandler()
    # A client connects and speaks before the update; nobody accepts it on this side.
    client = socket.create_connection(tcp_listener.getsockname(), timeout=TIMEOUT)
    client.sendall(b"hello")
    pf = preserved(tcp_listener.fileno(), h)
    body = """
        import struct
        from luo.core.participants import IncomingFile
        from luo.handlers import ListenSocketHandler
        token, data = struct.unpack("<QQ", payload)
        inc = IncomingFile(token=token, compatible="socket-listen-v1", data=data, fd=fds[0])
        listener = socket.socket(fileno=ListenSocketHandler().retrieve(inc))
        listener.settimeout(20)
        conn, _ = listener.accept()
        conn.settimeout(20)
        got = conn.recv(5)
        conn.sendall(b"world:" + got)
        reply(b"accepted")
    """
    with client:
        out = successor(body, [tcp_listener.fileno()], struct.pack("<QQ", pf.token, pf.data))
        assert out == b"accepted"
        assert client.recv(64) == b"world:hello"


def test_unix_queued_connection_crosses(unix_listener: socket.socket, successor: Successor) -> None:
    h = ListenSocketHandler()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect(unix_listener.getsockname())
    client.sendall(b"ping")
    pf = preserved(unix_listener.fileno(), h)
    fd = os.dup(unix_listener.fileno())
    unix_listener.close()  # the successor's copy alone must keep the queue alive
    body = """
        from luo.core.participants import IncomingFile
        from luo.handlers import ListenSocketHandler
        inc = IncomingFile(token=1, compatible="socket-listen-v1", data=socket.AF_UNIX, fd=fds[0])
        listener = socket.socket(fileno=ListenSocketHandler().retrieve(inc))
        conn, _ = listener.accept()
        conn.sendall(b"pong:" + conn.recv(4))
        reply(b"ok")
    """
    try:
        with client:
            assert successor(body, [fd], b"") == b"ok"
            assert client.recv(64) == b"pong:ping"
    finally:
        os.close(fd)
    assert pf.data == socket.AF_UNIX


def test_retrieve_checks_the_fd(tcp_listener: socket.socket) -> None:
    h = ListenSocketHandler()
    pf = preserved(tcp_listener.fileno(), h)
    restored = h.retrieve(incoming(pf, tcp_listener.fileno()))
    os.close(restored)
    wrong_family = incoming(pf, tcp_listener.fileno())
    wrong_family.data = socket.AF_UNIX
    with pytest.raises(LuoError) as ei:
        h.retrieve(wrong_family)
    assert ei.value.errno == errno.EIO
    client = socket.create_connection(tcp_listener.getsockname(), timeout=TIMEOUT)
    try:
        with pytest.raises(LuoError) as ei:
            h.retrieve(incoming(pf, client.fileno()))
        assert ei.value.errno == errno.EIO
    finally:
        client.close()
