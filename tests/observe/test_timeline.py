"""Reading update records: the timeline laid out, the older records shown end to end, hostile
records refused with one EINVAL line (never a traceback)."""

from __future__ import annotations

import copy
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from luo.cli import main
from luo.errors import LuoError
from luo.observe import records
from luo.observe.table import format_table
from luo.observe.timeline import NO_TIMELINE, from_record, load, parse_record

RECORDS = Path(__file__).parent / "records"
MEASURED = RECORDS / "000007.json"
END_TO_END = RECORDS / "000003.json"


def test_lanes_and_phases_from_the_timeline() -> None:
    tl = load(MEASURED)
    assert tl.measured and tl.note is None and tl.number == 7
    lanes = tl.lanes()
    assert [ln.name for ln in lanes] == ["host", "successor-host", "vmm:g", "vmm-successor:g"]
    assert [p.name for p in lanes[0].phases] == ["start", "prepare", "check", "freeze", "tree", "handover", "release"]
    assert lanes[3].pids == (201,) and [p.name for p in lanes[3].phases] == ["warm", "restore", "wait_go", "resume"]
    assert tl.total_ms == pytest.approx(341.3)
    g = tl.vms["g"]
    assert (tl.ms(g.start_ns), tl.ms(g.end_ns)) == (pytest.approx(338.5), pytest.approx(341.3))
    assert g.blackout_ms == 2.8 and g.parts_ms["restore"] == 0.95


def test_the_table_shows_every_lane_phase_and_blackout() -> None:
    text = format_table(load(MEASURED))
    lines = text.splitlines()
    assert lines[0] == "liveupdate 7: 341.300 ms from the first event to the last"
    assert NO_TIMELINE not in text
    row = next(ln for ln in lines if ln.startswith("vmm-successor:g"))
    assert row.split() == ["vmm-successor:g", "201", "warm", "162.000", "328.000", "166.000"]
    assert any(ln.split() == ["wait_go", "340.300", "340.350", "0.050"] for ln in lines)  # any phase name shows
    assert lines[-1].startswith("vm g: blackout 2.800 ms, 338.500-341.300 ms (pause 0.200, save 0.600")


def test_a_record_without_timeline_is_laid_end_to_end_and_says_so() -> None:
    tl = load(END_TO_END)
    assert not tl.measured and tl.note is not None and tl.note.startswith(NO_TIMELINE)
    host = tl.lanes()[0]
    assert host.name == "host" and tl.ms(host.phases[0].start_ns) == 0
    for a, b in zip(host.phases, host.phases[1:], strict=False):
        assert a.end_ns == b.start_ns  # back to back
    freeze = next(p for p in host.phases if p.name == "freeze")
    g = tl.vms["g"]
    assert g.start_ns == freeze.start_ns and (g.end_ns - g.start_ns) / 1e6 == pytest.approx(3.388)
    assert [p.name for p in tl.phases if p.lane == "vmm-successor:g"] == ["restore", "resume"]
    text = format_table(tl)
    assert text.splitlines()[1].startswith(NO_TIMELINE)
    assert "vm g: blackout 3.388 ms" in text


def test_a_record_of_an_update_without_vms() -> None:
    tl = from_record({"liveupdate_number": 2, "phases_ms": {"start": 100, "prepare": 1.5}})
    assert tl.total_ms == pytest.approx(101.5) and not tl.vms
    assert tl.note == NO_TIMELINE


