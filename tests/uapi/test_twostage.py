"""Two stages around a real `luo update`: stage 1 under `luo run`, the update, stage 2 under
another `luo run` (as the upstream two-stage programs run around a kexec)."""

from __future__ import annotations

import os
import signal
from typing import Any

from luo.testing.host import HostProcess
from luo.testing.processes import alive

from .conftest import Programs, Runner, read_pid, sessions, settle, status, wait_dead

# as in luo_twostage.c
TOK_STATE, TOK_EMPTY, TOK_DATA, TOK_LATE, TOK_BIG = 0x5354415445, 1, 2, 3, 0x100000002
EXPECTED_FILES = {"state": [TOK_STATE], "a": [TOK_EMPTY, TOK_DATA, TOK_LATE], "b": [TOK_BIG]}


def stage1(progs: Programs, host: HostProcess, luo: Runner, name: str) -> int:
    """Run stage 1; returns the pid of its holder (which keeps the session fds)."""
    pidfile = host.root / f"{name}.holder.pid"
    luo.run(progs["luo_twostage"], "--stage", "1", "--name", name, "--pidfile", str(pidfile)).assert_passed()
    holder = read_pid(pidfile)
    luo.pids.append(holder)
    assert alive(holder), "the stage-1 holder is not running"
    st = status(host)
    have = {s["name"]: s for s in st["sessions"]}
    # the background supervisor serving the holder lists what it gave out, for the operator
    given = {f["name"] for run in st["luo_run"] for f in run.get("files", [])}
    assert {f"{name}_{suffix}" for suffix in EXPECTED_FILES} <= given, st["luo_run"]
    assert any(run["pid"] != os.getpid() and "luo_twostage" in run["program"] for run in st["luo_run"])
    for suffix, tokens in EXPECTED_FILES.items():
        s = have.get(f"{name}_{suffix}")
        assert s is not None, f"{name}_{suffix} missing from luo status: {sorted(have)}"
        assert s["direction"] == "out" and sorted(s["files"]) == sorted(tokens), s
    return holder


def stage2(progs: Programs, luo: Runner, name: str) -> None:
    ran = luo.run(progs["luo_twostage"], "--stage", "2", "--name", name).assert_passed()
    passed = [ln for ln in ran.lines if not ln.startswith(("ok ", "# "))]
    assert passed and passed[-1].endswith("TEST PASSED ---"), ran.describe()


def incoming(host: HostProcess, name: str) -> dict[str, Any]:
    """Our sessions as the new host lists them after the update."""
    got = {n: s for n, s in sessions(host).items() if n.startswith(f"{name}_")}
    assert sorted(got) == sorted(f"{name}_{s}" for s in EXPECTED_FILES), got
    for suffix, tokens in EXPECTED_FILES.items():
        s = got[f"{name}_{suffix}"]
        assert s["direction"] == "in" and sorted(s["files"]) == sorted(tokens) and not s["retrieved"], s
    return got


def view(host: HostProcess) -> dict[str, Any]:
    """What must not change when a stale holder dies: state, sessions, files (owners aside)."""
    st = status(host)
    return {"state": st["state"], "liveupdate_number": st["liveupdate_number"],
            "sessions": sorted((s["name"], s["direction"], tuple(sorted(s["files"])), s.get("retrieved"))
                               for s in st["sessions"]),
            "files": sorted((f["session"], f["token"], f["direction"], f.get("retrieved")) for f in st["files"])}


def test_update_with_holder_alive(progs: Programs, host: HostProcess, luo: Runner) -> None:
    holder = stage1(progs, host, luo, "ts")
    upd = host.update()
    assert upd["liveupdate_number"] == 1 and upd["preserved_fds"] >= 5, upd
    incoming(host, "ts")
    stage2(progs, luo, "ts")
    assert alive(holder), "the holder died during the update or stage 2 (no --reboot was asked)"
    before = view(host)
    assert not [s for s in before["sessions"] if s[0].startswith("ts_")], f"finished sessions remain: {before}"
    os.kill(holder, signal.SIGKILL)
    wait_dead(holder, 10)
    settle()
    assert view(host) == before, "killing the stage-1 holder after the update changed the host"


def test_holder_killed_before_stage2(progs: Programs, host: HostProcess, luo: Runner) -> None:
    """The holder's session fds belong to the old host: its death loses nothing after the update."""
    holder = stage1(progs, host, luo, "tk")
    host.update()
    before = view(host)
    os.kill(holder, signal.SIGKILL)
    wait_dead(holder, 10)
    settle()
    assert view(host) == before, "killing the stage-1 holder after the update changed the host"
    incoming(host, "tk")
    stage2(progs, luo, "tk")


def test_update_reboot_ends_holder(progs: Programs, host: HostProcess, luo: Runner) -> None:
    holder = stage1(progs, host, luo, "tr")
    host.update("--reboot")
    wait_dead(holder, 15)
    incoming(host, "tr")
    stage2(progs, luo, "tr")
