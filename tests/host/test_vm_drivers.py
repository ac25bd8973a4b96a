"""The VMM driver seam (luo.host.vms.driver): how the host picks a driver, and how the ``vmm``
subsystem drives each driver's VMs and undoes exactly what succeeded. The host side only: a fake
VMM answers on a real host's registration connection, or fake drivers stand behind the subsystem.
(The real VMM behind the seam: tests/vm.)"""

from __future__ import annotations

import errno
import os
import socket
import threading
from typing import Any

import pytest

from luo import abi
from luo.client.connection import open_socket
from luo.errors import LuoError
from luo.host.vms import VmEntry, VmmSubsystem
from luo.host.vms.requests import PartialFailure
from luo.host.wire import recv_msg, send_msg
from luo.protocol import host_vmm as hv
from luo.testing.host import HostProcess
from luo.testing.wait import wait_for


def test_vm_start_names_the_drivers_it_has(host: HostProcess) -> None:
    with host.client() as c:
        with pytest.raises(LuoError) as exc:
            c.call("vm_start", name="q", vmm="xen", retry=False)
        assert exc.value.errno == errno.EINVAL
        assert "'xen'" in exc.value.message and "known: luo, qemu" in exc.value.message
        with pytest.raises(LuoError) as exc:
            c.call("vm_start", name="q", vmm=5, retry=False)
        assert exc.value.errno == errno.EINVAL
        assert "q" not in {v["name"] for v in c.call("vm_list")[0]["vms"]}  # nothing was started


class FakeVmm:
    """A registered VMM that answers every request with success and records it."""

    def __init__(self, host: HostProcess, name: str) -> None:
        self.sock = open_socket(host.rt.socket, 5.0)
        send_msg(self.sock, {"op": "vm_register", "name": name, "pid": os.getpid(), "info": {},
                             **abi.announce(abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST)})
        got = recv_msg(self.sock)
        assert got is not None and got[0]["errno"] == 0, got
        self.asked: list[str] = []
        self.thread = threading.Thread(target=self._answer, daemon=True)
        self.thread.start()

    def _answer(self) -> None:
        while True:
            try:
                got = recv_msg(self.sock)
            except OSError:
                return
            if got is None:
                return
            msg, fds = got
            for fd in fds:  # prepare's channel to the successor VMM: closing it lets the successor go
                os.close(fd)
            self.asked.append(msg["op"])
            if msg["op"] != "handed_over":
                send_msg(self.sock, {"reply": True, "seq": msg.get("seq"), "errno": 0})


def link_of(host: HostProcess, name: str) -> str:
    with host.client() as c:
        return {v["name"]: v for v in c.status()["vms"]}[name]["link"]


def test_a_vm_in_an_update_is_not_stopped_and_its_link_follows_the_table(host: HostProcess) -> None:
    vmm = FakeVmm(host, "f")
    assert link_of(host, "f") == hv.RUNNING
    with host.client() as c:
        c.prepare()
        assert vmm.asked == ["prepare"]
        assert link_of(host, "f") == hv.PREPARED
        with pytest.raises(LuoError) as exc:
            c.call("vm_stop", name="f")
        assert exc.value.errno == errno.EBUSY and "prepared for a live update" in exc.value.message
        assert vmm.asked == ["prepare"]  # refused before anything was sent
        c.cancel()
        assert vmm.asked == ["prepare", "cancel"] and link_of(host, "f") == hv.RUNNING
        c.call("vm_stop", name="f")
        assert vmm.asked[-1] == "stop" and link_of(host, "f") == hv.STOPPED
    vmm.sock.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: not vmm.thread.is_alive(), 5.0, "the fake VMM's reader ends")
    vmm.sock.close()
    assert link_of(host, "f") == hv.STOPPED  # its EOF after the stop changes nothing


# -- the subsystem over several drivers -------------------------------------------------------------

