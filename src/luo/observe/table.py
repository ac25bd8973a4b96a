"""The timeline as a text table: one row per phase, grouped by lane, ms from the first event.

Text first because it always works (no matplotlib, over ssh, in a log) and because the numbers
are what one compares between two updates; the plot is for seeing the overlap at a glance.
"""

from __future__ import annotations

from luo.observe.timeline import Timeline


def _pid(pid: int) -> str:
    return str(pid) if pid else "?"  # 0: the record did not say (no timeline)


def format_table(tl: Timeline) -> str:
    """Lanes and phases (start, end, duration in ms from the first event), then each VM's blackout."""
    head = f"liveupdate {tl.number if tl.number is not None else '?'}: {tl.total_ms:.3f} ms from the first event to the last"
    reported = tl.record.get("total_ms")
    if isinstance(reported, int | float) and not tl.measured:
        head += f" (the host reported {reported:.3f} ms)"
    lines = [head]
    if tl.note:
        lines.append(tl.note)
    lanes = tl.lanes()
    width = max([len(ln.name) for ln in lanes] + [4])
    lines.append(f"{'lane':{width}}  {'pid':>8}  {'phase':16} {'start ms':>10} {'end ms':>10} {'dur ms':>10}")
    for ln in lanes:
        shown_pid: int | None = None
        for i, p in enumerate(ln.phases):
            pid = _pid(p.pid) if p.pid != shown_pid else ""
            shown_pid = p.pid
            lines.append(f"{ln.name if i == 0 else '':{width}}  {pid:>8}  {p.name:16} {tl.ms(p.start_ns):10.3f} "
                         f"{tl.ms(p.end_ns):10.3f} {p.duration_ns / 1e6:10.3f}")
    if not lanes:
        lines.append("(no phases in this record)")
    for name, vm in sorted(tl.vms.items()):
        where = (f", {tl.ms(vm.start_ns):.3f}-{tl.ms(vm.end_ns):.3f} ms"
                 if vm.start_ns is not None and vm.end_ns is not None else "")
        parts = ", ".join(f"{k} {v:.3f}" for k, v in vm.parts_ms.items())
        lines.append(f"vm {name}: blackout {vm.blackout_ms:.3f} ms{where}" + (f" ({parts})" if parts else ""))
    return "\n".join(lines)
