"""One vCPU's architectural state: the boot entry state, and the save/restore pair.

Save reads every piece with one ioctl each into preallocated structs (it runs inside the
blackout); restore writes them back in the order kvm-notes found to work: CPUID, sregs, regs,
XSAVE, XCRs, MSRs (not the TSC-deadline one), TSC offset, MP state, LAPIC, TSC deadline (KVM
ignores it before the LAPIC is set), events, debug registers. The TSC itself is never written
(MSR 0x10): that would freeze the guest clock for the length of the blackout.
"""

from __future__ import annotations

import ctypes as C
import errno
import logging
import struct

from luo.errors import LuoError
from luo.vmm import cpuid as cpuid_mod
from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.sys import ioctl, ioctl_raw
from luo.vmm.kvm.system import KvmSystem
from luo.vmm.loader import BOOT_INFO_GPA, GDT_GPA, PML4_GPA
from luo.vmm.state import check_version, pack_blobs, unpack_blobs

log = logging.getLogger("luo.vmm")
VERSION = 1

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_SCE, EFER_LME, EFER_LMA, EFER_NX = 0x1, 0x100, 0x400, 0x800
APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 4, 7
MTRR_DEF_TYPE_BOOT = 0x806


def _msrs_struct(indices: list[int] | tuple[int, ...]) -> C.Structure:
    m = S.kvm_msrs(len(indices))()
    m.nmsrs = len(indices)
    for i, idx in enumerate(indices):
        m.entries[i].index = idx
    return m


def probe_msrs(fd: int, candidates: list[int]) -> tuple[int, ...]:
    """The candidates this KVM lets us read and write back (KVM_GET/SET_MSRS stop at the first failure)."""
    readable: list[int] = []
    values: list[int] = []
    rest = list(candidates)
    while rest:
        m = _msrs_struct(rest)
        n, _ = ioctl_raw(fd, K.KVM_GET_MSRS, C.addressof(m))
        n = max(n, 0)
        readable += rest[:n]
        values += [m.entries[i].data for i in range(n)]
        rest = rest[n + 1 :]
    ok: list[int] = []
    pairs = list(zip(readable, values, strict=True))
    while pairs:
        m = _msrs_struct([p[0] for p in pairs])
        for i, (_, v) in enumerate(pairs):
            m.entries[i].data = v
        n, _ = ioctl_raw(fd, K.KVM_SET_MSRS, C.addressof(m))
        n = max(n, 0)
        ok += [p[0] for p in pairs[:n]]
        pairs = pairs[n + 1 :]
    return tuple(ok)


