"""Save and restore of record version 2 as ioctl batches prepared when the VM is created.

Profile of the version-1 path (bench/save_restore.py --profile, 1 GiB, 2 vCPUs, this machine):
save 503 µs median of which 191 µs in ioctls, restore 610 µs of which 213 µs; the rest was
Python: structs and a ``kvm_msrs`` class built per call (``__build_class__`` alone ~150 µs per
save + restore), ``bytes()`` copies, named blobs, a JSON header and JSON device states, and
ctypes around each of ~50 ioctls. And the blackout's Python runs cold (the guest had both cores
just before): a loop that takes 37 µs warm takes 50 µs right after the pause, and a first save
batch 120 µs where a second one right behind it takes 70. So everything that does not depend on
the guest's state is done once, in ``Vm.create`` (for a successor: at prepare, before the pause),
and what is left inside the blackout is as little Python as possible:

- ``SavePlan``: one buffer laid out as the record's fixed payloads (every vCPU, irqchip, PIT,
  clock), each KVM_GET_* reading straight into its place; the record is then the prepared header,
  that buffer and the two small device states (uart, mmio console), joined once.
- ``RestorePlan``: the same layout for restore. ``matches`` recognizes a record of this VMM's own
  shape (which is what a predecessor of the same build on the same kernel writes) with a few byte
  compares against the header and vCPU heads this VM would write; then its fixed payloads are
  copied in with one slice assignment and one batch sets everything, in kvm-notes' order, the
  clock last, skipping by itself what the fresh vCPU already holds (vcpu_state). A record of
  another shape (another CPUID or MSR count, a differently ordered table) is parsed in full and
  gets a plan built on the spot: correct, just not prepared.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from luo.errors import LuoError
from luo.vmm import vcpu_state
from luo.vmm.devices.clock import KvmClock
from luo.vmm.devices.irqchip import PIT_VERSION, IrqChip, Pit
from luo.vmm.devices.irqchip import VERSION as IRQCHIP_VERSION
from luo.vmm.kvm.batch import IoctlBatch
from luo.vmm.state import COMP2, META2, RecordWriter, check_version, parse_record_v2
from luo.vmm.vcpu_state import V2RestoreOps

if TYPE_CHECKING:
    from luo.vmm.vm import Vm

log = logging.getLogger("luo.vmm")

CLOCK_VERSION = 1
VARIABLE = ("uart", "mmio-console")


@dataclass(frozen=True)
class Layout:
    """Where the fixed payloads of a version-2 record sit (offsets from its first payload byte).

    vcpus: (offset, length, (flags, CPUID length, MSR count)) per vCPU; span: end of the last."""

    vcpus: tuple[tuple[int, int, tuple[int, int, int]], ...]
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
            vcpus.append((off, n, v.state.v2_own_shape()))
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
            vcpus.append((off, length, vcpu_state.v2_shape(record, base + off, length)))
        offs = {}
        for name, (version, size) in want.items():
            got, off, length = comps[name]
            check_version(name, got, version)
            if length != size:
                raise LuoError(errno.EINVAL, f"the {name} section is {length} bytes, not {size}")
            offs[name] = off
        span = max([o + n for o, n, _ in vcpus] + [offs[k] + comps[k][2] for k in want])
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
        self.components = [(f"vcpu{i}", vcpu_state.VERSION, lay.vcpus[i][1]) for i in range(nv)]
        self.components += [("irqchip", IRQCHIP_VERSION, IrqChip.V2_SIZE), ("pit", PIT_VERSION, Pit.V2_SIZE),
                            ("clock", CLOCK_VERSION, KvmClock.V2_SIZE)]
        self.writer = RecordWriter({"name": vm.name, "mem_bytes": vm.mem_bytes, "ncpus": nv}, self.components,
                                   len(VARIABLE))

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
        scratch = lay.span + (-lay.span % 8)
        sizes = [vcpu_state.v2_restore_scratch(len(v.state.cpuid)) for v in vm.vcpus]
        self.clock_scratch = scratch + sum(sizes)
        self.batch = b = IoctlBatch(self.clock_scratch + KvmClock.V2_RESTORE_SCRATCH, use_cext)
        self.vcpu_ops: list[V2RestoreOps] = []
        for i, v in enumerate(vm.vcpus):
            off, _, shape = lay.vcpus[i]
            self.vcpu_ops.append(v.state.v2_add_restore_ops(b, off, shape, scratch))
            scratch += sizes[i]
        vm.irqchip.v2_add_restore_ops(b, lay.irqchip)
        vm.pit.v2_add_restore_ops(b, lay.pit)
        vm.clock.v2_add_restore_ops(b, lay.clock, self.clock_scratch)  # last (kvm-notes)
        b.seal()
        self._refused = {r.msrs_op: (i, r) for i, r in enumerate(self.vcpu_ops)}
        self._refused.update({r.deadline_op: (i, r) for i, r in enumerate(self.vcpu_ops)})
        self._expect: tuple[bytes, bytes, list[tuple[int, bytes]]] | None = None
        self._own_head: tuple[bytes, int, int] = (b"", 0, 0)

    def expect_own_shape(self, save: SavePlan) -> None:
        """Prepare ``matches``: the header and vCPU heads ``save`` writes (this plan's layout)."""
        vm = self.vm
        meta = struct.pack("<IIQ", vm.ncpus, len(save.components) + len(VARIABLE), vm.mem_bytes)
        table, off = [], 0
        for name, version, length in save.components:
            table.append(COMP2.pack(name.encode(), version, off, length))
            off += length
        # per vCPU: its head, and its CPUID's kvm_cpuid2 header right after the fixed part (the entry
        # count the kernel will read, if the batch sets that CPUID)
        heads = [(o, v.state.v2_head() + b"\0" * (vcpu_state.V2_FIXED - vcpu_state.V2_HEAD.size) + v.state.cpuid[:8])
                 for (o, _, _), v in zip(self.layout.vcpus, vm.vcpus, strict=True)]
        self._expect = (meta, b"".join(table), heads)
        # the same with this VM's name (a successor mostly has its predecessor's): one compare for
        # everything from the record version to the fixed components' table
        name = vm.name.encode()
        t = 16 + META2.size + len(name)
        base = t + len(self._expect[1]) + COMP2.size * len(VARIABLE)
        self._own_head = (struct.pack("<II", 2, base - 16) + meta + struct.pack("<H", len(name)) + name
                          + self._expect[1], base, t + len(self._expect[1]))

    def matches(self, record: bytes) -> tuple[int, int] | None:
        """(first payload byte, offset of the variable components' entries) if ``record`` (a
        version-2 record, already checked) has exactly this plan's layout, else None."""
        if self._expect is None:
            return None
        meta, table, heads = self._expect
        own, base, var = self._own_head
        if record[8 : 8 + len(own)] != own:  # not our name: compare around it
            if record[16 : 16 + len(meta)] != meta:
                return None
            t = 16 + META2.size + int.from_bytes(record[16 + len(meta) : 16 + META2.size], "little")
            base, var = 16 + int.from_bytes(record[12:16], "little"), t + len(table)
            if record[t:var] != table or base != var + COMP2.size * len(VARIABLE):
                return None
        if base + self.layout.span > len(record):
            return None
        h, n = vcpu_state.V2_HEAD.size, vcpu_state.V2_FIXED
        for off, head in heads:
            p = base + off
            if record[p : p + h] != head[:h] or record[p + n : p + n + 8] != head[n:]:
                return None
        return base, var

    def restore(self, record: bytes, base: int) -> bool:
        """Load the record's fixed payloads into KVM; True if some vCPU's CPUID was set anew."""
        b, lay = self.batch, self.layout
        b.view[: lay.span] = memoryview(record)[base : base + lay.span]
        if not self.vm.clock.passthrough:
            KvmClock.v2_prepare_restore(b, lay.clock, self.clock_scratch)
        start = 0
        while (got := b.run(start)) is not None:
            i, done = got
            if i not in self._refused:
                raise LuoError(errno.EIO, f"{b.ops[i].name} returned {done}, not {b.ops[i].expect}")
            cpu, r = self._refused[i]
            self.vm.vcpus[cpu].state.v2_msrs_refused(b, r, i, done)
            start = i + 1
        changed = False
        for v, r in zip(self.vm.vcpus, self.vcpu_ops, strict=True):
            changed |= v.state.v2_restored(b, r)
        return changed


def restore_v2(vm: Vm, record: bytes, prepared: RestorePlan) -> bool:
    """Restore a version-2 record into ``vm``: the prepared plan when the record has its layout,
    else a plan for the record's own. True if some vCPU's CPUID was set anew."""
    plan, comps, base = prepared, _variable_if_prepared(record, prepared), 0
    if comps is not None:
        base, comps = comps
    else:
        meta, table, base = parse_record_v2(record)
        vm.check_record_shape(meta)
        layout = Layout.of_record(record, table, base, vm.ncpus)
        if layout != prepared.layout:
            plan = RestorePlan(vm, layout)
        comps = [c for c in table if c[0] in VARIABLE]
    for name, version, off, length in comps:  # no KVM state: before the batch, which ends with the clock
        dev = vm.uart if name == "uart" else vm.mmio_console
        dev.restore(version, record[base + off : base + off + length])
    return plan.restore(record, base)


def _variable_if_prepared(record: bytes, plan: RestorePlan) -> tuple[int, list[tuple[str, int, int, int]]] | None:
    """(first payload byte, the uart and mmio-console entries) if the record has the plan's layout."""
    m = plan.matches(record)
    if m is None:
        return None
    base, var = m
    comps = []
    for i in range(len(VARIABLE)):
        name, version, off, length = COMP2.unpack_from(record, var + COMP2.size * i)
        if name.rstrip(b"\0") != VARIABLE[i].encode() or base + off + length > len(record):
            return None
        comps.append((VARIABLE[i], version, off, length))
    return base, comps
