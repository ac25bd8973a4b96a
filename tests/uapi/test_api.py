"""One stage, no update: the v7.3 session UAPI and the RFC v2 calls as the kernel gives them."""

from __future__ import annotations

import os
import signal

from luo.testing.host import HostProcess
from luo.testing.wait import wait_for

from .conftest import Programs, Runner, sessions, status, wait_dead


def test_api(progs: Programs, host: HostProcess, luo: Runner) -> None:
    luo.run(progs["luo_api"]).assert_passed()
    # luod learns of the closes from EOFs on its sockets: give it a moment
    wait_for(lambda: sessions(host) == {}, 5, "the program's sessions to be closed after it exited")
    luo.run(progs["luo_api"], "--open-ok").assert_passed()  # the device was released at exit


def test_open_paths(progs: Programs, luo: Runner) -> None:
    luo.run(progs["luo_api"], "--paths").assert_passed()


def test_exclusive_open_across_programs(progs: Programs, luo: Runner) -> None:
    holder = luo.start(progs["luo_api"], "--hold", stdin=True)
    holder.wait_line("holding")
    luo.run(progs["luo_api"], "--open-busy").assert_passed()
    holder.send()
    assert holder.wait().returncode == 0
    luo.run(progs["luo_api"], "--open-ok").assert_passed()


def test_exclusive_open_released_by_sigkill(progs: Programs, luo: Runner) -> None:
    holder = luo.start(progs["luo_api"], "--hold", stdin=True)
    pid = int(holder.wait_line("holding").split("pid=")[1])
    os.kill(pid, signal.SIGKILL)
    ran = holder.wait()
    assert ran.returncode == 128 + signal.SIGKILL, ran.describe()
    wait_dead(pid, 10)
    luo.run(progs["luo_api"], "--open-ok").assert_passed()


def test_rfcv2(progs: Programs, host: HostProcess, luo: Runner) -> None:
    luo.run(progs["luo_rfcv2"]).assert_passed()
    st = status(host)
    assert st["state"] == "normal" and st["files"] == [] and st["sessions"] == [], st


def test_exit_status(luo: Runner) -> None:
    assert luo.run("/bin/sh", "-c", "exit 7").returncode == 7
    assert luo.run("/bin/sh", "-c", "kill -9 $$").returncode == 128 + signal.SIGKILL
    assert luo.run("/bin/sh", "-c", "exec true").returncode == 0