class VcpuState:
    """Preallocated structs for one vCPU fd, so save() is just the ioctls."""

    def __init__(self, fd: int, index: int, ncpus: int) -> None:
        self.fd = fd
        self.index = index
        kvm = KvmSystem.get()
        self.cpuid = cpuid_mod.vcpu_cpuid(kvm.supported_cpuid, index, ncpus)
        self._set_cpuid(self.cpuid)
        if kvm.saved_msrs is None:
            cands = [m for m in dict.fromkeys(kvm.msr_index_list + K.MTRR_MSRS) if m != K.MSR_IA32_TSC]
            kvm.saved_msrs = probe_msrs(fd, cands)
        self.msr_indices = tuple(m for m in kvm.saved_msrs if m != K.MSR_IA32_TSC_DEADLINE)
        self.has_deadline = K.MSR_IA32_TSC_DEADLINE in kvm.saved_msrs
        self._msrs = _msrs_struct(self.msr_indices)
        self._tsc_attr_val = C.c_uint64()
        self._tsc_attr = S.KvmDeviceAttr(0, K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET, C.addressof(self._tsc_attr_val))
        self.has_tsc_offset = ioctl_raw(fd, K.KVM_HAS_DEVICE_ATTR, C.addressof(self._tsc_attr))[0] == 0
        self.nx = cpuid_mod.nx_supported(kvm.supported_cpuid)

    def _set_cpuid(self, raw: bytes) -> None:
        c = cpuid_mod.cpuid_struct(raw)
        ioctl(self.fd, K.KVM_SET_CPUID2, C.addressof(c), "KVM_SET_CPUID2")

    # --- fresh boot ---

    def setup_boot(self, entry: int) -> None:
        sr = S.KvmSregs()
        ioctl(self.fd, K.KVM_GET_SREGS, sr, "KVM_GET_SREGS")
        code = S.KvmSegment(base=0, limit=0xFFFFFFFF, selector=0x08, type=11, present=1, dpl=0, db=0, s=1, l=1, g=1)
        data = S.KvmSegment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, present=1, dpl=0, db=1, s=1, l=0, g=1)
        sr.cs = code
        sr.ds = sr.es = sr.fs = sr.gs = sr.ss = data
        sr.gdt.base, sr.gdt.limit = GDT_GPA, 3 * 8 - 1
        sr.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sr.cr3 = PML4_GPA
        sr.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sr.efer = EFER_LME | EFER_LMA | EFER_SCE | (EFER_NX if self.nx else 0)
        ioctl(self.fd, K.KVM_SET_SREGS, sr, "KVM_SET_SREGS")
        regs = S.KvmRegs(rip=entry, rflags=0x2, rsp=0, rdi=BOOT_INFO_GPA, rsi=self.index)
        ioctl(self.fd, K.KVM_SET_REGS, regs, "KVM_SET_REGS")
        fpu = S.KvmFpu(fcw=0x37F, mxcsr=0x1F80)
        ioctl(self.fd, K.KVM_SET_FPU, fpu, "KVM_SET_FPU")
        self._set_msrs([(K.MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_BOOT)])
        lapic = S.KvmLapicState()
        ioctl(self.fd, K.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        raw = bytearray(bytes(lapic))
        for off, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
            v = struct.unpack_from("<I", raw, off)[0]
            struct.pack_into("<I", raw, off, (v & ~0x700) | (mode << 8))
        lapic = S.KvmLapicState.from_buffer_copy(bytes(raw))
        ioctl(self.fd, K.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")
        # every vCPU starts at the entry together: APs must not wait for INIT/SIPI
        ioctl(self.fd, K.KVM_SET_MP_STATE, S.KvmMpState(K.KVM_MP_STATE_RUNNABLE), "KVM_SET_MP_STATE")

    def _set_msrs(self, pairs: list[tuple[int, int]]) -> None:
        """Write MSRs, skipping (and logging) any KVM refuses rather than losing the ones after it."""
        while pairs:
            m = _msrs_struct([p[0] for p in pairs])
            for i, (_, v) in enumerate(pairs):
                m.entries[i].data = v
            n = ioctl(self.fd, K.KVM_SET_MSRS, C.addressof(m), "KVM_SET_MSRS")
            if n < len(pairs):
                log.warning("vcpu%d: KVM refused MSR %#x=%#x; skipped", self.index, *pairs[n])
            pairs = pairs[n + 1 :]

    # --- save / restore ---

    def save(self) -> tuple[int, bytes]:
        fd = self.fd
        regs, sregs, xsave, xcrs = S.KvmRegs(), S.KvmSregs(), S.KvmXsave(), S.KvmXcrs()
        lapic, events, mp, dbg = S.KvmLapicState(), S.KvmVcpuEvents(), S.KvmMpState(), S.KvmDebugregs()
        ioctl(fd, K.KVM_GET_REGS, regs, "KVM_GET_REGS")
        ioctl(fd, K.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        ioctl(fd, K.KVM_GET_XSAVE, xsave, "KVM_GET_XSAVE")
        ioctl(fd, K.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        n = ioctl(fd, K.KVM_GET_MSRS, C.addressof(self._msrs), "KVM_GET_MSRS")
        msrs = bytes(self._msrs)[8 : 8 + 16 * n]
        ioctl(fd, K.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        ioctl(fd, K.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        ioctl(fd, K.KVM_GET_MP_STATE, mp, "KVM_GET_MP_STATE")
        ioctl(fd, K.KVM_GET_DEBUGREGS, dbg, "KVM_GET_DEBUGREGS")
        blobs = {
            "cpuid": self.cpuid,
            "regs": bytes(regs),
            "sregs": bytes(sregs),
            "xsave": bytes(xsave),
            "xcrs": bytes(xcrs),
            "msrs": msrs,
            "lapic": bytes(lapic),
            "events": bytes(events),
            "mp_state": bytes(mp),
            "debugregs": bytes(dbg),
        }
        if self.has_deadline:
            d = _msrs_struct([K.MSR_IA32_TSC_DEADLINE])
            if ioctl(fd, K.KVM_GET_MSRS, C.addressof(d), "KVM_GET_MSRS") == 1:
                blobs["tsc_deadline"] = struct.pack("<Q", d.entries[0].data)
        if self.has_tsc_offset:
            ioctl(fd, K.KVM_GET_DEVICE_ATTR, self._tsc_attr, "KVM_GET_DEVICE_ATTR(TSC_OFFSET)")
            blobs["tsc_offset"] = struct.pack("<Q", self._tsc_attr_val.value)
        return VERSION, pack_blobs(blobs)

    def restore(self, version: int, payload: bytes) -> None:
        check_version(f"vcpu{self.index}", version, VERSION)
        b = unpack_blobs(payload)
        fd = self.fd
        if b["cpuid"] != self.cpuid:
            self._set_cpuid(b["cpuid"])
            self.cpuid = b["cpuid"]
        ioctl(fd, K.KVM_SET_SREGS, S.KvmSregs.from_buffer_copy(b["sregs"]), "KVM_SET_SREGS")
        ioctl(fd, K.KVM_SET_REGS, S.KvmRegs.from_buffer_copy(b["regs"]), "KVM_SET_REGS")
        ioctl(fd, K.KVM_SET_XSAVE, S.KvmXsave.from_buffer_copy(b["xsave"]), "KVM_SET_XSAVE")
        ioctl(fd, K.KVM_SET_XCRS, S.KvmXcrs.from_buffer_copy(b["xcrs"]), "KVM_SET_XCRS")
        raw = b["msrs"]
        self._set_msrs([(i, v) for i, _r, v in struct.iter_unpack("<IIQ", raw)])
        if "tsc_offset" in b:
            if not self.has_tsc_offset:
                raise LuoError(errno.EOPNOTSUPP, "the saved vCPU has a TSC offset but this KVM cannot set one")
            self._tsc_attr_val.value = struct.unpack("<Q", b["tsc_offset"])[0]
            ioctl(fd, K.KVM_SET_DEVICE_ATTR, self._tsc_attr, "KVM_SET_DEVICE_ATTR(TSC_OFFSET)")
        ioctl(fd, K.KVM_SET_MP_STATE, S.KvmMpState.from_buffer_copy(b["mp_state"]), "KVM_SET_MP_STATE")
        ioctl(fd, K.KVM_SET_LAPIC, S.KvmLapicState.from_buffer_copy(b["lapic"]), "KVM_SET_LAPIC")
        if "tsc_deadline" in b:
            self._set_msrs([(K.MSR_IA32_TSC_DEADLINE, struct.unpack("<Q", b["tsc_deadline"])[0])])
        ioctl(fd, K.KVM_SET_VCPU_EVENTS, S.KvmVcpuEvents.from_buffer_copy(b["events"]), "KVM_SET_VCPU_EVENTS")
        ioctl(fd, K.KVM_SET_DEBUGREGS, S.KvmDebugregs.from_buffer_copy(b["debugregs"]), "KVM_SET_DEBUGREGS")

    def regs(self) -> S.KvmRegs:
        """General registers now (for tests and diagnostics; the vCPU must be parked)."""
        r = S.KvmRegs()
        ioctl(self.fd, K.KVM_GET_REGS, r, "KVM_GET_REGS")
        return r

    def describe(self) -> str:
        """Registers for a log line when the guest dies."""
        r, s = S.KvmRegs(), S.KvmSregs()
        try:
            ioctl(self.fd, K.KVM_GET_REGS, r)
            ioctl(self.fd, K.KVM_GET_SREGS, s)
        except LuoError as e:
            return f"(registers unreadable: {e})"
        gp = " ".join(f"{n}={getattr(r, n):#x}" for n, _ in S.KvmRegs._fields_)
        return f"{gp} cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x} cs={s.cs.selector:#x}"
