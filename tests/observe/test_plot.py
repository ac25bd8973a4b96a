"""The plot: real .svg and .png files from the synthetic records; without matplotlib, one ENOPKG
line and the table still works."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

from luo.cli import main
from luo.errors import LuoError
from luo.observe.commands import before_update
from luo.observe.plot import plot
from luo.observe.timeline import load

RECORDS = Path(__file__).parent / "records"


def test_matplotlib_is_installed() -> None:
    import matplotlib  # noqa: F401  (scripts/setup.sh installs luo[plot]: the plot is tested, not skipped)


@pytest.mark.parametrize("record", ["000007.json", "000003.json"])
def test_svg_and_png_are_written(record: str, tmp_path: Path) -> None:
    tl = load(RECORDS / record)
    svg = plot(tl, tmp_path / "t.svg")
    png = plot(tl, tmp_path / "t.png")
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    # the title names the update, its total and the blackout; every lane is labelled
    assert f"liveupdate {tl.number}" in text and "blackout g" in text
    for lane in ("host", "vmm:g", "vmm-successor:g"):
        assert lane in text
    if not tl.measured:
        assert "no timeline in this record" in text
    blob = png.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000


def test_timeline_plot_from_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.png"
    assert main(["timeline", "--file", str(RECORDS / "000007.json"), "--plot", str(out)]) == 0
    assert out.stat().st_size > 0
    assert capsys.readouterr().out.rstrip().endswith(f"plot: {out}")


def test_a_plot_name_without_svg_or_png_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["timeline", "--file", str(RECORDS / "000007.json"), "--plot", str(tmp_path / "x.pdf")]) == 1
    assert "EINVAL" in capsys.readouterr().err and not (tmp_path / "x.pdf").exists()


def test_without_matplotlib_plot_says_how_to_install_and_the_table_works(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rec = str(RECORDS / "000007.json")
    assert main(["timeline", "--file", rec, "--plot", str(tmp_path / "x.svg")]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("luo timeline: ENOPKG: plotting needs matplotlib: pip install 'luo[plot]'")
    assert main(["timeline", "--file", rec]) == 0
    assert "vm g: blackout 2.800 ms" in capsys.readouterr().out
    with pytest.raises(LuoError) as e:  # luo update --plot refuses before updating
        before_update(str(tmp_path / "u.svg"))
    assert e.value.errno == errno.ENOPKG


def test_update_plot_refuses_before_updating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No host listens here: a bad --plot must be refused before the update is even asked for."""
    assert main(["--runtime-dir", str(tmp_path), "update", "--plot", str(tmp_path / "u.jpg")]) == 1
    assert capsys.readouterr().err.startswith("luo update: EINVAL: --plot")
    before_update(None)  # no plot asked: nothing to check


def test_an_empty_record_draws_and_a_huge_one_is_refused(tmp_path: Path) -> None:
    from luo.observe.timeline import from_record

    assert plot(from_record({"liveupdate_number": 1}), tmp_path / "e.svg").stat().st_size > 0
    huge = {"liveupdate_number": 1, "timeline": [{"lane": f"l{i}", "pid": 1, "phase": "p", "start_ns": i, "end_ns": i}
                                                 for i in range(100)]}
    with pytest.raises(LuoError) as e:
        plot(from_record(huge), tmp_path / "h.svg")
    assert e.value.errno == errno.EINVAL and "too many to draw" in e.value.message
    assert not (tmp_path / "h.svg").exists()
