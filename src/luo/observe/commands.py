"""``luo timeline``, ``luo metrics`` and the plot of ``luo update --plot``.

Kept out of luo/cli.py so the CLI only wires arguments; nothing here needs a host except the
status part of ``luo metrics``, so a runtime dir copied off a machine can be looked at anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from luo.observe import records
from luo.observe.timeline import Timeline, load


def _runtime(args: argparse.Namespace) -> Path:
    from luo.host.runtime import resolve_runtime_dir

    return resolve_runtime_dir(args.runtime_dir)


def cmd_timeline(args: argparse.Namespace) -> int:
    """Print an update's timeline (a table, or JSON) and draw it if asked."""
    from luo.observe.plot import check_plot_path, require_matplotlib

    if args.plot:  # refuse a bad name or a missing matplotlib before reading anything
        check_plot_path(args.plot)
        require_matplotlib()
    path = Path(args.file) if args.file else records.find_record(_runtime(args), args.number)
    tl = load(path)
    show(tl, args.plot, args.json)
    return 0


def show(tl: Timeline, plot_path: str | None, as_json: bool, out: Any = None) -> None:
    """The table (or JSON) on ``out``; the plot into ``plot_path`` if given."""
    out = out or sys.stdout
    if plot_path:
        from luo.observe.plot import plot

        plot(tl, plot_path)
    if as_json:
        doc = tl.to_json()
        if plot_path:
            doc["plot"] = str(plot_path)
        print(json.dumps(doc), file=out)
        return
    from luo.observe.table import format_table

    print(format_table(tl), file=out)
    if plot_path:
        print(f"plot: {plot_path}", file=out)


def before_update(plot_path: str | None) -> None:
    """``luo update --plot``: refuse before updating if the plot cannot be drawn."""
    if plot_path:
        from luo.observe.plot import check_plot_path, require_matplotlib

        check_plot_path(plot_path)
        require_matplotlib()


def after_update(args: argparse.Namespace, result: dict[str, Any], timeout: float = 10.0) -> Path:
    """Draw the update just made: wait (with a deadline) for its record, then plot it.

    The record is written by the new host (with its VMs' blackouts once they reported), so it is
    read from disk rather than rebuilt from the reply: the plot shows what ``luo timeline N`` shows."""
    from luo.observe.plot import plot

    path = records.wait_for_record(_runtime(args), int(result["liveupdate_number"]), bool(result.get("vms")),
                                   timeout)
    return plot(load(path), args.plot)


def cmd_metrics(args: argparse.Namespace) -> int:
    """Print Prometheus text: the records of the runtime dir and the host's status."""
    from luo.observe.metrics import exposition, families, host_status, snapshot

    status, why = host_status(args.runtime_dir, args.connect_timeout)
    snap = snapshot(_runtime(args), status, why)
    sys.stdout.write(exposition(families(snap)))
    sys.stdout.flush()
    if why:
        print(f"luo metrics: no host status ({why}): luo_host_up 0", file=sys.stderr)
    for line in snap.invalid:
        print(f"luo metrics: skipped {line}", file=sys.stderr)
    return 0


def add_observe_commands(add: Any) -> None:
    """Register ``timeline`` and ``metrics`` with luo/cli.py's ``add(name, fn, help)``."""
    t = add("timeline", cmd_timeline, "show where the time of an update went (table, --plot FILE.svg|.png)")
    t.add_argument("number", type=int, nargs="?", default=None,
                   help="the liveupdate number (default: the latest record in the runtime dir)")
    t.add_argument("--plot", default=None, metavar="FILE", help="also draw it (.svg or .png; needs luo[plot])")
    t.add_argument("--json", action="store_true", help="print the laid-out timeline as JSON")
    t.add_argument("--file", default=None, help="read this record file instead of the runtime dir's")
    add("metrics", cmd_metrics, "print Prometheus metrics of the updates and the host (docs/observe.md)")
