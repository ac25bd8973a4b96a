"""``docs/protocols.md``, printed from the tables themselves so that the document cannot drift:
``python -m luo.protocol.render > docs/protocols.md`` (tests/protocol/test_render.py checks it)."""

from __future__ import annotations

import importlib
import sys

from luo.protocol.table import Table

CHANNELS = ("client_host", "host_successor", "host_vmm", "vmm_successor")


def tables(module: str) -> list[Table]:
    mod = importlib.import_module(f"luo.protocol.{module}")
    return [v for v in vars(mod).values() if isinstance(v, Table)]


def render() -> str:
    out = ["# The update's channels, as tables", "",
           "Printed from `luo.protocol` by `python -m luo.protocol.render`; each module's docstring says why",
           "each row exists (docs/design.md: *The channels, as tables*). A (state, event) pair that is not",
           "listed is a protocol error (EPROTO) and changes nothing.", ""]
    for module in CHANNELS:
        for t in tables(module):
            out += [f"## {t.channel}: the {t.role}'s end (`luo.protocol.{module}`)", "",
                    f"Initial state `{t.initial}`" + (f"; final: {', '.join(f'`{s}`' for s in sorted(t.final))}"
                                                     if t.final else "; no final state") + ".", "",
                    "| state | event | action | next |", "|---|---|---|---|"]
            out += [f"| {s} | {e} | {r.action or '—'} | {r.next} |" for (s, e), r in t.rows.items()]
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
