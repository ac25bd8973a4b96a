"""luod under systemd's fd store, end to end: the test plays systemd for real (its $NOTIFY_SOCKET
receives luod's FDSTORE= datagrams and their fds), SIGKILLs luod, and starts a new one the way
systemd restarts a service (the stored fds at 3.., $LISTEN_FDS, $LISTEN_FDNAMES, $LISTEN_PID).
The new luod has every preserved fd back, bit-exact, with no keeper process anywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from keeper_helpers import WRAPPER, FakeSystemd, keeper_pids

from luo.client.connection import open_socket
from luo.testing.host import HostProcess
from luo.testing.memfds import preserve_and_exit, sha_of
from luo.testing.processes import alive, kill_all
from luo.testing.wait import wait_for


class Manager(threading.Thread):
    """systemd reads its notify socket all the time (a datagram queue holds only about ten
    messages, then senders block): so does the test's manager, in a thread of its own."""

    def __init__(self, fake: FakeSystemd) -> None:
        super().__init__(daemon=True)
        self.fake = fake
        self.lock = threading.Lock()
        self.received = 0
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            try:
                with self.lock:
                    self.fake.sock.settimeout(0.05)
                    self.fake.apply(1)
                    self.received += 1
            except (TimeoutError, OSError):
                continue

    def store(self) -> list[tuple[str, int]]:
        with self.lock:
            return list(self.fake.store)


@pytest.fixture
def systemd(short_dir: Path) -> Iterator[tuple[Manager, dict[str, str], Path]]:
    fake = FakeSystemd(str(short_dir / "notify"))
    manager = Manager(fake)
    manager.start()
    root = short_dir / "rt"
    yield manager, {"NOTIFY_SOCKET": str(short_dir / "notify"), "FDSTORE": "64"}, root
    kill_all(root)
    manager.stopping = True
    manager.join(5)
    fake.close()


def start_like_systemd(root: Path, env: dict[str, str], passed: list[tuple[str, int]]) -> subprocess.Popen[bytes]:
    child_env = {**os.environ, **env, "LISTEN_FDS": str(len(passed)),
                 "LISTEN_FDNAMES": ":".join(name for name, _ in passed)}
    child_env.pop("LISTEN_PID", None)
    fds = [fd for _, fd in passed]
    child = f"import sys; sys.argv = ['luo', '--runtime-dir', {str(root)!r}, 'host']; " \
            "from luo.cli import main; sys.exit(main())"
    log = open(root / "luod.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), child], pass_fds=fds,
                                env=child_env, stdout=log, stderr=log, start_new_session=True)
    finally:
        log.close()


def test_luod_recovers_from_systemds_fd_store(systemd: tuple[Manager, dict[str, str], Path]) -> None:
    manager, env, root = systemd
    host = HostProcess(root, env).start()
    g = preserve_and_exit(root, "sd-global", env=host.env)
    c = host.client()
    sess = c.create_session("sd-session")
    fd = os.memfd_create("sd-session-mem", os.MFD_ALLOW_SEALING)
    os.write(fd, os.urandom(1 << 20))
    sha = sha_of(fd)
    sess.preserve_fd(fd, 4)
    os.close(fd)
    assert c.status()["fd_store"]["kind"] == "systemd"
    assert keeper_pids(root) == []  # systemd holds the fds: no keeper
    # two fds, the crash record's snapshot (a memfd, luo.host.mirror) and the metadata naming them
    names = wait_for(lambda: (n := [name for name, _ in manager.store()]) and "luo-meta" in n and len(n) == 4 and n,
                     10, "systemd to hold two fds, the snapshot and the record")
    assert len(set(names)) == 4 and sum(".snap" in name for name in names) == 1, names

    old = host.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), 10, "luod to die")
    with manager.lock:  # systemd hands the store to the new process as it was when the old one died
        start_like_systemd(root, env, list(manager.fake.store))
    open_socket(root / "liveupdate", 30.0).close()
    c2 = HostProcess(root, env).client()
    st = c2.status()
    assert st["recovered"]["fds"] == 2 and st["recovered"]["held_sessions"] == ["sd-session"], st["recovered"]
    assert st["fd_store"]["kind"] == "systemd"
    r = HostProcess(root, env).update()
    assert r["preserved_fds"] >= 2
    c3 = HostProcess(root, env).client()
    assert sha_of(c3.restore_fd(g["token"])) == g["sha"]
    assert sha_of(c3.retrieve_session("sd-session").retrieve_fd(4)) == sha
