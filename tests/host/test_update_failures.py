"""Failed updates: the old host carries on, with every preserved fd intact."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from luo.errors import LuoError
from luo.testing.host import HostProcess
from luo.testing.processes import alive
from luo.testing.wait import wait_for


def preserve_memfd(host: HostProcess, size: int = 1 << 20) -> tuple[int, str]:
    c = host.client()
    fd = os.memfd_create("failure-test", os.MFD_ALLOW_SEALING)
    data = os.urandom(size)
    os.write(fd, data)
    token = c.preserve_fd(fd)
    os.close(fd)
    return token, hashlib.sha256(data).hexdigest()


def restored_sha(host: HostProcess, token: int) -> str:
    fd = host.client().restore_fd(token)
    h = hashlib.sha256()
    off = 0
    while chunk := os.pread(fd, 1 << 22, off):
        h.update(chunk)
        off += len(chunk)
    os.close(fd)
    return h.hexdigest()


def probes(host: HostProcess) -> list[str]:
    p = host.root / "probes.log"
    return p.read_text().splitlines() if p.exists() else []


def assert_update_refused(host: HostProcess, *args: str, errname: str) -> str:
    cp = host.luo("update", *args, check=False)
    assert cp.returncode == 1, cp.stdout
    assert errname in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1
    return cp.stderr


def test_prepare_failure_rolls_back_in_order(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_PROBES": "a,b,c:prepare,d"})
    pid = host.pid
    assert_update_refused(host, errname="EAGAIN")
    # a and b prepared, c failed; a and b cancelled in forward order; c not; d never called
    assert probes(host) == ["probe-a prepare", "probe-b prepare", "probe-c prepare",
                            "probe-a cancel", "probe-b cancel"]
    assert host.pid == pid and host.state() == "normal"


def test_freeze_failure_rolls_back_and_returns_to_normal(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_PROBES": "a,b:freeze,c"})
    token, sha = preserve_memfd(host)
    pid = host.pid
    assert_update_refused(host, errname="EAGAIN")
    log = probes(host)
    assert log[:3] == ["probe-a prepare", "probe-b prepare", "probe-c prepare"]
    assert log[3:5] == ["probe-a freeze", "probe-b freeze"]
    assert "probe-c freeze" not in log
    assert log.index("probe-a cancel") > log.index("probe-b freeze")
    assert host.pid == pid and host.state() == "normal"
    files = host.client().status()["files"]
    assert [(f["token"], f["size"]) for f in files] == [(token, str(1 << 20))]
    del sha


def test_rfc_v2_events_through_the_socket(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_PROBES": "a,b"})
    c = host.client()
    c.prepare()
    assert host.state() == "prepared"
    with pytest.raises(LuoError) as e:
        c.prepare()
    assert e.value.errno == errno.EINVAL
    fd = os.memfd_create("busy", os.MFD_ALLOW_SEALING)
    with pytest.raises(LuoError) as e:
        c.preserve_fd(fd)
    assert e.value.errno == errno.EBUSY
    c.freeze()
    assert host.state() == "frozen"
    c.cancel()
    assert host.state() == "normal"
    assert probes(host) == ["probe-a prepare", "probe-b prepare", "probe-a freeze", "probe-b freeze",
                            "probe-a cancel", "probe-b cancel"]
    with pytest.raises(LuoError) as e:
        c.finish()
    assert e.value.errno == errno.EINVAL


def test_successor_killed_during_handover(host: HostProcess) -> None:
    token, sha = preserve_memfd(host, 8 << 20)
    pid = host.pid
    out: dict[str, subprocess.CompletedProcess[str]] = {}

    def run() -> None:
        out["cp"] = host.luo("update", "--fault", "successor-stall-handover", "--timeout", "60", check=False)

    t = threading.Thread(target=run)
    t.start()
    stalled = host.root / "successor.stalled"
    spid = int(wait_for(lambda: stalled.exists() and stalled.read_text().strip(), 60, "the successor to stall"))
    assert host.state() == "frozen"
    os.kill(spid, signal.SIGKILL)
    t.join(60)
    cp = out["cp"]
    assert cp.returncode == 1 and "ESRCH" in cp.stderr and "every fd kept" in cp.stderr, cp.stderr
    assert host.pid == pid and alive(pid)
    assert host.state() == "normal"
    assert [f["token"] for f in host.client().status()["files"]] == [token]
    r = host.update()
    assert r["new_pid"] != pid
    assert restored_sha(host, token) == sha


def test_successor_that_never_confirms_times_out(host: HostProcess) -> None:
    token, sha = preserve_memfd(host)
    pid = host.pid
    assert_update_refused(host, "--fault", "successor-stall-handover", "--timeout", "1", errname="ETIMEDOUT")
    assert host.pid == pid and host.state() == "normal"
    host.update()
    assert restored_sha(host, token) == sha


def test_incompatible_successor_refused_at_prepare(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_PROBES": "a"})
    token, sha = preserve_memfd(host)
    pid = host.pid
    err = assert_update_refused(host, "--fault", "successor-forget=memfd-v1", errname="EOPNOTSUPP")
    assert "memfd-v1" in err and "nothing was frozen" in err
    assert probes(host) == ["probe-a prepare", "probe-a cancel"]  # never frozen
    assert host.pid == pid and host.state() == "normal"
    host.update()
    assert restored_sha(host, token) == sha


def test_incompatible_successor_from_another_installation(host: HostProcess, short_dir) -> None:  # noqa: ANN001
    """--to names another installation's luo; here a wrapper that runs a version lacking memfd-v1."""
    token, _ = preserve_memfd(host)
    wrapper = short_dir / "old-luo"
    wrapper.write_text(f"#!/bin/sh\nLUO_FAULTS=successor-forget=memfd-v1 exec {sys.executable} -m luo \"$@\"\n")
    wrapper.chmod(0o755)
    assert_update_refused(host, "--to", str(wrapper), errname="EOPNOTSUPP")
    assert host.state() == "normal"


def test_malformed_tree_refused_cleanly(host: HostProcess) -> None:
    token, sha = preserve_memfd(host, 4 << 20)
    pid = host.pid
    err = assert_update_refused(host, "--fault", "corrupt-tree", errname="EINVAL")
    assert "every fd kept" in err and "refused tree kept in" in err
    assert host.pid == pid and host.state() == "normal"
    assert "refuses the handover" in host.log.read_text()
    # what was refused is kept for the operator, and the host says what happened
    kept = list(host.rt.updates.glob("refused-*.dtb"))
    assert len(kept) == 1
    assert "refused" in host.client().status()["last_update"]["failed"]
    cp = host.luo("kho", "dump", "--file", str(kept[0]), check=False)
    assert cp.returncode == 1 and "EINVAL" in cp.stderr and cp.stderr.count("\n") == 1
    host.update()
    assert restored_sha(host, token) == sha


def test_update_from_updated_needs_finish(host: HostProcess) -> None:
    host.update()
    err = assert_update_refused(host, errname="EINVAL")
    assert "luo finish" in err


def test_successor_speaking_older_protocol_gets_full_tree(host: HostProcess) -> None:
    token, sha = preserve_memfd(host)
    r = host.update("--fault", "successor-protocol=2")
    assert r["new_pid"] != r["old_pid"]
    assert restored_sha(host, token) == sha


def test_successor_speaking_unknown_protocol_refused_before_prepare(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_PROBES": "a"})
    pid = host.pid
    assert_update_refused(host, "--fault", "successor-protocol=1", errname="EPROTONOSUPPORT")
    assert probes(host) == []  # refused before prepare
    assert host.pid == pid and host.state() == "normal"