def test_timeline_json_and_latest_record(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert records.find_record(runtime) == runtime / "updates" / "000007.json"
    assert main(["--runtime-dir", str(runtime), "timeline", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["liveupdate_number"] == 7 and doc["measured"] and doc["total_ms"] == 341.3
    assert [ln["lane"] for ln in doc["lanes"]] == ["host", "successor-host", "vmm:g", "vmm-successor:g"]
    assert doc["vms"]["g"] == {"blackout_ms": 2.8, "parts_ms": doc["vms"]["g"]["parts_ms"], "start_ms": 338.5,
                               "end_ms": 341.3}
    assert main(["--runtime-dir", str(runtime), "timeline", "3"]) == 0
    assert NO_TIMELINE in capsys.readouterr().out


def test_the_host_part_stands_in_when_no_full_record_was_written(tmp_path: Path) -> None:
    (tmp_path / "updates").mkdir()
    (tmp_path / "updates" / "000004-host.json").write_text(json.dumps({"liveupdate_number": 4, "phases_ms": {}}))
    assert records.find_record(tmp_path) == tmp_path / "updates" / "000004-host.json"
    (tmp_path / "updates" / "000004.json").write_text(json.dumps({"liveupdate_number": 4}))
    assert records.find_record(tmp_path, 4) == tmp_path / "updates" / "000004.json"  # the full one wins


def test_missing_records_say_what_exists(runtime: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(LuoError) as e:
        records.find_record(runtime, 5)
    assert e.value.errno == errno.ENOENT and "records: 3, 7" in e.value.message
    assert main(["--runtime-dir", str(tmp_path / "nothing"), "timeline"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("luo timeline: ENOENT: no update record in") and err.count("\n") == 1


def test_waiting_for_a_record_has_a_deadline(tmp_path: Path) -> None:
    (tmp_path / "updates").mkdir()
    with pytest.raises(LuoError) as e:
        records.wait_for_record(tmp_path, 9, with_vms=True, timeout=0.05)
    assert e.value.errno == errno.ETIMEDOUT and "000009.json" in e.value.message
    (tmp_path / "updates" / "000009-host.json").write_text("{}")
    assert records.wait_for_record(tmp_path, 9, with_vms=False, timeout=0.05).name == "000009-host.json"


def _measured() -> dict[str, Any]:
    return json.loads(MEASURED.read_text())


def _hostile() -> list[tuple[str, Any]]:
    """(what, record) pairs that must each be refused with EINVAL."""
    cases: list[tuple[str, Any]] = [("not an object", [1, 2]), ("a string", "x"), ("no number", {})]

    def edit(what: str, fn: Any) -> None:
        rec = copy.deepcopy(_measured())
        fn(rec)
        cases.append((what, rec))

    edit("number a string", lambda r: r.update(liveupdate_number="7"))
    edit("number a bool", lambda r: r.update(liveupdate_number=True))
    edit("negative number", lambda r: r.update(liveupdate_number=-1))
    edit("timeline an object", lambda r: r.update(timeline={"lane": "host"}))
    edit("event not an object", lambda r: r["timeline"].append("host"))
    edit("event without lane", lambda r: r["timeline"][0].pop("lane"))
    edit("event without end", lambda r: r["timeline"][0].pop("end_ns"))
    edit("end before start", lambda r: r["timeline"][0].update(end_ns=r["timeline"][0]["start_ns"] - 1))
    edit("start a float", lambda r: r["timeline"][0].update(start_ns=1.5))
    edit("start a string", lambda r: r["timeline"][0].update(start_ns="1"))
    edit("start negative", lambda r: r["timeline"][0].update(start_ns=-5))
    edit("start beyond 64 bits", lambda r: r["timeline"][0].update(start_ns=1 << 64))
    edit("pid a string", lambda r: r["timeline"][0].update(pid="123"))
    edit("lane empty", lambda r: r["timeline"][0].update(lane=""))
    edit("lane with a terminal escape", lambda r: r["timeline"][0].update(lane="\x1b[2Jhost"))
    edit("phase a number", lambda r: r["timeline"][0].update(phase=3))
    edit("phase too long", lambda r: r["timeline"][0].update(phase="p" * 65))
    edit("vms a list", lambda r: r.update(vms=["g"]))
    edit("vm name a path", lambda r: r["vms"].update({"../x": r["vms"]["g"]}))
    edit("vm without blackout", lambda r: r["vms"]["g"].pop("blackout_ms"))
    edit("blackout negative", lambda r: r["vms"]["g"].update(blackout_ms=-1))
    edit("blackout a string", lambda r: r["vms"]["g"].update(blackout_ms="2.8"))
    edit("blackout_ns one value", lambda r: r["vms"]["g"].update(blackout_ns=[1]))
    edit("blackout_ns reversed", lambda r: r["vms"]["g"].update(blackout_ns=[5, 4]))
    edit("parts_ms a list", lambda r: r["vms"]["g"].update(parts_ms=[0.2]))
    edit("phases_ms value a string", lambda r: r["phases_ms"].update(start="160"))
    edit("total_ms huge", lambda r: r.update(total_ms=1e300))
    edit("failed not a string", lambda r: r.update(failed=1))
    return cases


@pytest.mark.parametrize(("what", "rec"), _hostile(), ids=[w for w, _ in _hostile()])
def test_hostile_records_are_refused_with_einval(what: str, rec: Any, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(LuoError) as e:
        from_record(rec) if isinstance(rec, dict) else parse_record(json.dumps(rec))
    assert e.value.errno == errno.EINVAL, what
    f = tmp_path / "000001.json"
    f.write_text(json.dumps(rec))
    assert main(["timeline", "--file", str(f)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"luo timeline: EINVAL: {f}: ") and out.err.count("\n") == 1


@pytest.mark.parametrize("blob", [b"", b"{", b"\xff\xfe", b'{"liveupdate_number": NaN}',
                                  b'{"liveupdate_number": 1, "total_ms": Infinity}', b"[" * 100_000,
                                  b'{"liveupdate_number": 1' + b"9" * 5000 + b"}"],
                         ids=["empty", "truncated", "not utf-8", "NaN", "Infinity", "deep", "huge int"])
def test_undecodable_records_are_refused_with_einval(blob: bytes) -> None:
    with pytest.raises(LuoError) as e:
        parse_record(blob)
    assert e.value.errno == errno.EINVAL


def test_a_fifo_or_a_giant_file_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "000001.json"
    os.mkfifo(fifo)
    with pytest.raises(LuoError) as e:
        load(fifo)
    assert e.value.errno == errno.EINVAL and "not a regular file" in e.value.message
    big = tmp_path / "000002.json"
    with open(big, "wb") as f:
        f.truncate(17 << 20)
    with pytest.raises(LuoError) as e:
        load(big)
    assert e.value.errno == errno.EINVAL and "larger than" in e.value.message
