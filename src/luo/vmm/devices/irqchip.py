"""The in-kernel PIC pair + IOAPIC (KVM_CREATE_IRQCHIP) and PIT (KVM_CREATE_PIT2).

KVM emulates them; the VMM only creates them, raises ISA lines, and moves their state across an
update (KVM_GET/SET_IRQCHIP per chip, KVM_GET/SET_PIT2). Restore order: irqchip before PIT.

Version 2 of the irqchip payload is the three raw kvm_irqchip structs back to back (PIC master,
PIC slave, IOAPIC), read and written in place by the VM's prepared ioctl batch
(``v2_add_*_ops``); version 1 (named blobs) is still read and written by ``save_v1``. The PIT
payload is the raw kvm_pit_state2 in both (version 1).
"""

from __future__ import annotations

import ctypes as C
import struct

from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.batch import IoctlBatch
from luo.vmm.kvm.sys import ioctl
from luo.vmm.state import check_version, pack_blobs, unpack_blobs

VERSION = 2  # irqchip, written by the fast path
VERSION_V1 = 1  # irqchip, named blobs
PIT_VERSION = 1
_CHIP = C.sizeof(S.KvmIrqchip)
_PIT = C.sizeof(S.KvmPitState2)
_CHIPS = {"pic_master": K.KVM_IRQCHIP_PIC_MASTER, "pic_slave": K.KVM_IRQCHIP_PIC_SLAVE, "ioapic": K.KVM_IRQCHIP_IOAPIC}
KVM_PIT_SPEAKER_DUMMY = 1


class IrqChip:
    def __init__(self, vm_fd: int) -> None:
        self.vm_fd = vm_fd
        ioctl(vm_fd, K.KVM_CREATE_IRQCHIP, None, "KVM_CREATE_IRQCHIP")

    def set_irq(self, irq: int, level: int) -> None:
        lv = S.KvmIrqLevel(irq, level)
        ioctl(self.vm_fd, K.KVM_IRQ_LINE, lv, "KVM_IRQ_LINE")

    V2_SIZE = 3 * _CHIP

    def v2_add_save_ops(self, b: IoctlBatch, off: int) -> None:
        """KVM_GET_IRQCHIP of each chip into ``V2_SIZE`` bytes at ``off`` (chip ids written now)."""
        for i, chip_id in enumerate(_CHIPS.values()):
            struct.pack_into("<I", b.view, off + i * _CHIP, chip_id)
            b.add(self.vm_fd, K.KVM_GET_IRQCHIP, off + i * _CHIP, _CHIP, "KVM_GET_IRQCHIP")

    def v2_add_restore_ops(self, b: IoctlBatch, off: int) -> None:
        for i in range(len(_CHIPS)):
            b.add(self.vm_fd, K.KVM_SET_IRQCHIP, off + i * _CHIP, _CHIP, "KVM_SET_IRQCHIP")

    def save_v1(self) -> tuple[int, bytes]:
        blobs = {}
        for name, chip_id in _CHIPS.items():
            c = S.KvmIrqchip()
            c.chip_id = chip_id
            ioctl(self.vm_fd, K.KVM_GET_IRQCHIP, c, "KVM_GET_IRQCHIP")
            blobs[name] = bytes(c)
        return VERSION_V1, pack_blobs(blobs)

    def restore_v1(self, version: int, payload: bytes) -> None:
        check_version("irqchip", version, VERSION_V1)
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

    V2_SIZE = _PIT

    def v2_add_save_ops(self, b: IoctlBatch, off: int) -> None:
        b.add(self.vm_fd, K.KVM_GET_PIT2, off, _PIT, "KVM_GET_PIT2")

    def v2_add_restore_ops(self, b: IoctlBatch, off: int) -> None:
        b.add(self.vm_fd, K.KVM_SET_PIT2, off, _PIT, "KVM_SET_PIT2")

    def save_v1(self) -> tuple[int, bytes]:
        p = S.KvmPitState2()
        ioctl(self.vm_fd, K.KVM_GET_PIT2, p, "KVM_GET_PIT2")
        return PIT_VERSION, bytes(p)

    def restore_v1(self, version: int, payload: bytes) -> None:
        check_version("pit", version, PIT_VERSION)
        p = S.KvmPitState2.from_buffer_copy(payload)
        ioctl(self.vm_fd, K.KVM_SET_PIT2, p, "KVM_SET_PIT2")


