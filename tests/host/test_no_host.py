"""With no host listening, every ``luo`` command that needs one says so at once; libluo waits for a
host only when asked to, and still reconnects to the successor after an update."""

from __future__ import annotations

import argparse
import errno
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo.cli import build_parser
from luo.client import Client, connect
from luo.errors import LuoError
from luo.testing.host import HostProcess

LIMIT_S = 1.0  # wall time of a whole `luo` run, Python's start-up included

# Every CLI command that is a client of the host's control socket (leaves of the command tree,
# with the arguments they need to get as far as talking to the host).
NEEDS_HOST: dict[str, list[str]] = {
    "state": ["state"],
    "prepare": ["prepare"],
    "freeze": ["freeze"],
    "cancel": ["cancel"],
    "finish": ["finish"],
    "update": ["update"],
    "status": ["status"],
    "selftest": ["selftest"],
    "kho dump": ["kho", "dump"],
    "kho dump --outgoing": ["kho", "dump", "--outgoing"],
    "vm start": ["vm", "start", "nohost"],
    "vm list": ["vm", "list"],
    "vm stop": ["vm", "stop", "nohost"],
    "vmm run": ["vmm", "run", "--name", "nohost"],
    "vmm successor": ["vmm", "successor", "--name", "nohost", "--channel", "0"],
    "pool status": ["pool", "status"],
    "pool alloc": ["pool", "alloc", "client:x", "2M"],
    "pool free": ["pool", "free", "client:x"],
    "pool shard list": ["pool", "shard", "list"],
    "pool shard create": ["pool", "shard", "create", "2M"],
    "pool shard delete": ["pool", "shard", "delete", "shard0"],
    "pool shard mount": ["pool", "shard", "mount", "shard0", "/nonexistent-mnt"],
    "pool shard umount": ["pool", "shard", "umount", "shard0"],
}

# The commands that are not clients of a running host, and why.
NOT_CLIENTS = {
    "host": "starts the host",
    "keeper": "started by luod to hold its fds; not a client of the control socket",
    "demo": "starts a host of its own",
    "qualify": "starts hosts of its own",
    "vm console": "reads the VM's console log from the runtime dir",
    "run": "runs a program; without a host its open of /dev/liveupdate fails with ENOENT (tests/uapi)",
    "timeline": "reads an update record from the runtime dir (tests/observe)",
    "metrics": "reads the update records; asks the host's status if one listens, else says luo_host_up 0 (tests/observe)",
}


def leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix.strip()
        return
    for name, sub in subs[0].choices.items():
        yield from leaf_commands(sub, f"{prefix} {name}")


def test_every_command_is_classified() -> None:
    """A new subcommand must be added to NEEDS_HOST (and so tested below) or to NOT_CLIENTS."""
    known = {c.split(" --")[0] for c in NEEDS_HOST} | set(NOT_CLIENTS)
    assert sorted(set(leaf_commands(build_parser())) - known) == []


@pytest.fixture(params=["no socket file", "stale socket file"])
def empty_runtime(request: pytest.FixtureRequest, short_dir: Path) -> Path:
    root = short_dir / "rt"
    root.mkdir()
    if request.param == "stale socket file":  # a host that died without removing its socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(str(root / "liveupdate"))
        s.close()
    return root


@pytest.mark.parametrize("command", list(NEEDS_HOST))
def test_command_without_host_fails_at_once(command: str, empty_runtime: Path) -> None:
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "luo", "--runtime-dir", str(empty_runtime), *NEEDS_HOST[command]],
                        capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert cp.returncode != 0
    sock = empty_runtime / "liveupdate"
    assert f"ECONNREFUSED: no luo host listens on {sock}" in cp.stderr, cp.stderr
    assert "luo --runtime-dir" in cp.stderr and " host`" in cp.stderr
    assert cp.stderr.count("\n") == 1, cp.stderr
    assert took <= LIMIT_S, f"luo {command} took {took:.3f} s to say there is no host"


def test_libluo_without_host_fails_at_once(empty_runtime: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(LuoError) as got:
        connect(empty_runtime, timeout=0)
    assert got.value.errno == errno.ECONNREFUSED
    with pytest.raises(LuoError) as got:
        Client(empty_runtime).status()  # the default is not to wait either
    assert got.value.errno == errno.ECONNREFUSED
    assert time.monotonic() - t0 < 0.2


def test_connect_with_timeout_waits_for_a_host_that_starts_later(short_dir: Path) -> None:
    host = HostProcess(short_dir / "rt")
    connecting = threading.Event()
    started_at: list[float] = []

    def start_later() -> None:
        connecting.wait(10)
        time.sleep(0.2)  # only to put the host's start after the connect began
        started_at.append(time.monotonic())
        host.start()

    t = threading.Thread(target=start_later)
    t.start()
    try:
        assert not host.rt.socket.exists()
        t0 = time.monotonic()
        connecting.set()
        c = connect(host.root, timeout=5)  # returns once the host accepts
        with c:
            assert c.state.label == "normal"
            assert started_at and started_at[0] > t0, "the host was there before the connect"
    finally:
        t.join(30)
        host.stop()


def test_client_follows_the_host_across_an_update_without_waiting(host: HostProcess) -> None:
    """The old host exits after the handover: the established connection breaks, and the next
    call is retried on a fresh one, which the successor accepts (no timeout needed)."""
    with Client(host.root) as c:
        old = c.pid()
        result = host.update()
        assert c.pid() == result["new_pid"] != old
        assert c.state.label == "updated"


def test_client_whose_host_died_fails_at_once(host: HostProcess) -> None:
    with Client(host.root) as c:
        assert c.state.label == "normal"
        host.stop()
        t0 = time.monotonic()
        with pytest.raises(LuoError) as got:
            c.status()
        assert got.value.errno == errno.ECONNREFUSED and "no luo host listens" in got.value.message
        assert time.monotonic() - t0 < 0.2
