"""/dev/kvm, opened once per process, with what every VM asks it for cached.

The successor builds its VM before the pause; caching the supported CPUID, the MSR index list and
the probed readable/writable MSRs here keeps all of that out of the blackout.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import threading

from luo.errors import LuoError
from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.sys import ioctl, ioctl_raw

KVM_API_VERSION = 12


class KvmSystem:
    """The system fd plus cached, per-process answers (supported CPUID, MSR list, caps)."""

    _lock = threading.Lock()
    _instance: KvmSystem | None = None
    _pid = 0

    @classmethod
    def get(cls) -> KvmSystem:
        with cls._lock:
            if cls._instance is None or cls._pid != os.getpid():
                cls._instance = cls()
                cls._pid = os.getpid()
            return cls._instance

    def __init__(self) -> None:
        try:
            self.fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise LuoError(e.errno or errno.ENODEV, f"cannot open /dev/kvm: {e.strerror}") from None
        ver = ioctl(self.fd, K.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")
        if ver != KVM_API_VERSION:
            raise LuoError(errno.EPROTO, f"KVM API version {ver}; this VMM speaks {KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")
        self._caps: dict[int, int] = {}
        self.supported_cpuid = self._get_supported_cpuid()
        self.msr_index_list = self._get_msr_index_list()
        # filled by the first vCPU that probes them (vcpu.py): MSRs that read and write back
        self.saved_msrs: tuple[int, ...] | None = None

    def check(self, cap: int) -> int:
        if cap not in self._caps:
            r, _ = ioctl_raw(self.fd, K.KVM_CHECK_EXTENSION, cap)
            self._caps[cap] = max(r, 0)
        return self._caps[cap]

    def _get_supported_cpuid(self) -> list[S.KvmCpuidEntry2]:
        n = 128
        while True:
            buf = S.kvm_cpuid2(n)()
            buf.nent = n
            r, e = ioctl_raw(self.fd, K.KVM_GET_SUPPORTED_CPUID, C.addressof(buf))
            if r >= 0:
                return [S.KvmCpuidEntry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]
            if e != errno.E2BIG or n > 4096:
                raise LuoError(e, f"KVM_GET_SUPPORTED_CPUID failed: {os.strerror(e)}")
            n *= 2

    def _get_msr_index_list(self) -> tuple[int, ...]:
        probe = S.kvm_msr_list(0)()
        ioctl_raw(self.fd, K.KVM_GET_MSR_INDEX_LIST, C.addressof(probe))  # E2BIG, sets nmsrs
        n = probe.nmsrs
        lst = S.kvm_msr_list(n)()
        lst.nmsrs = n
        ioctl(self.fd, K.KVM_GET_MSR_INDEX_LIST, C.addressof(lst), "KVM_GET_MSR_INDEX_LIST")
        return tuple(lst.indices[i] for i in range(lst.nmsrs))
