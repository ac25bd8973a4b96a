"""Save and restore of record version 2 as ioctl batches prepared when the VM is created.

Profile of the version-1 path (bench/save_restore.py --profile, 1 GiB, 2 vCPUs, this machine):
save 503 µs median of which 191 µs in ioctls, restore 610 µs of which 213 µs; the rest was
Python: structs and a ``kvm_msrs`` class built per call (``__build_class__`` alone ~150 µs per
save + restore), ``bytes()`` copies, named blobs, a JSON header and JSON device states, and
ctypes around each of ~50 ioctls. Here, everything that does not depend on the guest's state is
done once, in ``Vm.create`` (for a successor: at prepare, before the pause):

- ``SavePlan``: one buffer laid out as the record's fixed payloads (every vCPU, irqchip, PIT,
  clock), each KVM_GET_* reading straight into its place; the record is then the prepared header,
  that buffer and the two small device states (uart, mmio console), joined once.
- ``RestorePlan``: the same layout for restore (a record of this VMM's own shape, which is what
  a predecessor of the same build on the same kernel writes); the record's fixed payloads are
  copied in with one slice assignment, a few fields are set (``v2_prepare_restore``: which
  optional ops run, the clock struct), and the KVM_SET_* run in kvm-notes' order, the clock last.
  A record of another shape (another CPUID or MSR count) gets a plan built on the spot: correct,
  just not prepared.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from luo.errors import LuoError
from luo.vmm import vcpu_state
from luo.vmm.devices.clock import KvmClock
from luo.vmm.devices.irqchip import PIT_VERSION, IrqChip, Pit
from luo.vmm.devices.irqchip import VERSION as IRQCHIP_VERSION
from luo.vmm.kvm.batch import IoctlBatch
from luo.vmm.state import RecordWriter, check_version
from luo.vmm.vcpu_state import V2RestoreOps

if TYPE_CHECKING:
    from luo.vmm.vm import Vm

log = logging.getLogger("luo.vmm")

CLOCK_VERSION = 1
VARIABLE = ("uart", "mmio-console")


@dataclass(frozen=True)
class Layout:
    """Where the fixed payloads of a version-2 record sit (offsets from its first payload byte).

    vcpus: (offset, length, CPUID length, MSR count) per vCPU; span: end of the last one."""

    vcpus: tuple[tuple[int, int, int, int], ...]
    irqchip: int
    pit: int
    clock: int
    span: int

    @classmethod
    def of_vm(cls, vm: Vm) -> Layout:
        """The layout this VM's own save writes."""
        off, vcpus = 0, []
        for v in vm.vcpus:
            n = v.state.v2_size()
            vcpus.append((off, n, len(v.state.cpuid), len(v.state.v2_msr_indices)))
            off += n
        irq, pit, clock = off, off + IrqChip.V2_SIZE, off + IrqChip.V2_SIZE + Pit.V2_SIZE
        return cls(tuple(vcpus), irq, pit, clock, clock + KvmClock.V2_SIZE)

    @classmethod
    def of_record(cls, record: bytes, table: list[tuple[str, int, int, int]], base: int, ncpus: int) -> Layout:
        """The layout of a parsed record; EPROTO for a component version this VMM does not read,
        EINVAL for a missing or malformed component."""
        comps = {name: (version, off, length) for name, version, off, length in table}
        want = {"irqchip": (IRQCHIP_VERSION, IrqChip.V2_SIZE), "pit": (PIT_VERSION, Pit.V2_SIZE),
                "clock": (CLOCK_VERSION, KvmClock.V2_SIZE)}
        for name in [f"vcpu{i}" for i in range(ncpus)] + [*want, *VARIABLE]:
            if name not in comps:
                raise LuoError(errno.EINVAL, f"the VM state record has no {name} section")
        vcpus = []
        for i in range(ncpus):
            version, off, length = comps[f"vcpu{i}"]
            check_version(f"vcpu{i}", version, vcpu_state.VERSION)
            cpuid_len, nmsrs = vcpu_state.v2_shape(record, base + off, length)
            vcpus.append((off, length, cpuid_len, nmsrs))
        offs = {}
        for name, (version, size) in want.items():
            got, off, length = comps[name]
            check_version(name, got, version)
            if length != size:
                raise LuoError(errno.EINVAL, f"the {name} section is {length} bytes, not {size}")
            offs[name] = off
        span = max([o + n for o, n, _, _ in vcpus] + [offs[k] + comps[k][2] for k in want])
        return cls(tuple(vcpus), offs["irqchip"], offs["pit"], offs["clock"], span)


