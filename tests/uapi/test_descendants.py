"""Processes forked and exec'd by the program, and threads, are served too."""

from __future__ import annotations

from luo.testing.host import HostProcess
from luo.testing.wait import wait_for

from .conftest import Programs, Runner, sessions


def test_fork_exec(progs: Programs, host: HostProcess, luo: Runner) -> None:
    p = luo.start(progs["luo_fork_exec"], stdin=True)
    p.wait_line("ready")
    have = sessions(host)
    assert "forkexec" in have and "forkexec-cloexec" in have, sorted(have)
    assert sorted(have["forkexec"]["files"]) == [0xF00D, 0xF00E], have["forkexec"]
    assert have["forkexec-cloexec"]["files"] == [], have["forkexec-cloexec"]
    p.send()
    p.wait().assert_passed()
    wait_for(lambda: not {"forkexec", "forkexec-cloexec"} & set(sessions(host)), 5, "forkexec's sessions to close")


def test_threads(progs: Programs, host: HostProcess, luo: Runner) -> None:
    n, files = 8, 4
    p = luo.start(progs["luo_threads"], str(n), stdin=True)
    p.wait_line("ready")
    have = sessions(host)
    for i in range(n):
        s = have.get(f"thr-{i:02d}")
        assert s is not None, sorted(have)
        assert sorted(s["files"]) == [(i << 16) | j for j in range(files)], s
    assert "thr-shared" in have
    p.send()
    p.wait().assert_passed()
    wait_for(lambda: not [name for name in sessions(host) if name.startswith("thr-")], 5, "thr-* to close")
