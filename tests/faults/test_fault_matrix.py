"""The fault matrix (docs/reliability.md): every participant x event x fault, each with a real
host, a real guest and real preserved memfds. luo.testing.matrix checks the rules in every cell."""

from __future__ import annotations

from pathlib import Path

import pytest

from luo.testing.matrix import CELLS, run_cell


@pytest.mark.parametrize(("participant", "event", "kind"), CELLS, ids=[":".join(c) for c in CELLS])
def test_fault_cell(short_dir: Path, participant: str, event: str, kind: str) -> None:
    out = run_cell(short_dir / "rt", participant, event, kind)
    print(f"{participant}:{event}:{kind} -> {out.row()} {out.notes}")
