"""One vCPU's architectural state: the boot entry state, and the save/restore pair.

Save reads every piece with one ioctl each; restore writes them back in the order kvm-notes
found to work: CPUID, sregs, regs, XSAVE, XCRs, MSRs (not the TSC-deadline one), TSC offset, MP
state, LAPIC, TSC deadline (KVM ignores it before the LAPIC is set), events, debug registers. The
TSC itself is never written (MSR 0x10): that would freeze the guest clock for the length of the
blackout.

Version 2 (the record's vCPU payload since issue 8 item 2) is one flat layout, ``V2_*`` below,
that the ioctls read into and write from in place: ``v2_add_save_ops``/``v2_add_restore_ops``
put this vCPU's ioctls in the VM's prepared batch (luo.vmm.kvm.batch) at VM creation, so inside
the blackout nothing is allocated or converted. Restore skips what cannot differ from what the
successor's fresh vCPU already holds, and the batch decides that itself from the payload's bytes
(no Python per restore): CPUID equal to the one set at creation, the TSC offset equal to the one
read at creation (always, on PVM: the offset is 0), a TSC deadline of 0 (disarmed, as in a fresh
vCPU). The TSC deadline has its own one-entry kvm_msrs in the payload (one more KVM_GET_MSRS at
save, ~2.5 µs, instead of rewriting the MSR count at restore). Version 1 (named blobs) is still
read, and written by ``save_v1``.
"""

from __future__ import annotations

import ctypes as C
import errno
import logging
import struct
from dataclasses import dataclass

from luo.errors import LuoError
from luo.vmm import cpuid as cpuid_mod
from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.batch import IoctlBatch
from luo.vmm.kvm.sys import ioctl, ioctl_raw
from luo.vmm.kvm.system import KvmSystem
from luo.vmm.loader import BOOT_INFO_GPA, GDT_GPA, PML4_GPA
from luo.vmm.state import check_version, pack_blobs, unpack_blobs

log = logging.getLogger("luo.vmm")
VERSION = 2  # written by the fast path (record version 2)
VERSION_V1 = 1  # named blobs: read, and written by save_v1()

# Version 2 payload: head | the fixed structs below | the TSC deadline (a one-entry kvm_msrs) |
# CPUID (kvm_cpuid2) | the other MSRs (kvm_msrs). Every offset is 8-aligned; the two variable parts
# come last so the fixed ones sit at the same offsets whatever the CPUID and MSR counts, and the
# head says how long the variable parts are, so a restore can check a record's shape with a few
# byte compares (saveplan.RestorePlan.matches).
V2_HEAD = struct.Struct("<IIII")  # flags, CPUID length, MSR count, reserved
V2_FLAG_TSC_OFFSET = 1
_MSRS_HEAD = struct.Struct("<II")
_MSR = struct.Struct("<IIQ")
_ATTR = struct.Struct("<IIQQ")  # kvm_device_attr


def _v2_offsets() -> tuple[dict[str, tuple[int, int]], int]:
    out, off = {}, V2_HEAD.size
    for name, size in (("regs", C.sizeof(S.KvmRegs)), ("sregs", C.sizeof(S.KvmSregs)), ("xsave", C.sizeof(S.KvmXsave)),
                       ("xcrs", C.sizeof(S.KvmXcrs)), ("lapic", C.sizeof(S.KvmLapicState)),
                       ("events", C.sizeof(S.KvmVcpuEvents)), ("mp_state", 8), ("debugregs", C.sizeof(S.KvmDebugregs)),
                       ("tsc_offset", 8), ("tsc_deadline", _MSRS_HEAD.size + _MSR.size)):
        out[name] = (off, size)
        off += size
    return out, off


V2_PARTS, V2_FIXED = _v2_offsets()
V2_TSC = V2_PARTS["tsc_offset"][0]
V2_DEADLINE = V2_PARTS["tsc_deadline"][0]
V2_SAVE_SCRATCH = _ATTR.size  # the TSC-offset attribute


def v2_restore_scratch(own_cpuid_len: int) -> int:
    """Scratch bytes of one vCPU's restore: the attribute, the TSC offset at creation, our CPUID."""
    return _ATTR.size + 8 + own_cpuid_len


