"""luo metrics: parsed back with prometheus_client's own parser, right values; the hand-written
exposition is byte for byte prometheus_client's."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from luo.cli import main
from luo.observe.metrics import client_exposition, exposition, families, hand_exposition, snapshot

STATUS: dict[str, Any] = {
    "state": "updated", "liveupdate_number": 7,
    "files": [{"token": 0}, {"token": 1}, {"token": 2}], "sessions": [{"name": "vm:g"}],
    "last_update": {"failed": "successor died", "stage": "handover", "time": 1.0},
}


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}, and check every family's type on the way."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    types = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    assert types["luo_updates"] == "counter" and types["luo_update_failures"] == "counter"
    assert types["luo_vm_blackout_seconds"] == "histogram"
    assert types["luo_vm_last_blackout_seconds"] == "gauge"
    return out


def test_metrics_of_the_records_and_the_status(runtime: Path) -> None:
    m = parse(exposition(families(snapshot(runtime, STATUS))))
    assert m["luo_updates_total"][()] == 2
    assert m["luo_update_failures_total"] == {(("stage", "handover"),): 1, (("stage", "prepare"),): 0,
                                              (("stage", "freeze"),): 0}
    assert m["luo_vm_last_blackout_seconds"][(("vm", "g"),)] == pytest.approx(0.0028)  # update 7, the latest
    b = m["luo_vm_blackout_seconds_bucket"]
    assert b[(("le", "0.0025"), ("vm", "g"))] == 0
    assert b[(("le", "0.005"), ("vm", "g"))] == 2  # 3.388 ms and 2.8 ms
    assert b[(("le", "+Inf"), ("vm", "g"))] == 2
    assert m["luo_vm_blackout_seconds_count"][(("vm", "g"),)] == 2
    assert m["luo_vm_blackout_seconds_sum"][(("vm", "g"),)] == pytest.approx(0.006188)
    assert m["luo_last_update_seconds"][()] == pytest.approx(0.3413)
    assert m["luo_last_update_phase_seconds"][(("lane", "vmm-successor:g"), ("phase", "restore"))] == pytest.approx(0.00095)
    assert m["luo_liveupdate_number"][()] == 7
    assert m["luo_preserved_fds"][()] == 3
    assert m["luo_sessions"][()] == 1
    assert m["luo_host_up"][()] == 1
    assert m["luo_update_records_invalid"][()] == 0


def test_without_a_host_the_records_still_count(runtime: Path) -> None:
    m = parse(exposition(families(snapshot(runtime, None, "ECONNREFUSED: no host"))))
    assert m["luo_host_up"][()] == 0 and m["luo_updates_total"][()] == 2
    assert "luo_preserved_fds" not in m and "luo_liveupdate_number" not in m
    assert sum(m["luo_update_failures_total"].values()) == 0


def test_a_bad_record_is_skipped_and_counted(runtime: Path) -> None:
    (runtime / "updates" / "000009.json").write_text('{"liveupdate_number": 9, "timeline": 5}')
    snap = snapshot(runtime, STATUS)
    assert len(snap.invalid) == 1 and "EINVAL" in snap.invalid[0]
    m = parse(exposition(families(snap)))
    assert m["luo_update_records_invalid"][()] == 1 and m["luo_updates_total"][()] == 2


def test_a_failed_record_counts_once_with_the_status_saying_the_same(runtime: Path) -> None:
    (runtime / "updates" / "000008.json").write_text(json.dumps({**STATUS["last_update"], "liveupdate_number": 8}))
    m = parse(exposition(families(snapshot(runtime, STATUS))))
    assert m["luo_update_failures_total"][(("stage", "handover"),)] == 1 and m["luo_updates_total"][()] == 2


def test_the_hand_written_text_is_prometheus_clients(runtime: Path) -> None:
    fams = families(snapshot(runtime, {**STATUS, "liveupdate_number": 123456789}))
    text = hand_exposition(fams)
    assert text == client_exposition(fams)
    assert "luo_liveupdate_number 1.23456789e+08\n" in text  # Go's float format, as prometheus_client's
    parse(text)


def test_label_values_are_escaped() -> None:
    from luo.observe.metrics import Family

    fams = [Family("x", "gauge", 'a "help"\nline \\', ("k",), [(('va"l\\ue\n',), math.pi)])]
    assert hand_exposition(fams) == client_exposition(fams)
    [fam] = text_string_to_metric_families(hand_exposition(fams))
    assert fam.samples[0].labels == {"k": 'va"l\\ue\n'}


def test_luo_metrics_command(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--runtime-dir", str(runtime), "metrics"]) == 0
    out = capsys.readouterr()
    m = parse(out.out)
    assert m["luo_host_up"][()] == 0 and m["luo_updates_total"][()] == 2
    assert out.err.startswith("luo metrics: no host status (")


def test_no_records_no_host(tmp_path: Path) -> None:
    m = parse(exposition(families(snapshot(tmp_path, None))))
    assert m["luo_updates_total"][()] == 0 and "luo_last_update_seconds" not in m


def test_the_pool_of_the_status(runtime: Path) -> None:
    pool = {"size": 1 << 30, "free": 512 << 20, "largest_free_extent": 256 << 20,
            "owners": {"vm:a": {"bytes": 256 << 20, "extents": [[0, 256 << 20, "claimed"]]}},
            "shards": [{"name": "shard0", "mode": "devdax", "offset": 0, "size": 64 << 20, "owner": ""}],
            "memory": {"huge_pages": 512}}
    m = parse(exposition(families(snapshot(runtime, {**STATUS, "pool": pool}))))
    assert m["luo_pool_bytes"][()] == 1 << 30 and m["luo_pool_free_bytes"][()] == 512 << 20
    assert m["luo_pool_largest_free_extent_bytes"][()] == 256 << 20
    assert m["luo_pool_owner_bytes"][(("owner", "vm:a"),)] == 256 << 20
    assert m["luo_pool_shard_bytes"][(("mode", "devdax"), ("owner", ""), ("shard", "shard0"))] == 64 << 20
    assert m["luo_pool_huge_pages"][()] == 512
    assert "luo_pool_bytes" not in parse(exposition(families(snapshot(runtime, STATUS))))  # no pool, no pool metrics
    assert hand_exposition(families(snapshot(runtime, {**STATUS, "pool": pool}))) == \
        client_exposition(families(snapshot(runtime, {**STATUS, "pool": pool})))
