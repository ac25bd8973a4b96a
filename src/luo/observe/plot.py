"""The timeline drawn with matplotlib: one horizontal lane per process, one bar per phase.

matplotlib is an optional extra (``luo[plot]``): without it the text table still works and
``--plot`` fails with one line saying how to install it (ENOPKG), checked before anything is
done, so ``luo update --plot`` never updates and then cannot draw.

The figure is built on the Agg canvas directly (no pyplot): no display is needed and no global
backend state changes in the caller's process. A blackout is a few ms of an update that lasts a
few hundred, so when the blackouts are a sliver of the whole a second panel zooms on them.
"""

from __future__ import annotations

import errno
import zlib
from pathlib import Path
from typing import Any

from luo.errors import LuoError
from luo.observe.timeline import Timeline

FORMATS = (".svg", ".png")
# A real update has 2 + 2 per VM lanes and a dozen phases per lane; a record asking for far more
# is refused (EINVAL) rather than drawn into a figure of gigabytes. The table shows any record.
MAX_LANES = 64
MAX_BARS = 4000
INSTALL_HINT = "pip install 'luo[plot]' (in a checkout: .venv/bin/pip install -e '.[plot]')"

# One colour per phase name, the same in every plot; unknown names get a stable one from a palette.
_COLOURS = {
    "start": "#9e9e9e", "prepare": "#4c72b0", "check": "#64b5cd", "freeze": "#8172b2", "tree": "#a6a61e",
    "handover": "#dd8452", "release": "#55a868", "receive": "#c9a227", "adopt": "#8c613c",
    "warm": "#a1c9f4", "pause": "#c44e52", "save": "#ff9f9b", "restore": "#2a9d8f",
    "wait_go": "#d0bb94", "resume": "#2ca02c",
}
_PALETTE = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_BLACKOUT = "#d62728"


def colour(phase: str) -> str:
    return _COLOURS.get(phase) or _PALETTE[zlib.crc32(phase.encode()) % len(_PALETTE)]


def require_matplotlib() -> None:
    """Fail now (ENOPKG, one line) if plotting cannot work, before the caller does anything."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LuoError(errno.ENOPKG, f"plotting needs matplotlib: {INSTALL_HINT}") from None


def check_plot_path(path: str | Path) -> Path:
    """The output file: its suffix says the format; refused (EINVAL) before anything is done."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise LuoError(errno.EINVAL, f"--plot {p}: the file name must end in {' or '.join(FORMATS)}")
    return p


def plot(tl: Timeline, path: str | Path) -> Path:
    """Draw ``tl`` into ``path`` (.svg or .png); returns the path."""
    out = check_plot_path(path)
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lanes = tl.lanes()
    names = [ln.name for ln in lanes]
    if len(lanes) > MAX_LANES or len(tl.phases) > MAX_BARS:
        raise LuoError(errno.EINVAL, f"{tl.source}: {len(lanes)} lanes and {len(tl.phases)} phases are too many to "
                       f"draw (at most {MAX_LANES} and {MAX_BARS}); `luo timeline` shows them as a table")
    zoom = _zoom_window(tl)
    rows = max(1, len(lanes))
    height = 1.6 + 0.5 * rows
    fig = Figure(figsize=(12, height * (1.8 if zoom else 1.0) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    if zoom:
        ax, zax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 1]})
    else:
        ax, zax = fig.subplots(1, 1), None
    _draw(ax, tl, names, None)
    if zax is not None and zoom is not None:
        _draw(zax, tl, names, zoom)
        zax.set_title("the blackout, zoomed", fontsize=9, loc="left")
        ax.axvspan(*zoom, color="#000000", alpha=0.06, linewidth=0)  # where the zoom is
    fig.suptitle(_title(tl), fontsize=11)
    seen = dict.fromkeys(p.name for ln in lanes for p in ln.phases)
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(facecolor=colour(n), label=n) for n in seen]
    if tl.vms:
        handles.append(Patch(facecolor=_BLACKOUT, alpha=0.25, label="VM blackout"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9), fontsize=8, frameon=False)
    try:
        fig.savefig(out, format=out.suffix.lower()[1:], dpi=110)
    except OSError as e:
        raise LuoError(e.errno or errno.EIO, f"cannot write {out}: {e.strerror}") from None
    return out


