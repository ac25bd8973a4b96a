"""``luo vm ...`` (VMs under the host) and the hidden ``luo vmm ...`` process entry points."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from luo.errors import LuoError
from luo.host.status_text import guest_state


def host_client(args: argparse.Namespace):  # noqa: ANN202
    from luo.client import Client

    return Client(args.runtime_dir, timeout=args.connect_timeout)


def cmd_vm_start(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        extra = {k: getattr(args, k) for k in ("kernel", "initrd", "append", "qemu", "accel")} \
            if args.vmm == "qemu" else {}
        reply, _ = c.call("vm_start", name=args.name, vmm=args.vmm, mem=args.mem, cpus=args.cpus, image=args.image,
                          cmdline=args.cmdline, timeout=120.0, retry=False, **extra,
                          **({"no_pool": True} if args.no_pool else {}))
    vm = reply["vm"]
    print(f"vm {vm['name']} running: {vm.get('vmm', 'luo')} VMM pid {vm['pid']}, session {vm['session']}, "
          f"console {vm['console']}")
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        reply, _ = c.call("vm_list")
    if args.json:
        print(json.dumps(reply["vms"], indent=2))
        return 0
    for vm in reply["vms"]:
        print(f"{vm['name']:16} {vm.get('vmm', 'luo'):5} {guest_state(vm):14} pid {vm['pid']:<8} mem {vm.get('mem', '?')} "
              f"cpus {vm.get('cpus', '?')}")
    return 0


def cmd_vm_stop(args: argparse.Namespace) -> int:
    with host_client(args) as c:
        c.call("vm_stop", name=args.name)
    print(f"vm {args.name} stopped")
    return 0


def cmd_vm_console(args: argparse.Namespace) -> int:
    from luo.host.runtime import RuntimeDir, resolve_runtime_dir

    path = RuntimeDir(resolve_runtime_dir(args.runtime_dir)).vm_dir(args.name) / "console.log"
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise LuoError(2, f"no console for VM {args.name!r} at {path}") from None
    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif not args.follow:
                return 0
            else:
                time.sleep(0.1)  # following a log file: nothing to wait on but the file itself


def _require_host(args: argparse.Namespace) -> None:
    """The VMM processes are the host's children: with no host at all, say so before building a
    VM (libluo in the VMM waits for a host to come back, which is for re-attaching after a crash)."""
    from luo.client.connection import open_socket
    from luo.host.runtime import RuntimeDir, resolve_runtime_dir

    open_socket(RuntimeDir(resolve_runtime_dir(args.runtime_dir)).socket).close()


def cmd_vmm_run(args: argparse.Namespace) -> int:
    _require_host(args)
    if args.vmm == "qemu":
        from luo.qemu.guest import DEFAULT_APPEND, default_initrd, default_kernel, qemu_binary
        from luo.qemu.machine import QemuConfig
        from luo.qemu.main import run_qemu_vmm
        from luo.vmm.live.main import _logging, parse_size

        _logging(args.name)
        config = QemuConfig(args.qemu or qemu_binary(), args.kernel or str(default_kernel()),
                            args.initrd or str(default_initrd()), args.append or DEFAULT_APPEND, args.accel)
        return run_qemu_vmm(args.runtime_dir, args.name, parse_size(args.mem), args.cpus, config,
                            args.pool_fd, _extents(args.pool_extents))
    from luo.vmm.live.main import run_vmm

    return run_vmm(args.runtime_dir, args.name, args.mem, args.cpus, args.image, args.cmdline,
                   args.pool_fd, _extents(args.pool_extents))


def _extents(text: str | None) -> list[tuple[int, int]] | None:
    """``OFFSET+LENGTH,...`` (what the host put on the VMM's command line) as pairs."""
    if not text:
        return None
    return [(int(o, 0), int(n, 0)) for o, n in (p.split("+") for p in text.split(","))]


def cmd_vmm_successor(args: argparse.Namespace) -> int:
    _require_host(args)
    if args.qemu:
        import os

        os.environ["LUO_QEMU"] = args.qemu  # the QEMU of this update's new installation
    from luo.vmm.live.main import run_successor

    return run_successor(args.runtime_dir, args.name, args.channel)


def subcommand(parent: Any, name: str, fn: Any, help: str | None) -> argparse.ArgumentParser:
    """A leaf command of a command group (``luo vm start``, ``luo pool status``), which takes the
    global ``--runtime-dir`` after its name too."""
    kw: dict[str, Any] = {"help": help} if help else {}
    p = parent.add_parser(name, **kw)
    p.add_argument("--runtime-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(fn=fn)
    return p


def add_vm_commands(sub: Any) -> None:
    sp = subcommand

    vm = sub.add_parser("vm", help="VMs under the host")
    vsub = vm.add_subparsers(dest="vm_command", required=True)
    s = sp(vsub, "start", cmd_vm_start, "start a VM (default: the test guest)")
    s.add_argument("name")
    s.add_argument("--vmm", default="luo", help="the kind of VMM (a driver of the host): luo or qemu")
    s.add_argument("--kernel", default=None, help="(qemu) the guest kernel (default: the set-up's Debian cloud kernel)")
    s.add_argument("--initrd", default=None, help="(qemu) the initramfs (default: the set-up's heartbeat guest)")
    s.add_argument("--append", default=None, help="(qemu) the kernel command line")
    s.add_argument("--qemu", default=None, help="(qemu) the QEMU binary (default: qemu-system-x86_64 on PATH)")
    s.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"),
                   help="(qemu) auto: KVM only with hardware virtualisation (vmx/svm), else TCG")
    s.add_argument("--mem", default="256M")
    s.add_argument("--cpus", type=int, default=2)
    s.add_argument("--image", default=None)
    s.add_argument("--cmdline", default=None)
    s.add_argument("--no-pool", action="store_true",
                   help="guest RAM in a memfd of its own even when the host has a memory pool")
    s = sp(vsub, "list", cmd_vm_list, "list VMs")
    s.add_argument("--json", action="store_true")
    s = sp(vsub, "stop", cmd_vm_stop, "stop a VM")
    s.add_argument("name")
    s = sp(vsub, "console", cmd_vm_console, "print a VM's console")
    s.add_argument("name")
    s.add_argument("--follow", "-f", action="store_true")

    vmm = sub.add_parser("vmm", help="(internal) the VMM processes the host starts")
    msub = vmm.add_subparsers(dest="vmm_command", required=True)
    r = sp(msub, "run", cmd_vmm_run, None)
    r.add_argument("--vmm", choices=("luo", "qemu"), default="luo")
    r.add_argument("--kernel", default=None)
    r.add_argument("--initrd", default=None)
    r.add_argument("--append", default=None)
    r.add_argument("--qemu", default=None)
    r.add_argument("--accel", default="auto")
    r.add_argument("--name", required=True)
    r.add_argument("--mem", default="256M")
    r.add_argument("--cpus", type=int, default=2)
    r.add_argument("--image", default=None)
    r.add_argument("--cmdline", default=None)
    r.add_argument("--pool-fd", type=int, default=None, help="the host's memory pool memfd (inherited)")
    r.add_argument("--pool-extents", default=None, help="guest RAM as OFFSET+LENGTH,... of the pool")
    r = sp(msub, "successor", cmd_vmm_successor, None)
    r.add_argument("--name", required=True)
    r.add_argument("--channel", type=int, required=True)
    r.add_argument("--qemu", default=None)


__all__ = ["add_vm_commands"]
