"""docs/protocols.md is what the tables say."""

from __future__ import annotations

from pathlib import Path

from luo.protocol.render import CHANNELS, render, tables

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocols.md"


def test_every_channel_between_two_luo_processes_has_both_ends() -> None:
    """(client↔host has the host's end only: a client asks and reads the answer, nothing more.)"""
    for module in CHANNELS:
        assert len(tables(module)) == (1 if module == "client_host" else 2), module


def test_the_document_is_the_tables() -> None:
    assert DOC.read_text() == render(), "regenerate: python -m luo.protocol.render > docs/protocols.md"
