"""Process identity: a name an operator recognises in ps/top (``luod``, ``luo-vmm:NAME``), and
the scheduling weight of the threads on a blackout's critical path."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import threading
import time

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


WARMUP_NICE = 19  # the successor's threads (SCHED_IDLE, else this nice)
WARMUP_SESSION_NICE = 10  # the successor's session: well below a VMM's, yet not stuck behind a busy machine
GUEST_SESSION_NICE = -10  # a VMM's session: its vCPU threads before any host work


def _tids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def _set_autogroup_nice(pid: int, nice: int, patience: float = 0.0) -> bool:
    """Set the nice value of pid's autogroup, only when pid leads its own session (the autogroup is
    then its own: a successor or VMM started with start_new_session). With autogroups on
    (kernel.sched_autogroup_enabled, processes in the root cpu cgroup), every session is one
    scheduling entity of full weight, whatever the nice value or policy of its threads: this is
    the only knob that lowers a whole process against the other sessions. Unprivileged writers
    are rate limited (EAGAIN within 100 ms of any other write): ``patience`` retries that long."""
    try:
        if os.getsid(pid) != pid:
            return False
    except OSError:
        return False
    deadline = time.monotonic() + patience
    while True:
        try:
            with open(f"/proc/{pid}/autogroup", "w") as f:
                f.write(str(nice))
            return True
        except OSError as e:
            if e.errno != errno.EAGAIN or time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _set_policy(tid: int, policy: int, nice: int) -> None:
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(0))
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass


def start_in_background(pid: int) -> None:
    """Put a process in the background: a just-started successor while it imports and builds (its
    start-up must not take CPU from running guests), or an outgoing process whose guest moved on
    while it tears down. A successor leaves the background once warm (leave_background).

    Three layers, because any one alone fails somewhere: SCHED_IDLE (a wake-up of any normal
    thread preempts it; nice 19 as the fallback) works among the threads of one process or
    session; the autogroup's nice works across sessions, where the first two do nothing (every
    session weighs the same: a successor at nice 19 in its own session took a full share and
    delayed a freshly resumed vCPU thread by 52 ms, docs/design.md "Scheduling on a small
    machine"). Threads created later inherit the policy.
    """
    if _can_undo_background():
        for tid in _tids(pid):
            _set_policy(tid, os.SCHED_IDLE, WARMUP_NICE)
    _set_autogroup_nice(pid, WARMUP_SESSION_NICE)


CAP_SYS_NICE = 23


def _can_undo_background() -> bool:
    """Whether a process of our user can come back from SCHED_IDLE and nice 19 (CAP_SYS_NICE, or
    an RLIMIT_NICE that allows nice 0). Without that it is a one-way trip, and a successor VMM's
    vCPU threads would stay in the background for good: the session's nice alone must do."""
    try:
        with open("/proc/self/status") as f:
            caps = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
        if caps >> CAP_SYS_NICE & 1:
            return True
    except (OSError, StopIteration, ValueError):
        pass
    return resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def favour_this_session(nice: int = GUEST_SESSION_NICE) -> None:
    """Give a VMM's session (its autogroup) a higher weight than host work: without it, every
    session weighs the same, and on a 2-core machine a woken vCPU thread waited 58 ms behind a
    CPU-bound process of another session. Needs the privilege to raise priority (else nothing)."""
    _set_autogroup_nice(os.getpid(), nice)


def leave_background(session_nice: int = 0) -> None:
    """Called by a warm successor: every thread of this process back to SCHED_OTHER at the normal
    weight (vCPU threads inherit the weight of the thread that created them, and a successor VMM
    creates them while warming), and its session back to the normal share. The session's share
    must come back or the guest it takes over would run in the background for good: the
    rate-limited autogroup write is retried, and a failure is said out loud. ``session_nice``: a
    successor VMM asks for GUEST_SESSION_NICE, and gets the normal share without the privilege."""
    for tid in _tids(os.getpid()):
        _set_policy(tid, os.SCHED_OTHER, 0)
    try:
        with open("/proc/self/autogroup") as f:
            at_warmup = f.read().split()[-1] == str(WARMUP_SESSION_NICE)
    except (OSError, IndexError):
        return
    if session_nice < 0 and _set_autogroup_nice(os.getpid(), session_nice):
        return
    if at_warmup and not _set_autogroup_nice(os.getpid(), max(session_nice, 0), patience=1.0):
        logging.getLogger("luo").warning("pid %d: cannot put its session back to the normal CPU share", os.getpid())