class SavePlan:
    """A VM's save, prepared: ``save()`` runs one batch and joins the record."""

    def __init__(self, vm: Vm, use_cext: bool | None = None) -> None:
        self.vm = vm
        self.layout = lay = Layout.of_vm(vm)
        nv = len(vm.vcpus)
        self.batch = b = IoctlBatch(lay.span + nv * vcpu_state.V2_SAVE_SCRATCH, use_cext)
        for i, v in enumerate(vm.vcpus):
            v.state.v2_add_save_ops(b, lay.vcpus[i][0], lay.span + i * vcpu_state.V2_SAVE_SCRATCH)
        vm.irqchip.v2_add_save_ops(b, lay.irqchip)
        vm.pit.v2_add_save_ops(b, lay.pit)
        vm.clock.v2_add_save_ops(b, lay.clock)  # last: the clock keeps going while the rest is read
        b.seal()
        self.fixed = b.view[: lay.span]
        fixed = [(f"vcpu{i}", vcpu_state.VERSION, lay.vcpus[i][1]) for i in range(nv)]
        fixed += [("irqchip", IRQCHIP_VERSION, IrqChip.V2_SIZE), ("pit", PIT_VERSION, Pit.V2_SIZE),
                  ("clock", CLOCK_VERSION, KvmClock.V2_SIZE)]
        self.writer = RecordWriter({"name": vm.name, "mem_bytes": vm.mem_bytes, "ncpus": nv}, fixed, len(VARIABLE))

    def write_static(self) -> None:
        """Rewrite what no save changes (after a restore set another CPUID)."""
        for i, v in enumerate(self.vm.vcpus):
            v.state.v2_write_static(self.batch.view, self.layout.vcpus[i][0])

    def save(self) -> bytes:
        got = self.batch.run()
        if got is not None:
            i, r = got
            op = self.batch.ops[i]
            raise LuoError(errno.EIO, f"{op.name} read {r} of the {op.expect} MSRs that were readable at start")
        uart = self.vm.uart.save()
        mmio = self.vm.mmio_console.save()
        return self.writer.build(self.fixed, [("uart", *uart), ("mmio-console", *mmio)])


class RestorePlan:
    """A VM's restore of records of one layout, prepared."""

    def __init__(self, vm: Vm, layout: Layout, use_cext: bool | None = None) -> None:
        self.vm = vm
        self.layout = lay = layout
        nv = len(vm.vcpus)
        scratch = lay.span + (-lay.span % 8)
        self.clock_scratch = scratch + nv * vcpu_state.V2_RESTORE_SCRATCH
        self.batch = b = IoctlBatch(self.clock_scratch + KvmClock.V2_RESTORE_SCRATCH, use_cext)
        self.vcpu_ops: list[V2RestoreOps] = []
        for i, v in enumerate(vm.vcpus):
            off, _, cpuid_len, nmsrs = lay.vcpus[i]
            self.vcpu_ops.append(v.state.v2_add_restore_ops(b, off, cpuid_len, nmsrs,
                                                            scratch + i * vcpu_state.V2_RESTORE_SCRATCH))
        vm.irqchip.v2_add_restore_ops(b, lay.irqchip)
        vm.pit.v2_add_restore_ops(b, lay.pit)
        vm.clock.v2_add_restore_ops(b, self.clock_scratch)  # last (kvm-notes)
        b.seal()
        self._refused = {r.msrs_op: (i, r) for i, r in enumerate(self.vcpu_ops)}
        self._refused.update({r.deadline_op: (i, r) for i, r in enumerate(self.vcpu_ops)})

    def restore(self, record: bytes, base: int) -> bool:
        """Load the record's fixed payloads into KVM; True if some vCPU's CPUID was set anew."""
        b, lay = self.batch, self.layout
        b.view[: lay.span] = memoryview(record)[base : base + lay.span]
        changed = False
        for v, r in zip(self.vm.vcpus, self.vcpu_ops, strict=True):
            changed |= v.state.v2_prepare_restore(b, r)
        KvmClock.v2_prepare_restore(b, lay.clock, self.clock_scratch)
        start = 0
        while (got := b.run(start)) is not None:
            i, done = got
            if i not in self._refused:
                raise LuoError(errno.EIO, f"{b.ops[i].name} returned {done}, not {b.ops[i].expect}")
            cpu, r = self._refused[i]
            self.vm.vcpus[cpu].state.v2_msrs_refused(b, r, i, done)
            start = i + 1
        return changed
