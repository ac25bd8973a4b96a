"""KVM struct sizes and the surprising ioctl encodings, against the numbers measured in kvm-notes."""

from __future__ import annotations

import ctypes as C

import pytest

from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (S.KvmRegs, 144),
        (S.KvmSregs, 312),
        (S.KvmFpu, 416),
        (S.KvmLapicState, 1024),
        (S.KvmXsave, 4096),
        (S.KvmXcrs, 392),
        (S.KvmIrqchip, 520),
        (S.KvmPitState2, 112),
        (S.KvmClockData, 48),
        (S.KvmVcpuEvents, 64),
        (S.KvmDebugregs, 128),
        (S.KvmUserspaceMemoryRegion, 32),
        (S.KvmMsrsHeader, 8),
        (S.KvmMsrEntry, 16),
        (S.KvmCpuid2Header, 8),
        (S.KvmCpuidEntry2, 40),
        (S.KvmMpState, 4),
        (S.KvmDeviceAttr, 24),
        (S.KvmPitConfig, 64),
        (S.KvmIrqLevel, 8),
        (S.KvmSegment, 24),
        (S.KvmDtable, 16),
    ],
)
def test_struct_size(struct: type[C.Structure], size: int) -> None:
    assert C.sizeof(struct) == size


def test_flexible_arrays() -> None:
    assert C.sizeof(S.kvm_msrs(3)) == 8 + 3 * 16
    assert C.sizeof(S.kvm_cpuid2(2)) == 8 + 2 * 40
    assert C.sizeof(S.kvm_msr_list(5)) == 4 + 5 * 4


def test_kvm_run_offsets() -> None:
    assert S.KvmRun.immediate_exit.offset == 1
    assert S.KvmRun.exit_reason.offset == 8
    assert S.KvmRun.exit.offset == 32
    assert C.sizeof(S.KvmRunExit) == 256


def test_surprising_encodings() -> None:
    assert K.KVM_SET_IRQCHIP == 0x8208AE63
    assert K.KVM_GET_IRQCHIP == 0xC208AE62
    assert K.KVM_GET_DEVICE_ATTR >> 30 == 1  # _IOW
    assert K.KVM_GET_PIT2 & 0xFF == K.KVM_GET_VCPU_EVENTS & 0xFF == 0x9F
    assert K.KVM_GET_PIT2 != K.KVM_GET_VCPU_EVENTS
    assert K.KVM_RUN == 0xAE80
    assert K.KVM_CREATE_VM == 0xAE01
    assert K.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert K.KVM_GET_REGS == 0x8090AE81
    assert K.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
