"""Boot an ELF guest and run it: ``python -m luo.vmm.run --image ELF --mem 256M --cpus 2 ...``

For the guest author and for debugging. ``--self-test-restore`` also proves the state record is
complete: after a while it pauses, saves, builds a second Vm around the same memfd in this
process, restores into it and resumes there.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import threading
import time

from luo.errors import LuoError
from luo.vmm.devices.console_sink import ConsoleSink, FileConsoleSink, StreamConsoleSink, TeeConsoleSink
from luo.vmm.vcpu import install_kick_handler
from luo.vmm.vm import Vm


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", s.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m luo.vmm.run", description=__doc__.splitlines()[0])
    ap.add_argument("--image", required=True, help="ELF64 guest kernel")
    ap.add_argument("--mem", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--cmdline", default="")
    ap.add_argument("--name", default="vm0")
    ap.add_argument("--console", help="append console lines to FILE (default: stdout)")
    ap.add_argument("--seconds", type=float, help="stop after N seconds (default: until the guest stops)")
    ap.add_argument("--self-test-restore", action="store_true", help="pause/save/restore into a second Vm midway")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(name)s: %(message)s")
    install_kick_handler()
    console: ConsoleSink = StreamConsoleSink()
    if a.console:
        console = FileConsoleSink(a.console)
        if a.verbose:
            console = TeeConsoleSink(console, StreamConsoleSink(sys.stderr))
    try:
        vm = Vm.create(a.name, a.mem, a.cpus, console=console)
        vm.boot(a.image, a.cmdline)
        vm.start()
        log = logging.getLogger("luo.vmm.run")
        log.info("booted %s: %d vCPUs, %d MiB, create %.2f ms", a.image, a.cpus, a.mem >> 20, vm.timings["create"])
        if a.self_test_restore:
            half = (a.seconds or 2.0) / 2
            vm.stopped.wait(half)
            vm = self_test_restore(vm, console, log)
            deadline = half
        else:
            deadline = a.seconds if a.seconds is not None else None
        _wait(vm, deadline)
        reason = vm.stop_reason
        vm.stop()
        if reason:
            log.info("guest stopped: %s", reason)
        return 0
    except LuoError as e:
        print(f"luo.vmm.run: {e}", file=sys.stderr)
        return 1


def _wait(vm: Vm, seconds: float | None) -> None:
    """Wait for the guest to stop, the time to run out, or Ctrl-C (main thread keeps signals live)."""
    end = None if seconds is None else time.monotonic() + seconds
    try:
        while not vm.stopped.is_set():
            left = 0.5 if end is None else min(0.5, end - time.monotonic())
            if left <= 0:
                break
            vm.stopped.wait(left)
    except KeyboardInterrupt:
        pass


def self_test_restore(old: Vm, console: ConsoleSink, log: logging.Logger) -> Vm:
    new = Vm.create(old.name + "-successor", old.mem_bytes, old.ncpus, memfd=old.memfd, console=console)
    t0 = time.perf_counter()
    old.pause()
    rec = old.save()
    new.restore(rec)
    new.start()
    blackout = (time.perf_counter() - t0) * 1000
    log.info(
        "self-test restore: pause %.2f ms, save %.2f ms (%d bytes), restore %.2f ms, resume %.2f ms, blackout %.2f ms",
        old.timings["pause"], old.timings["save"], len(rec), new.timings["restore"], new.timings["resume"], blackout,
    )
    old.mem.owned = False  # the successor maps the same memfd; keep it open for it
    old.stop()
    new.mem.owned = True
    return new


if __name__ == "__main__":
    threading.current_thread().name = "vmm-main"
    sys.exit(main())
