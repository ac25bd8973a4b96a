"""Process entry points of a VMM under luo: ``luo vmm run`` and ``luo vmm successor``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from luo.host.procname import favour_this_session, favour_this_thread, set_process_name
from luo.host.runtime import RuntimeDir, resolve_runtime_dir

DEFAULT_CMDLINE = "hb_ms=100 stall_ms=50"


def default_image() -> str:
    env = os.environ.get("LUO_GUEST_IMAGE")
    if env:
        return env
    return str(Path(__file__).resolve().parents[4] / "guest" / "build" / "luo-guest.elf")


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


SWITCH_INTERVAL_MS = 0.2


def _switch_interval() -> None:
    """How long a thread may hold the GIL while another wants it: Python's default is 5 ms. A vCPU
    thread needs the GIL for every exit it handles and to leave its park at a resume, and waited
    up to that long behind the VMM's main thread: at 0.2 ms the 1 GiB blackout median went from
    1.44 to 1.02 ms and its p99 from 3.15 to 1.98 ms (bench/blackout.py, same machine, one run after
    the other; docs/benchmarks.md). ``LUO_VMM_SWITCH_INTERVAL_MS`` overrides it (5 = Python's)."""
    sys.setswitchinterval(float(os.environ.get("LUO_VMM_SWITCH_INTERVAL_MS") or SWITCH_INTERVAL_MS) / 1000.0)


def _logging(name: str) -> None:
    _switch_interval()
    logging.basicConfig(level=os.environ.get("LUO_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s luo-vmm:{name}[{os.getpid()}] %(levelname)s %(message)s")


def run_vmm(runtime_dir: str | None, name: str, mem: str, cpus: int, image: str | None, cmdline: str | None,
            pool_fd: int | None = None, pool_extents: list[tuple[int, int]] | None = None) -> int:
    """``pool_fd``/``pool_extents``: guest RAM is these extents of the host's memory pool (the host
    allocated them for ``vm:NAME`` and passed the pool's memfd), not a memfd of its own."""
    from luo.vmm.devices.console_sink import FileConsoleSink
    from luo.vmm.live.guest_state import write_guest_state
    from luo.vmm.live.host_link import HostLink
    from luo.vmm.live.outgoing import RunningVmm
    from luo.vmm.live.statefile import create_state_memfd
    from luo.vmm.vm import Vm

    _logging(name)
    set_process_name(f"luo-vmm:{name}")
    rt = RuntimeDir(resolve_runtime_dir(runtime_dir))
    vdir = rt.vm_dir(name)
    vdir.mkdir(parents=True, exist_ok=True)
    image = image or default_image()
    cmdline = DEFAULT_CMDLINE if cmdline is None else cmdline
    mem_bytes = parse_size(mem)
    vm = Vm.create(name, mem_bytes, cpus, memfd=pool_fd, console=FileConsoleSink(str(vdir / "console.log")),
                   extents=pool_extents)
    vm.boot(image, cmdline)
    favour_this_thread()  # after Vm.create: the vCPU threads keep the normal weight
    favour_this_session()  # and the whole VMM before host work
    state_fd = create_state_memfd(name)
    link = HostLink(rt, name, ram_in_pool=pool_fd is not None)
    link.preserve(vm.memfd, state_fd)  # from the VM's start: nothing to preserve inside a blackout
    vm.start()
    write_guest_state(rt, name, "running", "booted")
    info: dict[str, object] = {"mem": mem_bytes, "cpus": cpus, "image": image, "cmdline": cmdline}
    if pool_extents is not None:  # the VM's record: its successor maps the same extents
        info["pool"] = [list(p) for p in pool_extents]
    return RunningVmm(vm, link, state_fd, info).serve()


def run_successor(runtime_dir: str | None, name: str, channel: int) -> int:
    _logging(name)
    set_process_name(f"luo-vmm+:{name}")
    from luo.vmm.live.incoming import run_successor_vmm

    return run_successor_vmm(RuntimeDir(resolve_runtime_dir(runtime_dir)), name, channel)
