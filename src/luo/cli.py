"""The ``luo`` command: luoctl's verbs plus the host, updates, KHO dumps and VMs.

Every failure is one line naming the errno and a sentence, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any

from luo.errors import LuoError


def _client(args: argparse.Namespace):  # noqa: ANN202
    from luo.client import Client

    return Client(args.runtime_dir, timeout=args.connect_timeout)


def cmd_host(args: argparse.Namespace) -> int:
    import os

    from luo.host.main import run_host

    # the pool's configuration lives in the environment, which every successor host inherits
    for flag, var in (("pool", "LUO_POOL"), ("shards", "LUO_POOL_SHARDS"), ("labels", "LUO_POOL_LABELS")):
        if getattr(args, flag, None):
            os.environ[var] = getattr(args, flag)
    if args.successor is None and os.environ.get("LUO_POOL"):
        from luo.pool.host import asked_layout

        asked_layout()  # a bad --pool/--shards/--labels is refused here, before anything starts
    return run_host(args.runtime_dir, args.successor)


def cmd_state(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(c.state.label)
    return 0


def cmd_event(args: argparse.Namespace) -> int:
    with _client(args) as c:
        getattr(c, args.command)()
        print(c.state.label)
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from luo.client.update import update
    from luo.observe.commands import after_update, before_update

    before_update(args.plot)  # a plot that cannot be drawn is refused before updating
    result = update(args.runtime_dir, to=args.to, timeout=args.timeout, connect_timeout=args.connect_timeout,
                    faults=args.fault, qemu=args.qemu)
    if args.reboot:
        from luo.host.runtime import resolve_runtime_dir
        from luo.uapi.control import reboot

        result["rebooted"], result["reboot_errors"] = reboot(str(resolve_runtime_dir(args.runtime_dir)),
                                                             int(result["new_pid"]))
    plot_error: LuoError | None = None
    if args.plot:
        try:
            result["plot"] = str(after_update(args, result))
        except LuoError as e:  # the update happened; only its picture is missing
            plot_error = e
    if args.json:
        print(json.dumps(result))
    else:
        print(format_update(result) + (f"\n  plot: {result['plot']}" if "plot" in result else ""))
    if plot_error is not None:
        print(f"luo update: updated, but no plot: {plot_error}", file=sys.stderr)
    # the update happened; the asked reboot or plot did not
    return 1 if result.get("reboot_errors") or plot_error is not None else 0


def format_update(r: dict[str, Any]) -> str:
    lines = [f"updated: host pid {r['old_pid']} -> {r['new_pid']}, liveupdate-number {r['liveupdate_number']}, "
             f"total {r['total_ms']:.1f} ms"]
    lines.append("  phases: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["phases_ms"].items()))
    if "rebooted" in r:
        lines.append(f"  reboot: ended {len(r['rebooted'])} luo run process(es) holding pre-update sessions"
                     + (f": {', '.join(map(str, r['rebooted']))}" if r["rebooted"] else ""))
        lines += [f"  reboot: NOT DONE by {e}" for e in r.get("reboot_errors", [])]
    for name, vm in sorted(r.get("vms", {}).items()):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in vm.get("parts_ms", {}).items())
        line = f"  vm {name}: blackout {vm['blackout_ms']:.2f} ms ({parts})"
        mig = vm.get("migration")
        if isinstance(mig, dict):  # a QEMU VM: its mode, QEMU's own STOP -> RESUME, what moved
            qmp = vm.get("qmp_blackout_ms")
            line += (f"; QEMU {mig.get('mode', 'x-ignore-shared')}"
                     + (f", STOP->RESUME {qmp:.2f} ms" if isinstance(qmp, (int, float)) else "")
                     + f", {mig.get('bytes', 0)} bytes moved")
        lines.append(line)
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.status()
    from luo.host.runtime import resolve_runtime_dir
    from luo.uapi.control import ask_all

    # each `luo run` supervisor answers for itself; one that does not within a second is listed so
    st["luo_run"] = ask_all(str(resolve_runtime_dir(args.runtime_dir)), {"op": "status"}, timeout=1.0)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    from luo.host.status_text import format_status

    print(format_status(st))
    return 0


def cmd_kho_dump(args: argparse.Namespace) -> int:
    if args.file:
        try:
            with open(args.file, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise LuoError(e.errno or 5, f"cannot read {args.file}: {e.strerror}") from None
    else:
        which = "outgoing" if args.outgoing else "incoming"
        with _client(args) as c:
            reply, _ = c.call("kho_dump", which=which)
        blob = base64.b64decode(reply["blob"])
    if args.raw:
        sys.stdout.buffer.write(blob)
        sys.stdout.flush()
        return 0
    from luo.kho import to_dts

    sys.stdout.write(to_dts(blob))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from luo.demo import run_demo

    return run_demo(args.mem, args.cpus, args.updates, args.runtime_dir, qemu=not args.no_qemu,
                    pool=None if args.pool == "none" else args.pool)


def cmd_qualify(args: argparse.Namespace) -> int:
    from luo.qualify import run_qualify

    return run_qualify(args.from_cmd, args.to_cmd, args.mem, args.cpus, args.round_trip, args.json,
                       args.runtime_dir)


def cmd_selftest(args: argparse.Namespace) -> int:
    from luo.selftest import run_selftest

    return run_selftest(args.runtime_dir, args.sessions, args.files)


def cmd_run(args: argparse.Namespace) -> int:
    from luo.uapi.launch import run

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    return run(argv, args.runtime_dir)


def cmd_keeper(args: argparse.Namespace) -> int:
    from luo.host.runtime import resolve_runtime_dir
    from luo.keeper.server import run_keeper

    return run_keeper(resolve_runtime_dir(args.runtime_dir))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="luo", description="live update for hypervisor hosts")
    p.add_argument("--runtime-dir", default=None, help="runtime dir (else $LUO_RUNTIME_DIR, else /run/luo)")
    # seconds to wait for a host to appear; by default a command that needs the host and finds
    # none says so at once (a connect during an update is queued, so it needs no wait)
    p.add_argument("--connect-timeout", type=float, default=0.0, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--runtime-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.set_defaults(fn=fn)
        return sp

    h = add("host", cmd_host, "run the host daemon (luod)")
    h.add_argument("--successor", type=int, default=None, help=argparse.SUPPRESS)
    h.add_argument("--pool", default=None, metavar="SIZE[:hugetlb|:shmem]",
                   help="a memory pool for guests (default backing hugetlb; env LUO_POOL)")
    h.add_argument("--shards", default=None, metavar="SIZE:devdax|fsdax[:1G],...",
                   help="carve the pool into shards, in this order (env LUO_POOL_SHARDS)")
    h.add_argument("--labels", default=None, choices=("none", "end"),
                   help="none: the command line is the layout; end: a label area at the pool's end "
                        "(luo pool shard create/delete) (env LUO_POOL_LABELS)")
    r = add("run", cmd_run, "run a program that uses /dev/liveupdate, served by this host (no kexec needed)")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="[--] COMMAND [ARGS...]")
    add("keeper", cmd_keeper, "hold preserved fds across a crash of luod (started by luod)")
    add("state", cmd_state, "print the LUO state")
    for ev in ("prepare", "freeze", "cancel", "finish"):
        add(ev, cmd_event, f"send the {ev} event")
    u = add("update", cmd_update, "live-update the host (prepare, freeze, handover)")
    u.add_argument("--to", default=None, help="the luo command of the version to update to")
    u.add_argument("--qemu", default=None, metavar="PATH",
                   help="the QEMU binary the QEMU VMs move to (default: the new installation's)")
    u.add_argument("--json", action="store_true")
    u.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the successor's confirmation")
    u.add_argument("--fault", action="append", default=[], help=argparse.SUPPRESS)
    u.add_argument("--reboot", action="store_true",
                   help="then end every `luo run` process still holding a pre-update session, as a kexec would")
    u.add_argument("--plot", default=None, metavar="FILE",
                   help="then draw the update's timeline into FILE (.svg or .png; needs luo[plot])")
    s = add("status", cmd_status, "show state, preserved fds, sessions and VMs")
    s.add_argument("--json", action="store_true")
    dm = add("demo", cmd_demo, "the main job: VMs under load (ours and a QEMU one) live-updated N times, "
             "blackouts reported")
    dm.add_argument("--mem", default="1G")
    dm.add_argument("--cpus", type=int, default=2)
    dm.add_argument("--updates", type=int, default=5)
    dm.add_argument("--no-qemu", action="store_true", help="only our VMM's guest, no QEMU VM")
    dm.add_argument("--pool", default="2G:hugetlb", help="the host's memory pool the guests run from ('none': none)")
    q = add("qualify", cmd_qualify, "qualify live update from one installation of luo to another")
    q.add_argument("--from", dest="from_cmd", default=None, metavar="CMD",
                   help="the luo command of the installation to update from (default: this one)")
    q.add_argument("--to", dest="to_cmd", default=None, metavar="CMD",
                   help="the luo command of the installation to update to (default: this one)")
    q.add_argument("--mem", default="256M")
    q.add_argument("--cpus", type=int, default=2)
    q.add_argument("--round-trip", action="store_true", help="then update back from --to to --from")
    q.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    st = add("selftest", cmd_selftest, "two-stage live-update selftest (run, update, run again)")
    st.add_argument("--sessions", type=int, default=4)
    st.add_argument("--files", type=int, default=3)
    k = add("kho", lambda a: 2, "KHO tree")
    ksub = k.add_subparsers(dest="kho_command", required=True)
    d = ksub.add_parser("dump", help="print the KHO tree as dts")
    d.add_argument("--runtime-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g = d.add_mutually_exclusive_group()
    g.add_argument("--incoming", action="store_true")
    g.add_argument("--outgoing", action="store_true")
    g.add_argument("--file", default=None, help="a DTB file (e.g. a refused tree kept in <runtime>/updates)")
    d.add_argument("--raw", action="store_true", help="write the DTB itself to stdout")
    d.set_defaults(fn=cmd_kho_dump)
    from luo.observe.commands import add_observe_commands

    add_observe_commands(add)
    from luo.cli_pool import add_pool_commands
    from luo.cli_vm import add_vm_commands

    add_vm_commands(sub)
    add_pool_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except LuoError as e:
        print(f"luo {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        print(f"luo {args.command}: {os.strerror(e.errno or 5)}: {e}", file=sys.stderr)
        return 1
