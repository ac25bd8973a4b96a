"""luod SIGKILLed with fds preserved: a restarted luod has them all, bit-exact, in the state the
crash left, because the fd keeper holds a copy of each and the crash record that names them."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from luo.testing.host import HostProcess
from luo.testing.memfds import memfd, sha_of
from luo.testing.memfds import preserve_and_exit as preserve_memfd_and_exit
from luo.testing.processes import alive, pids_of
from luo.testing.wait import wait_for


def preserve_and_exit(host: HostProcess) -> dict:
    return preserve_memfd_and_exit(host.root, "crash-global", 4 << 20)


def keeper_pids(root: Path) -> list[int]:
    out = []
    for pid in pids_of(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"keeper" in f.read().split(b"\0"):
                    out.append(pid)
        except OSError:
            pass
    return out


def crash_and_restart(host: HostProcess) -> HostProcess:
    old = host.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), 10, "luod to die")
    return HostProcess(host.root, {"LUO_ALLOW_FAULTS": "1"}).start()


def test_crash_in_normal_loses_nothing(host: HostProcess) -> None:
    g = preserve_and_exit(host)
    c = host.client()
    sess = c.create_session("held")
    fd, sha = memfd("crash-session")
    sess.preserve_fd(fd, 5)
    os.close(fd)
    [keeper] = keeper_pids(host.root)

    again = crash_and_restart(host)
    assert keeper_pids(host.root) == [keeper]  # the keeper outlived luod
    st = again.client().status()
    assert st["state"] == "normal"
    rec = st["recovered"]
    assert rec["crashed_state"] == "normal" and rec["fds"] == 2 and rec["held_sessions"] == ["held"], rec
    assert {(f["token"], f.get("session")) for f in st["files"]} == {(g["token"], None), (5, "held")}

    # the owner takes its session back, and everything crosses an update bit-exact
    c2 = again.client()
    back = c2.retrieve_session("held")
    assert back.status()["files"] == [5]
    again.update()
    c3 = again.client()
    assert sha_of(c3.restore_fd(g["token"])) == g["sha"]
    assert sha_of(c3.retrieve_session("held").retrieve_fd(5)) == sha


def test_crash_in_updated_keeps_what_was_not_claimed(host: HostProcess) -> None:
    g = preserve_and_exit(host)
    c = host.client()
    shas = {}
    held = []  # a session lives as long as its fd: closing it would unpreserve
    for name in ("a", "b"):
        held.append(s := c.create_session(name))
        fd, shas[name] = memfd(f"crash-{name}")
        s.preserve_fd(fd, 1)
        os.close(fd)
    host.update()
    c = host.client()
    taken = c.retrieve_session("a")  # claimed before the crash: its owner has it
    got = taken.retrieve_fd(1)
    assert sha_of(got) == shas["a"]
    new = c.create_session("new-after-update")
    fd, sha_new = memfd("crash-new")
    new.preserve_fd(fd, 9)
    os.close(fd)

    again = crash_and_restart(host)
    c2 = again.client()
    st = c2.status()
    assert st["state"] == "updated" and st["liveupdate_number"] == 1, st
    assert st["recovered"]["crashed_state"] == "updated"
    incoming = {s["name"] for s in st["sessions"] if s["direction"] == "in"}
    assert incoming == {"b"}, st["sessions"]
    assert sha_of(c2.restore_fd(g["token"])) == g["sha"]
    assert sha_of(c2.retrieve_session("b").retrieve_fd(1)) == shas["b"]
    c2.finish()
    again.update()
    c3 = again.client()
    assert sha_of(c3.retrieve_session("new-after-update").retrieve_fd(9)) == sha_new


def test_crash_while_prepared_counts_as_cancel(host: HostProcess) -> None:
    g = preserve_and_exit(host)
    host.luo("prepare")
    assert host.state() == "prepared"
    again = crash_and_restart(host)
    assert again.state() == "normal"
    st = again.client().status()
    assert st["recovered"]["crashed_state"] == "prepared"
    again.update()
    assert sha_of(again.client().restore_fd(g["token"])) == g["sha"]


def test_finish_lets_the_keeper_go_of_discarded_files(host: HostProcess) -> None:
    preserve_and_exit(host)
    host.update()
    [keeper] = keeper_pids(host.root)
    mem_before = sum(1 for link in os.listdir(f"/proc/{keeper}/fd")
                     if os.readlink(f"/proc/{keeper}/fd/{link}").startswith("/memfd:crash-global"))
    assert mem_before == 1
    host.luo("finish")  # the unrestored file is discarded: no copy may stay behind in the keeper
    wait_for(lambda: not any(os.readlink(f"/proc/{keeper}/fd/{link}").startswith("/memfd:crash-global")
                             for link in os.listdir(f"/proc/{keeper}/fd")), 5, "the keeper to drop its copy")
    assert host.client().status()["fd_store"] == {"kind": "keeper", "keys": 0, "error": None}
