"""Process identity: a name an operator recognises in ps/top (``luod``, ``luo-vmm:NAME``), and
the scheduling weight of the threads on a blackout's critical path."""

from __future__ import annotations

import ctypes
import os
import threading

PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except OSError:
        pass


CONTROL_NICE = -10


def favour_this_thread(nice: int = CONTROL_NICE) -> None:
    """Give the calling thread a higher scheduling weight (Linux nice values are per thread).

    The blackout's critical path is a chain of wake-ups across the host and VMM processes; on a
    busy machine each wake-up can wait a scheduler slice behind guest vCPUs. Threads created
    later inherit this, so a VMM calls it after its vCPU threads exist. Without the privilege to
    raise priority this quietly does nothing.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        pass


WARMUP_NICE = 19


def start_in_background(pid: int) -> None:
    """Lower a just-started successor's weight while it imports and builds: its start-up must
    not take CPU from running guests. It favours itself once warm (favour_this_thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, WARMUP_NICE)
    except OSError:
        pass


def normal_weight_for_other_threads(nice: int = 0) -> None:
    """Put every thread but the calling one at the normal weight (vCPU threads inherit the
    weight of the thread that created them, and a successor VMM creates them while warming)."""
    me = threading.get_native_id()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != me:
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            except OSError:
                pass
