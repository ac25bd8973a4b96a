"""KVM ioctl numbers, capabilities and exit reasons (linux/kvm.h, x86).

Spelled out with the _IOC encoding rather than copied as hex so that a wrong size shows up as a
wrong struct in one place. Two encodings surprise (see kvm-notes): KVM_SET_IRQCHIP is _IOR and the
GET/SET_PIT2 numbers are reused by GET/SET_VCPU_EVENTS with another size.
"""

from __future__ import annotations

_NONE, _WRITE, _READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_READ | _WRITE, nr, size)


# system fd
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)

# vm fd
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, 8)
KVM_GET_IRQCHIP = _iowr(0x62, 520)
KVM_SET_IRQCHIP = _ior(0x63, 520)
KVM_CREATE_PIT2 = _iow(0x77, 64)
KVM_SET_CLOCK = _iow(0x7B, 48)
KVM_GET_CLOCK = _ior(0x7C, 48)
KVM_GET_PIT2 = _ior(0x9F, 112)
KVM_SET_PIT2 = _iow(0xA0, 112)

# vcpu fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_GET_FPU = _ior(0x8C, 416)
KVM_SET_FPU = _iow(0x8D, 416)
KVM_GET_LAPIC = _ior(0x8E, 1024)
KVM_SET_LAPIC = _iow(0x8F, 1024)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_CPUID2 = _iowr(0x91, 8)
KVM_GET_MP_STATE = _ior(0x98, 4)
KVM_SET_MP_STATE = _iow(0x99, 4)
KVM_GET_VCPU_EVENTS = _ior(0x9F, 64)
KVM_SET_VCPU_EVENTS = _iow(0xA0, 64)
KVM_GET_DEBUGREGS = _ior(0xA1, 128)
KVM_SET_DEBUGREGS = _iow(0xA2, 128)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, 4096)
KVM_SET_XSAVE = _iow(0xA5, 4096)
KVM_GET_XCRS = _ior(0xA6, 392)
KVM_SET_XCRS = _iow(0xA7, 392)
KVM_SET_DEVICE_ATTR = _iow(0xE1, 24)
KVM_GET_DEVICE_ATTR = _iow(0xE2, 24)
KVM_HAS_DEVICE_ATTR = _iow(0xE3, 24)

# request number -> name, for messages and profiles (every KVM_* name above is an ioctl)
NAMES: dict[int, str] = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_") and isinstance(v, int)}

# capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_VCPU_ATTRIBUTES = 127
KVM_CAP_IMMEDIATE_EXIT = 136

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in dict(globals()).items() if k.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# irqchip ids (KVM_GET_IRQCHIP)
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

# kvm_clock_data.flags
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# vcpu device attributes
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0

# mp states
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_HALTED = 3

# cpuid2 entry flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

# MSRs the VMM names
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_MSRS = (
    tuple(range(0x200, 0x210)) + (0x250, 0x258, 0x259) + tuple(range(0x268, 0x270)) + (MSR_MTRR_DEF_TYPE,)
)
