"""to_dts prints what dtc decodes, and dtc compiles our dts back to the same handover."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from luo.core.handover import LuoRecord, MemoryRange
from luo.errors import LuoError
from luo.kho import build_tree, parse_tree, to_dts

DTC = shutil.which("dtc")
pytestmark = pytest.mark.skipif(DTC is None, reason="dtc is not installed (scripts/setup.sh installs it)")


def _names(dts: str) -> list[str]:
    """Every node path and node-path:property name in a dts text, in order."""
    out: list[str] = []
    stack: list[str] = []
    for line in dts.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line).strip()
        if not line or line.startswith("/dts-v1/") or line.startswith("/memreserve/"):
            continue
        if line.endswith("{"):
            name = line[:-1].strip()
            stack.append("" if name == "/" else name)
            out.append("/".join(stack) or "/")
        elif line == "};":
            stack.pop()
        else:
            prop = re.split(r"[ =;]", line, maxsplit=1)[0]
            out.append(("/".join(stack) or "/") + ":" + prop)
    return out


def _dtc(args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    assert DTC is not None
    return subprocess.run([DTC, "-q", *args, "-"], input=data, capture_output=True, check=True, timeout=30)


def test_dtc_and_to_dts_agree_on_names(blob: bytes) -> None:
    ours = to_dts(blob)
    theirs = _dtc(["-I", "dtb", "-O", "dts"], blob).stdout.decode()
    assert sorted(_names(ours)) == sorted(_names(theirs))
    assert "LUO/luo-session" in "\n".join(_names(ours))


def test_dts_compiles_back_to_the_same_handover(
    blob: bytes, sample: tuple[LuoRecord, list[MemoryRange]]
) -> None:
    dts = to_dts(blob)
    back = _dtc(["-I", "dts", "-O", "dtb"], dts.encode()).stdout
    assert parse_tree(back) == sample


def test_dts_syntax(blob: bytes) -> None:
    dts = to_dts(blob)
    assert dts.startswith("/dts-v1/;\n")
    assert '\tcompatible = "kho-v1";' in dts
    assert "liveupdate-number = [07 00 00 00 00 00 00 00]; /* u64 0x7 = 7 */" in dts
    assert 'meta,owner-comm = "qemu \\"x\\"";' in dts
    assert 'session-name = "vm 1/\\xc3\\xa9";' in dts


def test_empty_tree_prints() -> None:
    dts = to_dts(build_tree(LuoRecord(0)))
    assert "luo-session {" in dts


def test_not_a_tree() -> None:
    with pytest.raises(LuoError):
        to_dts(b"nope")