def v2_shape(payload: bytes | memoryview, off: int, length: int) -> tuple[int, int, int]:
    """(flags, CPUID length, MSR count) of the version-2 vCPU payload at ``off``; EINVAL if it does not add up."""
    if length < V2_FIXED:
        raise LuoError(errno.EINVAL, f"a vCPU payload of {length} bytes is too short")
    flags, cpuid_len, nmsrs, _ = V2_HEAD.unpack_from(payload, off)
    c = off + V2_FIXED
    if cpuid_len % 8 or cpuid_len < 8 or V2_FIXED + cpuid_len + _MSRS_HEAD.size + _MSR.size * nmsrs != length:
        raise LuoError(errno.EINVAL, f"a vCPU payload of {length} bytes cannot hold {cpuid_len} bytes of CPUID "
                                     f"and {nmsrs} MSRs")
    if 8 + 40 * struct.unpack_from("<I", payload, c)[0] != cpuid_len:
        raise LuoError(errno.EINVAL, "a vCPU payload's CPUID entry count does not match its length")
    if _MSRS_HEAD.unpack_from(payload, c + cpuid_len)[0] != nmsrs:
        raise LuoError(errno.EINVAL, "a vCPU payload's MSR count does not match its head")
    if _MSRS_HEAD.unpack_from(payload, off + V2_DEADLINE)[0] > 1:
        raise LuoError(errno.EINVAL, "a vCPU payload's TSC deadline holds more than one MSR")
    return flags, cpuid_len, nmsrs


