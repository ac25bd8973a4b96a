"""Versions on the VMM's two channels (luo.abi): the host<->VMM registration and the VMM<->successor
VMM warm-up. Each side checks the other's protocol and refuses a peer it has none in common with,
before anything is paused. No KVM here: every refusal happens before a VM would be built.
(tests/vm/test_vm_versions.py runs the same refusal between two installations with a real guest.)"""

from __future__ import annotations

import errno
import gc
import os
import socket
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from luo import abi
from luo.client.connection import open_socket
from luo.errors import LuoError
from luo.host.runtime import RuntimeDir
from luo.host.vms import VmEntry, VmmSubsystem
from luo.host.wire import recv_msg, send_msg
from luo.testing.host import HostProcess
from luo.vmm.live.host_link import HostLink
from luo.vmm.live.incoming import run_successor_vmm
from luo.vmm.live.outgoing import RunningVmm

HOST_RANGE = f"{abi.VMM_HOST_OLDEST} to {abi.VMM_HOST_PROTOCOL}"


def register(host: HostProcess, name: str, **extra: Any) -> tuple[socket.socket, dict[str, Any]]:
    sock = open_socket(host.rt.socket, 5.0)
    send_msg(sock, {"op": "vm_register", "name": name, "pid": os.getpid(), "info": {}, **extra})
    got = recv_msg(sock)
    assert got is not None
    return sock, got[0]


def vm_status(host: HostProcess, name: str) -> dict[str, Any]:
    return {v["name"]: v for v in host.client().status()["vms"]}[name]


# -- host <-> VMM: at registration ----------------------------------------------------------------

def test_host_refuses_a_vmm_of_no_common_protocol(host: HostProcess) -> None:
    sock, reply = register(host, "new", **abi.announce(99, 99))
    sock.close()
    assert reply["errno"] == errno.EPROTONOSUPPORT, reply
    assert reply["error"] == (f"the VMM pid {os.getpid()} of VM 'new' speaks VMM-host protocol 99; this host "
                              f"speaks {HOST_RANGE}: none in common")
    assert "new" not in {v["name"] for v in host.client().status()["vms"]}
    sock, reply = register(host, "bad", protocol="2")
    sock.close()
    assert reply["errno"] == errno.EPROTO, reply


def test_host_takes_unversioned_and_current_vmms_and_says_its_own(host: HostProcess) -> None:
    old, reply = register(host, "old")  # a VMM from before the field: protocol 1
    assert reply["errno"] == 0 and abi.announced(reply) == (abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST)
    new, reply = register(host, "cur", **abi.announce(abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST))
    assert reply["errno"] == 0
    assert vm_status(host, "old")["protocol"] == 1
    assert vm_status(host, "cur")["protocol"] == abi.VMM_HOST_PROTOCOL
    old.close()
    new.close()


def test_vmm_refuses_a_host_of_no_common_protocol(short_dir: Path) -> None:
    """A fake host that answers the registration with protocol 99 only: the VMM closes and says so."""
    rt = RuntimeDir(short_dir / "rt")
    rt.ensure()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(rt.socket))
    listener.listen(1)
    asked: list[dict[str, Any]] = []

    def fake_host() -> None:
        conn, _ = listener.accept()
        got = recv_msg(conn)
        assert got is not None
        asked.append(got[0])
        send_msg(conn, {"errno": 0, **abi.announce(99, 99)})
        assert recv_msg(conn) is None  # the VMM hung up
        conn.close()

    t = threading.Thread(target=fake_host)
    t.start()
    link = HostLink(rt, "g")
    with pytest.raises(LuoError) as e:
        link.register({})
    t.join(10)
    listener.close()
    assert e.value.errno == errno.EPROTONOSUPPORT
    assert e.value.message == ("the host speaks VMM-host protocol 99; this VMM of VM 'g' speaks "
                               f"{HOST_RANGE}: none in common")
    assert abi.announced(asked[0]) == (abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST)
    assert link.sock is None


class _Driver:
    """A VMM driver that records what the subsystem asks of it."""

    kind = "luo"

    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str]]] = []

    def freeze(self, vms: list[VmEntry], timeout: float) -> dict[str, dict[str, Any]]:
        self.asked.append(("freeze", [v.name for v in vms]))
        return {v.name: {"pause_ms": 1.0} for v in vms}


class _Supervisor:
    """What VmmSubsystem asks of the supervisor."""

    def __init__(self, switch: bool) -> None:
        self.switch_after_handover = switch
        self.driver = _Driver()

    def by_driver(self, vms: list[VmEntry]) -> Any:
        return [(self.driver, list(vms))] if vms else []

    def kill_successors(self) -> None:
        raise AssertionError("nothing failed")


