"""kvmclock across an update: KVM_GET_CLOCK before, KVM_SET_CLOCK (with KVM_CLOCK_REALTIME) after.

With the realtime stamp KVM advances the guest clock by the real time the blackout took, so guest
time neither jumps back nor stalls; without it (older kernels) the clock resumes where it stopped.
"""

from __future__ import annotations

from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.sys import ioctl
from luo.vmm.state import check_version

VERSION = 1


class KvmClock:
    def __init__(self, vm_fd: int) -> None:
        self.vm_fd = vm_fd

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