@dataclass
class V2RestoreOps:
    """Where one vCPU's restore sits in a restore batch."""

    base: int
    cpuid_len: int
    cpuid_op: int
    msrs_op: int
    deadline_op: int


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
        self.tsc_offset_at_create = 0  # a restore skips setting an equal one
        if self.has_tsc_offset:
            ioctl(fd, K.KVM_GET_DEVICE_ATTR, self._tsc_attr, "KVM_GET_DEVICE_ATTR(TSC_OFFSET)")
            self.tsc_offset_at_create = self._tsc_attr_val.value
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

    # --- save / restore, version 2 (prepared batches) ---

    def v2_size(self) -> int:
        """Bytes of this vCPU's version-2 payload."""
        return V2_FIXED + len(self.cpuid) + _MSRS_HEAD.size + _MSR.size * len(self.msr_indices)

    def v2_own_shape(self) -> tuple[int, int, int]:
        """(flags, CPUID length, MSR count) of this vCPU's own version-2 payload (v2_shape)."""
        return V2_FLAG_TSC_OFFSET if self.has_tsc_offset else 0, len(self.cpuid), len(self.msr_indices)

    def v2_head(self) -> bytes:
        """The head of this vCPU's version-2 payload: a record with this head has its shape."""
        return V2_HEAD.pack(*self.v2_own_shape(), 0)

    def v2_write_static(self, view: memoryview, base: int) -> None:
        """The parts of this vCPU's save payload that no save changes: head, CPUID, MSR indices."""
        view[base : base + V2_HEAD.size] = self.v2_head()
        dl = base + V2_DEADLINE
        _MSRS_HEAD.pack_into(view, dl, 1 if self.has_deadline else 0, 0)
        _MSR.pack_into(view, dl + _MSRS_HEAD.size, K.MSR_IA32_TSC_DEADLINE if self.has_deadline else 0, 0, 0)
        c = base + V2_FIXED
        view[c : c + len(self.cpuid)] = self.cpuid
        m = c + len(self.cpuid)
        _MSRS_HEAD.pack_into(view, m, len(self.msr_indices), 0)
        for i, idx in enumerate(self.msr_indices):
            _MSR.pack_into(view, m + _MSRS_HEAD.size + _MSR.size * i, idx, 0, 0)

    def v2_add_save_ops(self, b: IoctlBatch, base: int, scratch: int) -> None:
        """This vCPU's save into the payload at ``base`` (``V2_SAVE_SCRATCH`` bytes at ``scratch``)."""
        self.v2_write_static(b.view, base)
        fd, name = self.fd, f"vcpu{self.index}"
        for part, req in (("regs", K.KVM_GET_REGS), ("sregs", K.KVM_GET_SREGS), ("xsave", K.KVM_GET_XSAVE),
                          ("xcrs", K.KVM_GET_XCRS)):
            off, size = V2_PARTS[part]
            b.add(fd, req, base + off, size, f"{name} {K.NAMES[req]}")
        n = len(self.msr_indices)
        b.add(fd, K.KVM_GET_MSRS, base + V2_FIXED + len(self.cpuid), _MSRS_HEAD.size + _MSR.size * n,
              f"{name} KVM_GET_MSRS", expect=n)
        if self.has_deadline:
            b.add(fd, K.KVM_GET_MSRS, base + V2_DEADLINE, _MSRS_HEAD.size + _MSR.size, f"{name} KVM_GET_MSRS(TSC_DEADLINE)",
                  expect=1)
        for part, req in (("lapic", K.KVM_GET_LAPIC), ("events", K.KVM_GET_VCPU_EVENTS),
                          ("mp_state", K.KVM_GET_MP_STATE), ("debugregs", K.KVM_GET_DEBUGREGS)):
            off, size = V2_PARTS[part]
            b.add(fd, req, base + off, size, f"{name} {K.NAMES[req]}")
        if self.has_tsc_offset:
            _ATTR.pack_into(b.view, scratch, 0, K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET, b.addr + base + V2_TSC)
            b.add(fd, K.KVM_GET_DEVICE_ATTR, scratch, _ATTR.size, f"{name} KVM_GET_DEVICE_ATTR(TSC_OFFSET)")

    def v2_add_restore_ops(self, b: IoctlBatch, base: int, shape: tuple[int, int, int], scratch: int) -> V2RestoreOps:
        """This vCPU's restore from a payload of ``shape`` (v2_shape) at ``base``, in the order of
        the module docstring (``v2_restore_scratch`` bytes at ``scratch``). What cannot differ from
        the fresh vCPU is skipped by the batch itself when the payload's bytes say so: CPUID equal to
        ours, TSC offset equal to the one at creation, a TSC deadline of 0 (disarmed, as fresh)."""
        flags, cpuid_len, nmsrs = shape
        if flags & V2_FLAG_TSC_OFFSET and not self.has_tsc_offset:
            raise LuoError(errno.EOPNOTSUPP, "the saved vCPU has a TSC offset but this KVM cannot set one")
        fd, name, view = self.fd, f"vcpu{self.index}", b.view
        attr, tsc_now, own = scratch, scratch + _ATTR.size, scratch + _ATTR.size + 8
        _ATTR.pack_into(view, attr, 0, K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET, b.addr + base + V2_TSC)
        struct.pack_into("<Q", view, tsc_now, self.tsc_offset_at_create)
        view[own : own + len(self.cpuid)] = self.cpuid
        c = base + V2_FIXED
        cpuid_op = b.add(fd, K.KVM_SET_CPUID2, c, cpuid_len, f"{name} KVM_SET_CPUID2",
                         if_different=(c, own, cpuid_len) if cpuid_len == len(self.cpuid) else None)

        def put(part: str, req: int) -> int:
            off, size = V2_PARTS[part]
            return b.add(fd, req, base + off, size, f"{name} {K.NAMES[req]}")

        put("sregs", K.KVM_SET_SREGS)
        put("regs", K.KVM_SET_REGS)
        put("xsave", K.KVM_SET_XSAVE)
        put("xcrs", K.KVM_SET_XCRS)
        msrs_op = b.add(fd, K.KVM_SET_MSRS, c + cpuid_len, _MSRS_HEAD.size + _MSR.size * nmsrs, f"{name} KVM_SET_MSRS",
                        expect=nmsrs)
        if flags & V2_FLAG_TSC_OFFSET:
            b.add(fd, K.KVM_SET_DEVICE_ATTR, attr, _ATTR.size, f"{name} KVM_SET_DEVICE_ATTR(TSC_OFFSET)",
                  if_different=(base + V2_TSC, tsc_now, 8))
        put("mp_state", K.KVM_SET_MP_STATE)
        put("lapic", K.KVM_SET_LAPIC)
        dl = base + V2_DEADLINE
        deadline_op = b.add(fd, K.KVM_SET_MSRS, dl, _MSRS_HEAD.size + _MSR.size, f"{name} KVM_SET_MSRS(TSC_DEADLINE)",
                            expect=1, if_nonzero=(dl + _MSRS_HEAD.size + 8, 8))
        put("events", K.KVM_SET_VCPU_EVENTS)
        put("debugregs", K.KVM_SET_DEBUGREGS)
        return V2RestoreOps(base, cpuid_len, cpuid_op, msrs_op, deadline_op)

    def v2_restored(self, b: IoctlBatch, r: V2RestoreOps) -> bool:
        """After the batch: True if it set the record's CPUID (now ours, for the next save)."""
        if not b.ran(r.cpuid_op):
            return False
        c = r.base + V2_FIXED
        self.cpuid = bytes(b.view[c : c + r.cpuid_len])
        return True

    def v2_msrs_refused(self, b: IoctlBatch, r: V2RestoreOps, op: int, done: int) -> None:
        """KVM_SET_MSRS of the batch stopped at entry ``done``: skip it (logged) and set the rest."""
        if op == r.deadline_op:
            log.warning("vcpu%d: KVM refused the TSC deadline MSR; skipped", self.index)
            return
        m = r.base + V2_FIXED + r.cpuid_len + _MSRS_HEAD.size
        pairs = []
        for i in range(done, b.ops[op].expect):
            idx, _, val = _MSR.unpack_from(b.view, m + _MSR.size * i)
            pairs.append((idx, val))
        log.warning("vcpu%d: KVM refused MSR %#x=%#x; skipped", self.index, *pairs[0])
        self._set_msrs(pairs[1:])

    # --- save / restore, version 1 (named blobs) ---

    def save_v1(self) -> tuple[int, bytes]:
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
        return VERSION_V1, pack_blobs(blobs)

    def restore_v1(self, version: int, payload: bytes) -> None:
        check_version(f"vcpu{self.index}", version, VERSION_V1)
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
