"""VMs under the host: supervision (``supervision``), the ``vmm`` LUO subsystem (``subsystem``) and
the VMM driver seam (``driver``) with one implementation per kind of VMM (``luo_vmm``)."""

from luo.host.vms.entry import VM_NAME, VmEntry, session_name
from luo.host.vms.subsystem import VmmSubsystem
from luo.host.vms.supervision import VmSupervisor, install

__all__ = ["VM_NAME", "VmEntry", "VmSupervisor", "VmmSubsystem", "install", "session_name"]
