"""luod under systemd (Type=notify): READY at start, and the successor takes over MAINPID."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from luo.testing.host import HostProcess


def messages(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


def test_notify_ready_and_mainpid_across_update(make_host: Callable[..., HostProcess], short_dir: Path) -> None:
    path = short_dir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    host = make_host({"NOTIFY_SOCKET": str(path)})
    first = messages(sock)
    assert first["READY"] == "1" and int(first["MAINPID"]) == host.pid
    r = host.update()
    after = messages(sock)
    assert int(after["MAINPID"]) == r["new_pid"] == host.pid
    assert "live update #1" in after["STATUS"]
    sock.close()
