"""One real host (no VM): `luo update --plot`, then `luo timeline --plot` and `luo metrics` on it,
each a real `luo` process as an operator runs them."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from luo.testing.host import HostProcess


def test_update_then_timeline_and_metrics(host: HostProcess, tmp_path: Path) -> None:
    up = host.luo("update", "--plot", str(tmp_path / "u.png"))
    assert "liveupdate-number 1" in up.stdout and f"plot: {tmp_path / 'u.png'}" in up.stdout
    assert (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"

    tl = host.luo("timeline", "--plot", str(tmp_path / "x.svg"))
    lines = tl.stdout.splitlines()
    assert lines[0].startswith("liveupdate 1: ")
    assert "vm " not in tl.stdout  # no VM crossed
    phases: dict[str, list[str]] = {}
    lane = ""
    assert lines[-1] == f"plot: {tmp_path / 'x.svg'}"
    for row in lines[lines.index(next(ln for ln in lines if ln.startswith("lane "))) + 1:-1]:
        if not row.startswith(" "):
            lane = row.split()[0]  # a lane's first row names it; the next ones leave it blank
        phases.setdefault(lane, []).append(row.split()[-4])  # ... phase start end duration
    assert ["start", "prepare", "check", "freeze", "tree", "handover"] == phases["host"][:6], tl.stdout
    assert "<svg" in (tmp_path / "x.svg").read_text()

    met = host.luo("metrics")
    values = {s.name: s.value for f in text_string_to_metric_families(met.stdout) for s in f.samples
              if not s.labels}
    assert values["luo_updates_total"] == 1
    assert values["luo_liveupdate_number"] == 1
    assert values["luo_host_up"] == 1
    assert values["luo_preserved_fds"] == 0 and values["luo_sessions"] == 0
    assert values["luo_update_records_invalid"] == 0
    assert 0 < values["luo_last_update_seconds"] < 60
