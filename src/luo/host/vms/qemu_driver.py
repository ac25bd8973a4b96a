"""QEMU VMs (``luo vm start NAME --vmm qemu``): a luo VMM process per VM runs QEMU as its machine
(luo.qemu.machine) and speaks the host↔VMM protocol like ours, so the host drives it the same way;
what differs is the program, its options, and which QEMU the successor runs."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from luo.errors import LuoError
from luo.host import fields
from luo.host.vms.driver import VmSpec
from luo.host.vms.entry import VmEntry
from luo.host.vms.process_driver import ProcessVmmDriver

ACCELS = ("auto", "kvm", "tcg")


def _path(msg: dict[str, Any], key: str) -> str | None:
    """An optional file the VMM will open: it must exist now, so a typo is refused at once."""
    p = fields.text(msg, key, 4096, None)
    if p is not None and not os.path.exists(p):
        raise fields.refuse(key, f"names no file: {p!r}")
    return p


class QemuVmmDriver(ProcessVmmDriver):
    kind = "qemu"
    description = "QEMU with a stock Linux guest (RAM in a preserved memfd; device state migrated, RAM never)"

    def options(self, msg: dict[str, Any]) -> dict[str, Any]:
        accel = fields.text(msg, "accel", 8, "auto")
        if accel not in ACCELS:
            raise fields.refuse("accel", f"must be one of {', '.join(ACCELS)}, not {accel!r}")
        opts = {"kernel": _path(msg, "kernel"), "initrd": _path(msg, "initrd"), "qemu": _path(msg, "qemu"),
                "append": fields.text(msg, "append", 4096, None), "accel": accel}
        if opts["kernel"] is None or opts["initrd"] is None:
            from luo.qemu.guest import default_initrd, default_kernel

            opts["kernel"] = opts["kernel"] or str(default_kernel())  # ENOENT naming the set-up when missing
            opts["initrd"] = opts["initrd"] or str(default_initrd())
        if opts["qemu"] is None:
            from luo.qemu.guest import qemu_binary

            opts["qemu"] = qemu_binary()
            if not opts["qemu"]:
                raise LuoError(errno.ENOENT, "no qemu-system-x86_64 on PATH: run scripts/setup.sh or give --qemu")
        return opts

    pool_extents_max = 1  # one file memory backend: one contiguous extent at an offset

    def pool_ok(self, spec: VmSpec) -> bool:
        """From the pool only with a QEMU that maps part of a file (memory-backend-file ``offset``,
        not 7.2's); a VM on another QEMU keeps a memfd of its own, as with ``--no-pool``."""
        from luo.qemu.machine import supports_offset

        return supports_offset(str(spec.options.get("qemu")))

    def vmm_argv(self, spec: VmSpec) -> list[str]:
        argv = [sys.executable, "-m", "luo", "--runtime-dir", str(self.runtime.root), "vmm", "run", "--vmm", "qemu",
                "--name", spec.name, "--mem", str(spec.mem), "--cpus", str(spec.cpus)]
        for k in ("kernel", "initrd", "append", "qemu", "accel"):
            if spec.options.get(k) is not None:
                argv += [f"--{k}", str(spec.options[k])]
        if spec.options.get("pool_extents"):
            argv += ["--pool-fd", str(spec.options["pool_fd"]),
                     "--pool-extents", ",".join(f"{o:#x}+{n:#x}" for o, n in spec.options["pool_extents"])]
        return argv

    def successor_argv(self, vm: VmEntry, successor_cmd: list[str], channel_fd: int) -> list[str]:
        argv = [*successor_cmd, "--runtime-dir", str(self.runtime.root), "vmm", "successor",
                "--name", vm.name, "--channel", str(channel_fd)]
        qemu = self.successor_options.get("qemu")
        return [*argv, "--qemu", qemu] if qemu else argv

    def describe(self, vm: VmEntry) -> dict[str, Any]:
        return {k: vm.info[k] for k in ("qemu", "kernel", "accel", "machine", "qemu_pid", "cpr", "mode") if k in vm.info}
