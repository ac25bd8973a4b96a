"""Who may talk to the host, and what the CLI prints (one line and an exit code on errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from luo.testing.host import HostProcess

NOBODY = 65534

AS_NOBODY = r"""
import json, os, sys
from luo.client import Client
from luo.errors import LuoError
os.setgid(65534); os.setuid(65534)  # after the imports: the interpreter's files are root's
out = {}
c = Client(sys.argv[1], timeout=5)
for name, call in [("state", lambda: c.state.label),
                   ("preserve", lambda: c.preserve_fd(os.memfd_create("x", os.MFD_ALLOW_SEALING))),
                   ("prepare", lambda: c.prepare()),
                   ("session", lambda: c.create_session("nobody-s"))]:
    try:
        out[name] = ["ok", str(call())]
    except LuoError as e:
        out[name] = [e.errname, e.message]
print(json.dumps(out))
"""


def run_as_nobody(root: Path) -> dict[str, list[str]]:
    import json

    cp = subprocess.run([sys.executable, "-c", AS_NOBODY, str(root)], capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_socket_mode_keeps_other_users_out(host: HostProcess) -> None:
    assert os.stat(host.rt.socket).st_mode & 0o777 == 0o600
    out = run_as_nobody(host.root)
    assert out["state"][0] == "EACCES"


def test_peer_credentials_checked_even_if_socket_opened_up(host: HostProcess) -> None:
    os.chmod(host.root.parent, 0o755)
    os.chmod(host.root, 0o755)
    os.chmod(host.rt.socket, 0o666)  # an operator's mistake: the uid check still holds
    out = run_as_nobody(host.root)
    assert out["state"] == ["ok", "normal"]  # reading is harmless
    for op in ("preserve", "prepare", "session"):
        assert out[op][0] == "EPERM", out
        assert f"uid {NOBODY}" in out[op][1]
    assert host.client().status()["files"] == []


def test_kho_dump_matches_dtc(host: HostProcess) -> None:
    c = host.client()
    fd = os.memfd_create("dump-me", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 16)
    c.preserve_fd(fd)
    s = c.create_session("dump-session")
    other = os.memfd_create("dump-me-too")  # one file is preserved once (v7.2)
    s.preserve_fd(other, 5)
    host.update()
    ours = host.luo("kho", "dump", "--incoming").stdout
    raw = subprocess.run([sys.executable, "-m", "luo", "--runtime-dir", str(host.root), "kho", "dump", "--raw"],
                         capture_output=True, check=True).stdout
    assert raw[:4] == b"\xd0\x0d\xfe\xed"
    kept = host.root / "tree.dtb"
    kept.write_bytes(raw)
    assert host.luo("kho", "dump", "--file", str(kept)).stdout == ours
    dtc = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-q"], input=raw, capture_output=True, check=True)
    theirs = dtc.stdout.decode()
    for needle in ('compatible = "kho-v1"', 'compatible = "luo-v1"', 'compatible = "memfd-v1"',
                   "liveupdate-number", "preserved-memory-map", "luo-session", "dump-session"):
        assert needle in ours, needle
        assert needle in theirs, needle


def test_kho_dump_outgoing_needs_prepare(host: HostProcess) -> None:
    cp = host.luo("kho", "dump", "--outgoing", check=False)
    assert cp.returncode == 1 and cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr
    host.luo("prepare")
    assert 'compatible = "luo-v1"' in host.luo("kho", "dump", "--outgoing").stdout
    host.luo("cancel")
    cp = host.luo("kho", "dump", "--incoming", check=False)
    assert cp.returncode == 1 and "ENODATA" in cp.stderr


def test_cli_errors_are_one_line(host: HostProcess) -> None:
    cp = host.luo("finish", check=False)
    assert cp.returncode == 1
    assert cp.stderr.strip() == "luo finish: EINVAL: finish is not allowed in state normal" or \
        cp.stderr.strip().startswith("luo finish: EINVAL:")
    assert cp.stderr.count("\n") == 1
    assert host.luo("state").stdout == "normal\n"
    assert host.state() == "normal"


def test_cli_without_host_is_one_line(short_dir: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "luo", "--runtime-dir", str(short_dir / "none"),
                         "--connect-timeout", "0.2", "state"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1
    assert "ECONNREFUSED" in cp.stderr and cp.stderr.count("\n") == 1


def test_runtime_dir_from_environment(host: HostProcess) -> None:
    env = {**os.environ, "LUO_RUNTIME_DIR": str(host.root)}
    cp = subprocess.run([sys.executable, "-m", "luo", "status"], capture_output=True, text=True, env=env,
                        timeout=60, check=True)
    assert "state: normal" in cp.stdout


def test_status_names_what_is_preserved(host: HostProcess) -> None:
    c = host.client()
    fd = os.memfd_create("named-for-operators", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8192)
    s = c.create_session("ops-session")
    s.preserve_fd(fd, 42)
    out = host.luo("status").stdout
    assert "ops-session" in out and "named-for-operators" in out and "42" in out and "memfd-v1" in out
    assert "size=8192" in out
    with open(f"/proc/{host.pid}/comm") as f:
        assert f.read().strip() == "luod"


def test_second_host_refused(host: HostProcess) -> None:
    cp = subprocess.run([sys.executable, "-m", "luo", "--runtime-dir", str(host.root), "host"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1 and "EADDRINUSE" in cp.stderr


def test_errnos_cross_the_socket(host: HostProcess) -> None:
    """The kernel's errnos reach libluo unchanged (a sample of the rows the core tests exhaustively)."""
    import errno

    import pytest

    from luo.errors import LuoError

    c = host.client()

    def err(fn) -> int:  # noqa: ANN001
        with pytest.raises(LuoError) as e:
            fn()
        return e.value.errno

    null = os.open("/dev/null", os.O_RDWR)
    assert err(lambda: c.preserve_fd(null)) == errno.ENOENT  # no handler, as upstream
    assert err(lambda: c.create_session("x" * 64)) == errno.EINVAL
    s = c.create_session("x" * 63)
    assert err(lambda: c.create_session("x" * 63)) == errno.EEXIST
    assert err(lambda: c.retrieve_session("nope")) == errno.ENOENT
    assert err(lambda: c.restore_fd(0)) == errno.EBUSY  # only in UPDATED
    assert err(lambda: c.unpreserve_fd(99)) == errno.ENOENT
    for token in range(129):  # no limit of 128 files per session any more (v7.2)
        s.preserve_fd(os.memfd_create(f"m{token}"), token)  # flags 0: any memfd (as upstream)
    fd = os.memfd_create("once")
    s.preserve_fd(fd, 200)
    assert err(lambda: s.preserve_fd(os.memfd_create("again"), 5)) == errno.EEXIST
    assert err(lambda: s.preserve_fd(fd, 201)) == errno.EBUSY  # one file, preserved once (v7.2)
    assert err(lambda: c.preserve_fd(fd)) == errno.EBUSY  # in the global table neither
    s.close()
    c.close()
