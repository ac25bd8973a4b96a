"""What the QEMU VM tests share: a host with QEMU VMs, and how to look at them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luo.testing.console import Console
from luo.testing.host import HostProcess
from luo.testing.wait import wait_for

HB_MS = 100.0
MARGIN_MS = 300.0  # TCG on a shared 2-core machine: the guest's own timer beats are late by this much


def needs_qemu_and_guest() -> None:
    from luo.qemu.guest import default_initrd, default_kernel, qemu_binary

    try:
        qemu_binary()
        default_kernel()
        default_initrd()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the QEMU guest is not set up: {e} (run ./scripts/setup.sh)")


def qemu_host(short_dir: Path) -> Iterator[Callable[..., HostProcess]]:
    hosts: list[HostProcess] = []

    def start(*vms: tuple[str, str], faults: str = "") -> HostProcess:
        h = HostProcess(short_dir / "rt", {"LUO_ALLOW_FAULTS": "1", "LUO_FAULTS": faults}).start()
        hosts.append(h)
        for name, kind in vms:
            if kind == "qemu":
                h.luo("vm", "start", name, "--vmm", "qemu", "--mem", "512M", "--cpus", "1", timeout=120)
            else:
                h.luo("vm", "start", name, "--mem", "256M", "--cpus", "1")
        for name, _ in vms:
            wait_for(lambda n=name: h.console(n).count() >= 2, 60, f"{name}'s first heartbeats")
        return h

    yield start
    for h in hosts:
        h.stop()


def vm_of(host: HostProcess, name: str) -> dict:
    return {v["name"]: v for v in host.client().status()["vms"]}[name]


def memfd_inode(pid: int, name: str) -> tuple[int, int]:
    """(dev, ino) of the memfd ``luo-vm:<name>:ram`` that process ``pid`` holds."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/memfd:luo-vm:{name}:ram"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                return st.st_dev, st.st_ino
        except OSError:
            continue
    raise AssertionError(f"pid {pid} holds no RAM memfd of {name}")


def more_beats(con: Console, n: int) -> None:
    have = con.count()
    wait_for(lambda: con.count() >= have + n, 30, f"{n} more heartbeats")


