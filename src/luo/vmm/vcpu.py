"""A vCPU: its fd, its kvm_run page, and the thread that loops on KVM_RUN.

Pausing is the latency that matters for a live update. The pauser sets kvm_run.immediate_exit
and pthread_kill()s the thread with KICK_SIGNAL (which has a Python handler: with SIG_IGN KVM_RUN
is not interrupted, with SIG_DFL the process dies). KVM_RUN then returns EINTR — after completing
any pending port/MMIO I/O, so the saved state never has half an instruction — and the thread parks
on an Event. The flag covers the window where the signal lands outside KVM_RUN.
"""

from __future__ import annotations

import ctypes as C
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from luo.errors import LuoError
from luo.vmm.bus import Bus
from luo.vmm.kvm import ioctls as K
from luo.vmm.kvm import structs as S
from luo.vmm.kvm.sys import ioctl, ioctl_raw, mmap, munmap
from luo.vmm.kvm.system import KvmSystem
from luo.vmm.vcpu_state import VcpuState

log = logging.getLogger("luo.vmm")

KICK_SIGNAL = signal.SIGRTMIN + 3


def _kick_handler(signum: int, frame: object) -> None:
    """Nothing to do: the signal only exists to knock a vCPU thread out of KVM_RUN."""


def install_kick_handler() -> None:
    """Install the handler for KICK_SIGNAL; must run in the main thread once before vCPUs start."""
    if signal.getsignal(KICK_SIGNAL) is _kick_handler:
        return
    try:
        signal.signal(KICK_SIGNAL, _kick_handler)
    except ValueError:
        raise LuoError(
            errno.EPERM,
            "the vCPU kick signal handler must be installed from the main thread: call "
            "luo.vmm.vcpu.install_kick_handler() there before creating a Vm",
        ) from None


StopCallback = Callable[[int, str], None]


class Vcpu:
    def __init__(self, vm_fd: int, index: int, ncpus: int, ports: Bus, mmio: Bus, on_stop: StopCallback) -> None:
        self.index = index
        self.ports = ports
        self.mmio = mmio
        self._on_stop = on_stop
        self.fd = ioctl(vm_fd, K.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        self._run_size = KvmSystem.get().vcpu_mmap_size
        self.run_addr = mmap(self.fd, self._run_size)
        self.run = S.KvmRun.from_address(self.run_addr)
        self.state = VcpuState(self.fd, index, ncpus)
        self._pause_req = False
        self._stop_req = False
        self.parked = threading.Event()  # set while the thread is parked or gone
        self._resume = threading.Event()
        self.exits = 0
        self.entered_ns = 0  # CLOCK_MONOTONIC when the thread last left its park for KVM_RUN
        self.entered = threading.Event()  # set when it has (cleared by start())
        # The thread starts now, parked before its first KVM_RUN: starting a thread costs
        # milliseconds under a busy GIL, and start() is inside the blackout for a successor.
        self.thread = threading.Thread(target=self._loop, name=f"vcpu{index}", daemon=True)
        self.thread.start()
        self.parked.wait()

    # --- control (any thread) ---

    def start(self) -> None:
        """Let the parked thread (into) KVM_RUN: the first start and every resume alike."""
        if self.parked.is_set() and self.thread.is_alive() and not self._stop_req:
            self.parked.clear()
            self.entered.clear()
            self._pause_req = False
            self.run.immediate_exit = 0
            self._resume.set()

    def request_pause(self) -> None:
        self._pause_req = True
        self.run.immediate_exit = 1
        self._kick()

    def request_stop(self) -> None:
        self._stop_req = True
        self._pause_req = True
        if self.run_addr:
            self.run.immediate_exit = 1
        self._resume.set()
        self._kick()

    def _kick(self) -> None:
        t = self.thread
        if t.is_alive() and t.ident is not None:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def join(self, timeout: float) -> bool:
        if self.thread is threading.current_thread():
            return True  # stop() from on_guest_stop: this thread touches nothing of ours after it
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self) -> None:
        if self.thread.is_alive():
            self.request_stop()
            if not self.join(5.0):
                raise LuoError(errno.EBUSY, f"vcpu{self.index} thread did not stop; its fds stay open")
        if self.run_addr:
            munmap(self.run_addr, self._run_size)
            self.run_addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- the vCPU thread ---

    def _park(self) -> None:
        self.parked.set()
        self._resume.wait()
        self._resume.clear()
        # When this thread really goes on (it has the GIL again), not when it was told to: the gap
        # between the two is scheduling, and the guest sees it as part of its blackout.
        self.entered_ns = time.monotonic_ns()
        self.entered.set()

    def _loop(self) -> None:
        try:
            self._park()
            while not self._stop_req:
                r, e = ioctl_raw(self.fd, K.KVM_RUN)
                if r < 0:
                    if e not in (errno.EINTR, errno.EAGAIN):
                        self._guest_stopped(f"KVM_RUN failed: {os.strerror(e)}")
                        return
                    if self._pause_req and not self._stop_req:
                        self._park()
                    continue
                self.exits += 1
                if not self._handle_exit():
                    return
        except Exception as ex:  # a device bug must stop this VM, not the host process
            log.exception("vcpu%d: exit handling failed", self.index)
            self._guest_stopped(f"VMM error: {ex}")
        finally:
            self.parked.set()

    def _handle_exit(self) -> bool:
        run = self.run
        reason = run.exit_reason
        if reason == K.KVM_EXIT_IO:
            io = run.exit.io
            size, count, port = io.size, io.count, io.port
            addr = self.run_addr + io.data_offset
            if io.direction == K.KVM_EXIT_IO_OUT:
                data = C.string_at(addr, size * count)
                for i in range(count):
                    self.ports.write(port, data[i * size : (i + 1) * size], self.index)
            else:
                for i in range(count):
                    C.memmove(addr + i * size, self.ports.read(port, size, self.index), size)
            return True
        if reason == K.KVM_EXIT_MMIO:
            m = run.exit.mmio
            n = m.len
            if m.is_write:
                self.mmio.write(m.phys_addr, bytes(m.data)[:n], self.index)
            else:
                C.memmove(C.addressof(m.data), self.mmio.read(m.phys_addr, n, self.index), n)
            return True
        if reason in (K.KVM_EXIT_INTR, K.KVM_EXIT_IRQ_WINDOW_OPEN):
            return True
        if reason == K.KVM_EXIT_HLT:
            self._guest_stopped("hlt with interrupts off (no in-kernel wakeup)")
            return False
        if reason == K.KVM_EXIT_SYSTEM_EVENT:
            kinds = {K.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", K.KVM_SYSTEM_EVENT_RESET: "reset", K.KVM_SYSTEM_EVENT_CRASH: "crash"}
            self._guest_stopped(f"system event: {kinds.get(run.exit.system_event.type, run.exit.system_event.type)}")
            return False
        detail = ""
        if reason == K.KVM_EXIT_FAIL_ENTRY:
            detail = f": hardware entry failure reason {run.exit.fail_entry.hardware_entry_failure_reason:#x}"
        elif reason == K.KVM_EXIT_INTERNAL_ERROR:
            it = run.exit.internal
            detail = f": suberror {it.suberror} data {[hex(it.data[i]) for i in range(min(it.ndata, 16))]}"
        self._guest_stopped(f"{K.EXIT_NAMES.get(reason, f'exit {reason}')}{detail}")
        return False

    def _guest_stopped(self, reason: str) -> None:
        log.error("vcpu%d stopped: %s; %s", self.index, reason, self.state.describe())
        self._on_stop(self.index, reason)
