"""``luo vmm run --vmm qemu``: the luo VMM process of a QEMU VM (it answers the host for the VM,
holds its session, relays its console, and runs QEMU as its machine: luo.qemu.machine)."""

from __future__ import annotations

from luo.host.procname import favour_this_session, favour_this_thread, set_process_name
from luo.host.runtime import RuntimeDir, resolve_runtime_dir
from luo.qemu.machine import QemuConfig, QemuMachine


def run_qemu_vmm(runtime_dir: str | None, name: str, mem_bytes: int, cpus: int, config: QemuConfig,
                 pool_fd: int | None = None, pool_extents: list[tuple[int, int]] | None = None) -> int:
    """``pool_fd``/``pool_extents``: guest RAM is one extent of the host's memory pool."""
    from luo.vmm.live.guest_state import write_guest_state
    from luo.vmm.live.host_link import HostLink
    from luo.vmm.live.outgoing import RunningVmm
    from luo.vmm.live.statefile import create_state_memfd

    set_process_name(f"luo-vmm:{name}")
    rt = RuntimeDir(resolve_runtime_dir(runtime_dir))
    vdir = rt.vm_dir(name)
    vdir.mkdir(parents=True, exist_ok=True)
    pool = (pool_fd, pool_extents[0][0]) if pool_fd is not None and pool_extents else None
    vm = QemuMachine.boot(name, mem_bytes, cpus, vdir, config, pool)
    favour_this_thread()
    favour_this_session()
    state_fd = create_state_memfd(name)
    link = HostLink(rt, name, ram_in_pool=pool is not None)
    link.preserve(vm.memfd, state_fd)  # from the VM's start: nothing to preserve inside a blackout
    vm.start()
    write_guest_state(rt, name, "running", "booted")
    info = {"mem": mem_bytes, "cpus": cpus, "qemu_pid": vm.proc.pid, **config.info()}
    if pool_extents:
        info["pool"] = [list(p) for p in pool_extents]
    return RunningVmm(vm, link, state_fd, info).serve()  # type: ignore[arg-type]
