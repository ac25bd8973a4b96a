"""ctypes mirrors of the KVM structs the VMM moves (x86-64 layout).

Sizes are asserted in tests/vmm/test_kvm_structs.py against the numbers measured in kvm-notes.
Most state structs are only ever copied whole between KVM and the state record, so the opaque
ones (lapic, xsave, irqchip, pit, events) are byte arrays: fewer fields, nothing to mis-declare.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64, s64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64, C.c_int64


class KvmRegs(C.Structure):
    _fields_ = [
        (n, u64)
        for n in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class KvmSegment(C.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(C.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(C.Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * 4),
    ]


class KvmFpu(C.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class KvmLapicState(C.Structure):
    _fields_ = [("regs", C.c_char * 1024)]


class KvmXsave(C.Structure):
    _fields_ = [("region", u32 * 1024)]


class KvmXcr(C.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(C.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * 16), ("padding", u64 * 16)]


class KvmMsrEntry(C.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrsHeader(C.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


def kvm_msrs(n: int) -> type[C.Structure]:
    """struct kvm_msrs with room for n entries (flexible array member)."""

    class KvmMsrs(C.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * n)]

    return KvmMsrs


def kvm_msr_list(n: int) -> type[C.Structure]:
    class KvmMsrList(C.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    return KvmMsrList


class KvmCpuidEntry2(C.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class KvmCpuid2Header(C.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


def kvm_cpuid2(n: int) -> type[C.Structure]:
    class KvmCpuid2(C.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * n)]

    return KvmCpuid2


class KvmVcpuEvents(C.Structure):
    _fields_ = [("raw", C.c_char * 64)]


class KvmDebugregs(C.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class KvmMpState(C.Structure):
    _fields_ = [("mp_state", u32)]


class KvmIrqchip(C.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", C.c_char * 512)]


class KvmPitState2(C.Structure):
    _fields_ = [("raw", C.c_char * 112)]


class KvmPitConfig(C.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmClockData(C.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class KvmDeviceAttr(C.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class KvmUserspaceMemoryRegion(C.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmIrqLevel(C.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


# --- kvm_run (the mmapped per-vCPU page) ---


class KvmRunIo(C.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class KvmRunMmio(C.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class KvmRunFailEntry(C.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class KvmRunInternal(C.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunSystemEvent(C.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunExit(C.Union):
    _fields_ = [
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("fail_entry", KvmRunFailEntry),
        ("internal", KvmRunInternal),
        ("system_event", KvmRunSystemEvent),
        ("padding", C.c_char * 256),
    ]


class KvmRun(C.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", KvmRunExit),
    ]