class FakeDriver:
    """A driver whose ``warm`` fails for the VMs named in ``refuse`` (after the others succeeded)."""

    def __init__(self, kind: str, refuse: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.kind = kind
        self.refuse = refuse
        self.calls: list[tuple[str, list[str]]] = []

    def _move(self, vms: list[VmEntry], op: str, good: bool = True) -> None:
        for v in vms:
            v.link.feed(op)
            v.link.feed(hv.OK if good else hv.FAILED)

    def warm(self, vms: list[VmEntry], cmd: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        self.calls.append(("warm", [v.name for v in vms]))
        for v in vms:
            self._move([v], hv.PREPARE, v.name not in self.refuse)
        if any(v.name in self.refuse for v in vms):
            answers = {v.name: {"errno": 0} for v in vms if v.name not in self.refuse}
            raise PartialFailure(answers, [f"{n}: refused" for n in sorted(self.refuse)])
        return {v.name: {"warm_ms": 1.0} for v in vms}

    def cancel(self, vms: list[VmEntry], timeout: float) -> None:
        self.calls.append(("cancel", [v.name for v in vms]))
        self._move(vms, hv.CANCEL)

    def kill_successors(self, vms: list[VmEntry]) -> None:
        self.calls.append(("kill_successors", [v.name for v in vms]))


class FakeSupervisor:
    def __init__(self, drivers: list[FakeDriver], vms: list[VmEntry]) -> None:
        self.drivers = {d.kind: d for d in drivers}
        self.vms = {v.name: v for v in vms}
        self.successor_cmd = ["luo"]
        self.request_timeout = 1.0
        self.switch_after_handover = True

    def running(self) -> list[VmEntry]:
        return [v for v in self.vms.values() if v.link.state == hv.RUNNING]

    def by_driver(self, vms: list[VmEntry]) -> Any:
        return [(d, [v for v in vms if v.kind == k]) for k, d in self.drivers.items()
                if any(v.kind == k for v in vms)]

    def kill_successors(self) -> None:
        for d, group in self.by_driver(list(self.vms.values())):
            d.kill_successors(group)


def entry(name: str, kind: str) -> VmEntry:
    v = VmEntry(name, 1, kind=kind, conn=socket.socket())  # type: ignore[arg-type]
    v.link.feed(hv.REGISTERED)
    return v


def test_a_failed_warm_up_cancels_exactly_the_vms_that_were_prepared() -> None:
    a1, a2, b1, b2 = entry("a1", "a"), entry("a2", "a"), entry("b1", "b"), entry("b2", "b")
    da, db = FakeDriver("a"), FakeDriver("b", refuse={"b2"})
    sub = VmmSubsystem(FakeSupervisor([da, db], [a1, a2, b1, b2]))  # type: ignore[arg-type]
    with pytest.raises(LuoError) as exc:
        sub.prepare()
    assert "b2: refused" in exc.value.message
    assert da.calls == [("warm", ["a1", "a2"]), ("cancel", ["a1", "a2"]), ("kill_successors", ["a1", "a2"])]
    assert db.calls == [("warm", ["b1", "b2"]), ("cancel", ["b1"]), ("kill_successors", ["b1", "b2"])]
    assert [v.link.state for v in (a1, a2, b1, b2)] == [hv.RUNNING] * 4
    for v in (a1, a2, b1, b2):
        v.conn.close()  # type: ignore[union-attr]


def test_a_good_warm_up_prepares_every_driver() -> None:
    vms = [entry("a1", "a"), entry("b1", "b")]
    da, db = FakeDriver("a"), FakeDriver("b")
    sub = VmmSubsystem(FakeSupervisor([da, db], vms))  # type: ignore[arg-type]
    assert sub.prepare() == 2
    assert [v.link.state for v in vms] == [hv.PREPARED] * 2 and sub.timings == {"a1": {"warm_ms": 1.0},
                                                                                  "b1": {"warm_ms": 1.0}}
    sub.cancel(2)
    assert [v.link.state for v in vms] == [hv.RUNNING] * 2
    for v in vms:
        v.conn.close()  # type: ignore[union-attr]
