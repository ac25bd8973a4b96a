"""kvmclock across an update: KVM_GET_CLOCK before, KVM_SET_CLOCK (with KVM_CLOCK_REALTIME) after.

With the realtime stamp KVM advances the guest clock by the real time the blackout took, so guest
time neither jumps back nor stalls; without it (older kernels) the clock resumes where it stopped.

The payload is the raw kvm_clock_data of KVM_GET_CLOCK (version 1, in both record versions). In
the prepared batches of record version 2 the GET goes straight into the record and the SET, the
batch's last op (the clock is set after everything else), reads the record's bytes as they are
when this kernel takes KVM_GET_CLOCK's output back unchanged: from 5.16 on it accepts (and
ignores) the flags other than REALTIME and host_tsc, but the first 5.16 patch refused them, so
it is probed when the VM is created (``passthrough``). Without it the SET reads a scratch struct
that ``v2_prepare_restore`` fills as ``restore`` does (clock, realtime, only the REALTIME flag).
"""

from __future__ import annotations

import ctypes as C
import struct

from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.batch import IoctlBatch
from luo.vmm.kvm.sys import ioctl, ioctl_raw
from luo.vmm.state import check_version

VERSION = 1
_DATA = C.sizeof(S.KvmClockData)
_FIELDS = struct.Struct("<QI4xQ")  # clock, flags, realtime: the head of kvm_clock_data


class KvmClock:
    def __init__(self, vm_fd: int) -> None:
        self.vm_fd = vm_fd
        # Whether KVM_SET_CLOCK takes KVM_GET_CLOCK's output as is, whatever flags it has (a fresh
        # VM reports none: they come with the master clock). Probed on the fresh VM with every
        # flag set and a realtime stamp in the future, which KVM never steps the clock for: its
        # clock is set to what it just read, a few µs back, before it ever ran.
        d = S.KvmClockData()
        ioctl(vm_fd, K.KVM_GET_CLOCK, d, "KVM_GET_CLOCK")
        d.flags = K.KVM_CLOCK_TSC_STABLE | K.KVM_CLOCK_REALTIME | K.KVM_CLOCK_HOST_TSC
        d.realtime = (1 << 64) - 1
        self.passthrough = ioctl_raw(vm_fd, K.KVM_SET_CLOCK, d)[0] == 0

    V2_SIZE = _DATA
    V2_RESTORE_SCRATCH = _DATA

    def v2_add_save_ops(self, b: IoctlBatch, off: int) -> None:
        b.add(self.vm_fd, K.KVM_GET_CLOCK, off, _DATA, "KVM_GET_CLOCK")

    def v2_add_restore_ops(self, b: IoctlBatch, payload: int, scratch: int) -> None:
        """SET from the payload itself, or (no passthrough) from ``scratch`` after v2_prepare_restore."""
        b.add(self.vm_fd, K.KVM_SET_CLOCK, payload if self.passthrough else scratch, _DATA, "KVM_SET_CLOCK")

    @staticmethod
    def v2_prepare_restore(b: IoctlBatch, payload: int, scratch: int) -> None:
        """The SET struct from the saved one (as ``restore`` does: only the REALTIME flag kept)."""
        clock, flags, realtime = _FIELDS.unpack_from(b.view, payload)
        _FIELDS.pack_into(b.view, scratch, clock, flags & K.KVM_CLOCK_REALTIME, realtime)

    def save(self) -> tuple[int, bytes]:
        d = S.KvmClockData()
        ioctl(self.vm_fd, K.KVM_GET_CLOCK, d, "KVM_GET_CLOCK")
        return VERSION, bytes(d)

    def restore(self, version: int, payload: bytes) -> None:
        check_version("clock", version, VERSION)
        got = S.KvmClockData.from_buffer_copy(payload)
        d = S.KvmClockData()
        d.clock = got.clock
        d.realtime = got.realtime
        d.flags = got.flags & K.KVM_CLOCK_REALTIME
        ioctl(self.vm_fd, K.KVM_SET_CLOCK, d, "KVM_SET_CLOCK")
