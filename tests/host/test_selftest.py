"""`luo selftest`, the upstream two-stage test, run against a real host."""

from __future__ import annotations

import os

from luo.testing.host import HostProcess


def test_two_stages_across_an_update(host: HostProcess) -> None:
    out = host.luo("selftest").stdout
    assert "stage 1" in out
    host.update()
    out = host.luo("selftest").stdout
    assert "stage 2: PASS" in out
    assert host.client().status()["sessions"] == []  # every selftest session finished


def test_stage_two_sees_changed_contents(host: HostProcess) -> None:
    host.luo("selftest", "--sessions", "2", "--files", "2")
    pid = host.pid
    victims = [fd for fd in os.listdir(f"/proc/{pid}/fd")
               if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:luo-selftest-1-1")]
    assert len(victims) == 1
    with open(f"/proc/{pid}/fd/{victims[0]}", "r+b") as f:  # the host's own copy of the memfd
        f.seek(100)
        f.write(b"X")
    host.update()
    cp = host.luo("selftest", check=False)
    assert cp.returncode == 1
    assert "luo-selftest-1 token 1: contents differ" in cp.stderr
    assert "luo-selftest-0" not in cp.stderr


def test_stage_one_twice_is_a_clear_error(host: HostProcess) -> None:
    host.luo("selftest")
    cp = host.luo("selftest", check=False)
    assert cp.returncode == 1 and "EEXIST" in cp.stderr and "luo update" in cp.stderr
    assert cp.stderr.count("\n") == 1
