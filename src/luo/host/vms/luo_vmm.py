"""Our KVM VMM (``luo.vmm``) as a VMM driver: ``luo vmm run`` runs a VM, ``luo vmm successor``
takes it over at an update (``luo.vmm.live``)."""

from __future__ import annotations

import sys
from typing import Any

from luo.host import fields
from luo.host.vms.driver import VmSpec
from luo.host.vms.entry import VmEntry
from luo.host.vms.process_driver import ProcessVmmDriver


class LuoVmmDriver(ProcessVmmDriver):
    kind = "luo"
    takes_pool = True
    description = "luo's own KVM VMM (guest RAM in a preserved memfd; the VM rebuilt from saved state)"

    def options(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"image": fields.text(msg, "image", 4096, None), "cmdline": fields.text(msg, "cmdline", 4096, None)}

    def vmm_argv(self, spec: VmSpec) -> list[str]:
        argv = [sys.executable, "-m", "luo", "--runtime-dir", str(self.runtime.root),
                "vmm", "run", "--name", spec.name, "--mem", str(spec.mem), "--cpus", str(spec.cpus)]
        if spec.options.get("image"):
            argv += ["--image", spec.options["image"]]
        if spec.options.get("cmdline") is not None:
            argv += ["--cmdline", spec.options["cmdline"]]
        if spec.options.get("pool_extents"):
            argv += ["--pool-fd", str(spec.options["pool_fd"]),
                     "--pool-extents", ",".join(f"{o:#x}+{n:#x}" for o, n in spec.options["pool_extents"])]
        return argv

    def successor_argv(self, vm: VmEntry, successor_cmd: list[str], channel_fd: int) -> list[str]:
        return [*successor_cmd, "--runtime-dir", str(self.runtime.root), "vmm", "successor",
                "--name", vm.name, "--channel", str(channel_fd)]
