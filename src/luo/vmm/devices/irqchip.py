"""The in-kernel PIC pair + IOAPIC (KVM_CREATE_IRQCHIP) and PIT (KVM_CREATE_PIT2).

KVM emulates them; the VMM only creates them, raises ISA lines, and moves their state across an
update (KVM_GET/SET_IRQCHIP per chip, KVM_GET/SET_PIT2). Restore order: irqchip before PIT.
"""

from __future__ import annotations

from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.sys import ioctl
from luo.vmm.state import check_version, pack_blobs, unpack_blobs

VERSION = 1
_CHIPS = {"pic_master": K.KVM_IRQCHIP_PIC_MASTER, "pic_slave": K.KVM_IRQCHIP_PIC_SLAVE, "ioapic": K.KVM_IRQCHIP_IOAPIC}
KVM_PIT_SPEAKER_DUMMY = 1


class IrqChip:
    def __init__(self, vm_fd: int) -> None:
        self.vm_fd = vm_fd
        ioctl(vm_fd, K.KVM_CREATE_IRQCHIP, None, "KVM_CREATE_IRQCHIP")

    def set_irq(self, irq: int, level: int) -> None:
        lv = S.KvmIrqLevel(irq, level)
        ioctl(self.vm_fd, K.KVM_IRQ_LINE, lv, "KVM_IRQ_LINE")

    def save(self) -> tuple[int, bytes]:
        blobs = {}
        for name, chip_id in _CHIPS.items():
            c = S.KvmIrqchip()
            c.chip_id = chip_id
            ioctl(self.vm_fd, K.KVM_GET_IRQCHIP, c, "KVM_GET_IRQCHIP")
            blobs[name] = bytes(c)
        return VERSION, pack_blobs(blobs)

    def restore(self, version: int, payload: bytes) -> None:
        check_version("irqchip", version, VERSION)
        blobs = unpack_blobs(payload)
        for name in _CHIPS:
            c = S.KvmIrqchip.from_buffer_copy(blobs[name])
            ioctl(self.vm_fd, K.KVM_SET_IRQCHIP, c, "KVM_SET_IRQCHIP")


class Pit:
    def __init__(self, vm_fd: int) -> None:
        self.vm_fd = vm_fd
        cfg = S.KvmPitConfig()
        cfg.flags = KVM_PIT_SPEAKER_DUMMY
        ioctl(vm_fd, K.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def save(self) -> tuple[int, bytes]:
        p = S.KvmPitState2()
        ioctl(self.vm_fd, K.KVM_GET_PIT2, p, "KVM_GET_PIT2")
        return VERSION, bytes(p)

    def restore(self, version: int, payload: bytes) -> None:
        check_version("pit", version, VERSION)
        p = S.KvmPitState2.from_buffer_copy(payload)
        ioctl(self.vm_fd, K.KVM_SET_PIT2, p, "KVM_SET_PIT2")


