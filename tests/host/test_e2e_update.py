"""The core loop end to end, with real processes: preserve, update, retrieve, finish."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading

from luo.testing.host import HostProcess
from luo.testing.memfds import sha_of
from luo.testing.processes import alive
from luo.testing.wait import wait_for

MiB = 1 << 20

PRESERVE_AND_EXIT = r"""
import hashlib, json, os, sys
from luo.client import connect
c = connect(sys.argv[1])
fd = os.memfd_create("e2e-global-64m", os.MFD_ALLOW_SEALING)
data = os.urandom(64 << 20)
os.write(fd, data)
os.lseek(fd, 12345, 0)
token = c.preserve_fd(fd)
print(json.dumps({"token": token, "sha": hashlib.sha256(data).hexdigest()}))
"""



def host_fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_update_end_to_end(host: HostProcess) -> None:
    # client 1 preserves 64 MiB through the RFC v2 call and exits
    cp = subprocess.run([sys.executable, "-c", PRESERVE_AND_EXIT, str(host.root)], capture_output=True,
                        text=True, check=True)
    g = json.loads(cp.stdout)

    # client 2 (this process) keeps a session with a memfd and a listening TCP socket
    c = host.client()
    sess = c.create_session("e2e-session")
    fd = os.memfd_create("e2e-session-mem", os.MFD_ALLOW_SEALING)
    sdata = os.urandom(3 * MiB + 17)
    os.write(fd, sdata)
    sess.preserve_fd(fd, 1)
    os.close(fd)  # only the host holds it now
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    port = ls.getsockname()[1]
    sess.preserve_fd(ls.fileno(), 2)
    ls.close()
    # something preserved and never retrieved: finish must release it
    orphan = os.memfd_create("e2e-orphan", os.MFD_ALLOW_SEALING)
    os.write(orphan, b"x" * 4096)
    orphan_token = c.preserve_fd(orphan)
    os.close(orphan)

    old_pid = host.pid
    queued: list[socket.socket] = []

    def connect_during_update() -> None:
        wait_for(lambda: host.state() in ("prepared", "frozen", "updated"), 30, "the update to start")
        queued.append(socket.create_connection(("127.0.0.1", port), timeout=10))

    t = threading.Thread(target=connect_during_update)
    t.start()
    result = host.update()
    t.join(30)
    assert queued, "no connection was made during the update"

    assert result["new_pid"] != old_pid
    assert host.pid == result["new_pid"]
    wait_for(lambda: not alive(old_pid), 10, "the old host to exit")
    assert host.state() == "updated"
    assert set(result["phases_ms"]) >= {"start", "prepare", "freeze", "handover"}

    # the global memfd, bit-exact, with its position
    c2 = host.client()
    gfd = c2.restore_fd(g["token"])
    assert os.lseek(gfd, 0, os.SEEK_CUR) == 12345
    assert sha_of(gfd) == g["sha"]
    assert os.fstat(gfd).st_size == 64 * MiB

    # the old session fd is dead; the session is retrieved from the new host
    new_sess = c2.retrieve_session("e2e-session")
    sfd = new_sess.retrieve_fd(1)
    assert sha_of(sfd) == hashlib.sha256(sdata).hexdigest()
    lfd = new_sess.retrieve_fd(2)
    listener = socket.socket(fileno=lfd)
    listener.settimeout(10)
    conn, _ = listener.accept()  # the connection queued during the update
    queued[0].sendall(b"ping")
    assert conn.recv(4) == b"ping"
    conn.close()
    new_sess.finish()

    # finish returns to normal and releases what was never retrieved
    new_pid = host.pid
    assert any("e2e-orphan" in p for p in host_fds(new_pid))
    assert host.luo("finish").stdout.strip() == "normal"
    assert host.state() == "normal"
    assert not any("e2e-orphan" in p for p in host_fds(new_pid))
    st = c2.status()
    assert orphan_token not in [f["token"] for f in st["files"]]
    sess.close()
    queued[0].close()


def test_liveupdate_number_counts_updates(host: HostProcess) -> None:
    for n in (1, 2, 3):
        r = host.update()
        assert r["liveupdate_number"] == n
        host.luo("finish")
    assert host.client().status()["liveupdate_number"] == 3


def test_client_waits_while_host_is_replaced(host: HostProcess) -> None:
    """A libluo client connected before the update keeps working afterwards (reconnects)."""
    c = host.client()
    assert c.state.label == "normal"
    host.update()
    assert c.state.label == "updated"
    assert c.pid() == host.pid


def test_client_connecting_during_update_waits(make_host) -> None:  # noqa: ANN001
    """The listening socket crosses the update: a connect made mid-update is answered by the new host."""
    host = make_host({"LUO_PROBES": "a:hold-prepare"})
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(host.update()))
    t.start()
    log = host.root / "probes.log"
    wait_for(lambda: log.exists() and "probe-a prepare" in log.read_text(), 60, "the update to reach prepare")
    answers: list[tuple[str, int]] = []
    c = host.client()
    c.conn._ensure()  # connected (queued on the listening socket) while the old host is inside the update
    asker = threading.Thread(target=lambda: answers.append((c.state.label, c.pid())))
    asker.start()
    with open(host.root / "probe-a.hold", "wb"):
        pass  # lets the update go on
    t.join(60)
    asker.join(60)
    assert result, "the update did not finish"
    # the old host never accepts again once inside the update: the new one answers
    assert answers == [("updated", result["new_pid"])]
