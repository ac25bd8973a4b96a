"""Per-vCPU CPUID: what KVM supports, with the APIC ids and the hypervisor bit filled in."""

from __future__ import annotations

import ctypes as C

from luo.vmm.kvm import structs as S


def vcpu_cpuid(supported: list[S.KvmCpuidEntry2], index: int, ncpus: int) -> bytes:
    """The struct kvm_cpuid2 (header + entries) for vCPU ``index`` of ``ncpus``, as bytes."""
    entries = [S.KvmCpuidEntry2.from_buffer_copy(e) for e in supported]
    for e in entries:
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (index << 24) | (min(ncpus, 255) << 16)
            e.ecx |= 1 << 31  # running under a hypervisor
            e.edx |= 1 << 28  # HTT: the logical-count field above is valid
        elif e.function in (0xB, 0x1F):
            e.edx = index  # x2APIC id
    buf = S.kvm_cpuid2(len(entries))()
    buf.nent = len(entries)
    for i, e in enumerate(entries):
        buf.entries[i] = e
    return bytes(buf)


def cpuid_struct(raw: bytes) -> C.Structure:
    n = S.KvmCpuid2Header.from_buffer_copy(raw[:8]).nent
    return S.kvm_cpuid2(n).from_buffer_copy(raw[: 8 + 40 * n])


def nx_supported(supported: list[S.KvmCpuidEntry2]) -> bool:
    return any(e.function == 0x80000001 and e.edx & (1 << 20) for e in supported)
