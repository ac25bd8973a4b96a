"""Two installations across ``luo update --to``, as ``luo qualify`` runs them: the VMM channel's
protocol (luo.abi) decides at the warm-up, before any guest is paused, whether the running VMM and
its successor from the other installation can speak. The other installation is a copy of this
one's package whose luo.abi says something else, run through a wrapper (as in
tests/host/test_qualify.py)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import luo
from luo import abi
from luo.testing.console import check_continuity
from luo.testing.host import HostProcess
from luo.testing.vms import HB_MS, MARGIN_MS, more_beats, vmm_pid, vmm_processes
from luo.testing.wait import wait_for
from luo.vmm.live.guest_state import read_guest_state
from luo.vmm.live.main import default_image

PACKAGE = Path(luo.__file__).parent


def installation(root: Path, name: str, **abi_values: int) -> str:
    """The ``luo`` command of an installation: this package, with luo.abi's ``abi_values`` if any.
    PYTHONPATH is set either way: a host passes its environment to what it starts."""
    src = PACKAGE.parent
    if abi_values:
        src = root / name
        shutil.copytree(PACKAGE, src / "luo", ignore=shutil.ignore_patterns("__pycache__"))
        text = (src / "luo" / "abi.py").read_text()
        for key, value in abi_values.items():
            text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
            assert n == 1, key
        (src / "luo" / "abi.py").write_text(text)
    wrapper = root / f"{name}-luo"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={src} LUO_GUEST_IMAGE={default_image()} "
                       f"exec {sys.executable} -m luo \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def runs_from(pid: int) -> str:
    """The PYTHONPATH a process was started with: which installation it runs."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"PYTHONPATH=")), "")


def test_successor_vmm_of_a_newer_channel_protocol_is_refused_at_prepare(vm_host, short_dir: Path) -> None:  # noqa: ANN001
    """A VMM that speaks only channel protocol 99: the update fails at prepare, naming both
    versions, and the guest never stops; exactly one VMM runs it afterwards."""
    newer = installation(short_dir, "newer", VMM_CHANNEL_PROTOCOL=99, VMM_CHANNEL_OLDEST=99)
    host: HostProcess = vm_host("v1")
    con = host.console("v1")
    pid, host_pid = vmm_pid(host, "v1"), host.pid
    since = read_guest_state(host.rt.vm_dir("v1"))["since"]
    cp = host.luo("update", "--to", newer, check=False)
    assert cp.returncode == 1, cp.stderr
    assert "EPROTONOSUPPORT: prepare failed, nothing was frozen" in cp.stderr, cp.stderr
    assert (f"VMM pid {pid} speaks VMM channel protocol {abi.VMM_CHANNEL_PROTOCOL}; this successor VMM speaks 99"
            in cp.stderr), cp.stderr
    assert host.pid == host_pid and host.state() == "normal"
    wait_for(lambda: vmm_processes(host) == [pid], 30, "the refused successor VMM to be gone")
    more_beats(host, "v1", 3)
    assert vmm_pid(host, "v1") == pid
    guest = read_guest_state(host.rt.vm_dir("v1"))
    assert guest["state"] == "running" and guest["since"] == since  # never paused, not even briefly
    assert not check_continuity(con.heartbeats(), HB_MS, MARGIN_MS)
    assert not con.problems()


def test_a_newer_vmm_speaks_down_both_ways(vm_host, short_dir: Path) -> None:  # noqa: ANN001
    """A version at channel protocol 2 that still speaks 1 takes the guest over from this one,
    and gives it back (a rollback is an update like any other)."""
    newer = installation(short_dir, "newer", VMM_CHANNEL_PROTOCOL=abi.VMM_CHANNEL_PROTOCOL + 1)
    this = installation(short_dir, "this")
    host: HostProcess = vm_host("v2")
    con = host.console("v2")
    blackouts = []
    for to, src in ((newer, str(short_dir / "newer")), (this, str(PACKAGE.parent))):
        old = vmm_pid(host, "v2")
        r = host.update("--to", to)
        blackouts.append(r["vms"]["v2"]["blackout_ms"])
        new = vmm_pid(host, "v2")
        assert new != old and runs_from(new) == src
        wait_for(lambda: vmm_processes(host) == [new], 30, "the previous VMM to exit")  # noqa: B023
        host.luo("finish")
    more_beats(host, "v2", 3)
    assert not check_continuity(con.heartbeats(), HB_MS, max(blackouts) + MARGIN_MS)
    assert not con.problems()