def test_update_freezes_only_vmms_that_may_not_pause_on_handed_over() -> None:
    """VMM-host protocol 1 VMMs may be from before the VMs switched after the host's handover: their
    handed_over expects a paused guest, so an update freezes them with the host, as it did then."""
    old, new = VmEntry("old", 1, protocol=1), VmEntry("new", 2, protocol=abi.VMM_HOST_PROTOCOL)
    for switch, asked in ((True, [("freeze", ["old"])]), (False, [("freeze", ["old", "new"])])):
        sup = _Supervisor(switch)
        sub = VmmSubsystem(sup)  # type: ignore[arg-type]
        sub.prepared = [old, new]
        assert sub.freeze(2) == 2
        assert sup.driver.asked == asked
        assert sub.frozen == [old, new]
    sup = _Supervisor(True)
    sub = VmmSubsystem(sup)  # type: ignore[arg-type]
    sub.prepared = [new]
    sub.freeze(1)
    assert sup.driver.asked == []  # today's VMMs run on through the host's freeze


# -- VMM <-> successor VMM: at warm-up ------------------------------------------------------------

def _memfds() -> tuple[int, int]:
    ram, state = os.memfd_create("ram"), os.memfd_create("state")
    os.ftruncate(ram, 1 << 20)
    return ram, state


def test_successor_vmm_refuses_a_predecessor_of_no_common_protocol(short_dir: Path) -> None:
    rt = RuntimeDir(short_dir / "rt")
    rt.ensure()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(run_successor_vmm(rt, "g", theirs.detach())))
    t.start()
    ram, state = _memfds()
    send_msg(mine, {"op": "warm", "pid": 4321, "name": "g", "mem": 1 << 20, "cpus": 1, "info": {},
                    **abi.announce(99, 99)}, (ram, state))
    os.close(ram)
    os.close(state)
    got = recv_msg(mine)
    t.join(10)
    mine.close()
    assert got is not None and out == [1]
    reply = got[0]
    assert reply["errno"] == errno.EPROTONOSUPPORT
    assert reply["error"] == (f"VMM pid 4321 speaks VMM channel protocol 99; this successor VMM speaks "
                              f"{abi.VMM_CHANNEL_PROTOCOL}: none in common")
    assert abi.announced(reply) == (abi.VMM_CHANNEL_PROTOCOL, abi.VMM_CHANNEL_OLDEST)


def _prepare_against(reply: dict[str, Any]) -> tuple[RunningVmm, subprocess.Popen[bytes], list[dict[str, Any]],
                                                     LuoError | None]:
    """RunningVmm.prepare against a fake successor VMM (a sleeping process stands for it) that
    answers ``warm`` with ``reply``; returns what the fake received."""
    sleeper = subprocess.Popen(["sleep", "60"])
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seen: list[dict[str, Any]] = []

    def fake() -> None:
        while (got := recv_msg(theirs)) is not None:
            for fd in got[1]:
                os.close(fd)
            seen.append(got[0])
            if got[0].get("op") == "warm":
                send_msg(theirs, {"op": "warm", "errno": 0, "pid": sleeper.pid, **reply})
        theirs.close()

    t = threading.Thread(target=fake)
    t.start()
    ram, state = _memfds()
    vm = SimpleNamespace(name="g", mem_bytes=1 << 20, ncpus=1, memfd=ram, paused=False)
    vmm = RunningVmm(vm, None, state, {})  # type: ignore[arg-type]
    err = None
    try:
        vmm.prepare([mine.detach()])
    except LuoError as e:
        err = e
    finally:
        gc.enable()
    if err is None:
        vmm._drop_successor()
    t.join(10)
    sleeper.wait(10)
    os.close(ram)
    os.close(state)
    return vmm, sleeper, seen, err


def test_vmm_refuses_a_successor_of_no_common_protocol_before_the_pause() -> None:
    """A successor that did not check (or could not tell) is refused by the outgoing VMM itself:
    killed and gone before prepare fails, and the guest was never paused."""
    vmm, sleeper, seen, err = _prepare_against(abi.announce(99, 99))
    assert err is not None and err.errno == errno.EPROTONOSUPPORT
    assert err.message == (f"successor VMM for g refused: successor VMM pid {sleeper.pid} speaks VMM channel "
                           f"protocol 99; this VMM speaks {abi.VMM_CHANNEL_PROTOCOL}: none in common")
    assert [m["op"] for m in seen] == ["warm", "abort"]
    assert abi.announced(seen[0]) == (abi.VMM_CHANNEL_PROTOCOL, abi.VMM_CHANNEL_OLDEST)
    assert sleeper.returncode == -9  # killed and gone: two VMMs never run one guest
    assert vmm.successor is None and vmm.successor_pid == 0
    assert not vmm.vm.paused


def test_vmm_takes_an_unversioned_successor() -> None:
    """A successor from before the field says nothing: protocol 1, which this VMM speaks."""
    vmm, sleeper, seen, err = _prepare_against({})
    assert err is None
    assert [m["op"] for m in seen] == ["warm", "abort"]  # the abort: the test's own cleanup