def _title(tl: Timeline) -> str:
    n = tl.number if tl.number is not None else "?"
    t = f"liveupdate {n}: {tl.total_ms:.1f} ms"
    if tl.vms:
        t += "; blackout " + ", ".join(f"{name} {v.blackout_ms:.2f} ms" for name, v in sorted(tl.vms.items()))
    if tl.note:
        t += f"\n{tl.note}"
    return t


def _zoom_window(tl: Timeline) -> tuple[float, float] | None:
    """The ms range around every placed blackout, if it is too small to see on the whole."""
    spans = [(tl.ms(v.start_ns), tl.ms(v.end_ns)) for v in tl.vms.values()
             if v.start_ns is not None and v.end_ns is not None]
    if not spans or tl.total_ms <= 0:
        return None
    a, b = min(s for s, _ in spans), max(e for _, e in spans)
    if b - a > 0.25 * tl.total_ms:
        return None  # visible as it is
    pad = max((b - a) * 0.6, 0.5)
    return a - pad, b + pad


def _draw(ax: Any, tl: Timeline, names: list[str], window: tuple[float, float] | None) -> None:
    """One bar per phase in its lane (lane 0 at the top), the blackouts shaded over their VM's lanes."""
    y = {n: i for i, n in enumerate(names)}
    lo, hi = window if window else (0.0, max(tl.total_ms, 1e-3))
    span = hi - lo
    for ln in tl.lanes():
        for p in ln.phases:
            a, d = tl.ms(p.start_ns), p.duration_ns / 1e6
            if window and (a + d < lo or a > hi):
                continue
            ax.barh(y[ln.name], max(d, span * 0.002), left=a, height=0.6, color=colour(p.name),
                    edgecolor="white", linewidth=0.4, zorder=2)
            shown = min(a + d, hi) - max(a, lo)
            if shown >= span * 0.07:  # a label only where it fits
                ax.text(max(a, lo) + shown / 2, y[ln.name], f"{p.name}\n{d:.1f} ms" if d >= 1 else f"{p.name}\n{d:.2f} ms",
                        ha="center", va="center", fontsize=7, clip_on=True)
    for name, vm in sorted(tl.vms.items()):
        if vm.start_ns is None or vm.end_ns is None:
            continue
        a, b = tl.ms(vm.start_ns), tl.ms(vm.end_ns)
        rows = [y[n] for n in (f"vmm:{name}", f"vmm-successor:{name}") if n in y]
        y0, y1 = (min(rows) - 0.45, max(rows) + 0.45) if rows else (-0.5, len(names) - 0.5)
        # behind the bars (zorder), so the phases inside the blackout keep their colours
        ax.fill_between([a, max(b, a + span * 0.002)], y0, y1, color=_BLACKOUT, alpha=0.18, linewidth=0, zorder=1)
        ax.plot([a, a], [y0, y1], color=_BLACKOUT, linewidth=0.8, zorder=3)
        ax.plot([b, b], [y0, y1], color=_BLACKOUT, linewidth=0.8, zorder=3)
        if b - a >= span * 0.03:  # the title names every blackout; here only where the label fits
            ax.text(b, y0, f" {name}: {vm.blackout_ms:.2f} ms", color=_BLACKOUT, fontsize=7, va="bottom",
                    ha="left", clip_on=True, zorder=3)
    ax.set_yticks(range(len(names)), [_lane_label(tl, n) for n in names], fontsize=8)
    ax.set_ylim(len(names) - 0.5 if names else 0.5, -0.5)
    ax.set_xlim(lo, hi + span * 0.01)
    ax.set_xlabel("ms from the first event" + ("" if tl.measured else " (phases laid end to end)"), fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)


def _lane_label(tl: Timeline, lane: str) -> str:
    pids = [ln.pids for ln in tl.lanes() if ln.name == lane]
    known = [str(p) for p in (pids[0] if pids else ()) if p]
    return f"{lane}\npid {', '.join(known)}" if known else lane
