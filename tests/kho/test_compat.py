"""The successor's question before the pause: do I know every format this tree uses?"""

from __future__ import annotations

import errno
from collections.abc import Callable

import libfdt
import pytest

from luo import abi
from luo.core.handover import FileRecord, LuoRecord, MemoryRange
from luo.errors import LuoError
from luo.kho import TREE_COMPATIBLES, build_tree, check_compatibles, required_compatibles

Mutate = Callable[[bytes, Callable[[libfdt.Fdt], None]], bytes]


def test_required_compatibles(blob: bytes, sample: tuple[LuoRecord, list[MemoryRange]]) -> None:
    luo, _ = sample
    # a tree without a pool names every tree compatible but the pool map's (luo.abi)
    assert required_compatibles(blob) == set(TREE_COMPATIBLES) - {abi.POOL_MAP_COMPATIBLE} | luo.compatibles()
    assert luo.compatibles() == {"memfd-v1", "socket-listen-v1"}


def test_tree_compatible_constants() -> None:
    assert {
        abi.KHO_COMPATIBLE,
        abi.LUO_COMPATIBLE,
        abi.LUO_SESSION_COMPATIBLE,
        abi.SUBSYSTEMS_COMPATIBLE,
        abi.FILE_DESCRIPTORS_COMPATIBLE,
    } == {"kho-v1", "luo-v1", "luo-session-v2", "subsystems-v1", "file-descriptors-v1"}


def test_known_handlers_pass(blob: bytes) -> None:
    check_compatibles(blob, ["memfd-v1", "socket-listen-v1", "other-v1"])


def test_unknown_handler_refused_with_eproto() -> None:
    blob = build_tree(LuoRecord(1, files=(FileRecord(1, "memfd-v2", 0, 0),)))
    with pytest.raises(LuoError) as ei:
        check_compatibles(blob, ["memfd-v1"])
    assert ei.value.errno == errno.EPROTO
    assert "memfd-v2" in ei.value.message


def test_newer_luo_format_is_named(blob: bytes, mutate: Mutate) -> None:
    # required_compatibles reads trees that parse_tree refuses, so it can say what is missing.
    newer = mutate(blob, lambda f: f.setprop_str(f.path_offset("/LUO"), "compatible", "luo-v2"))
    assert "luo-v2" in required_compatibles(newer)
    with pytest.raises(LuoError) as ei:
        check_compatibles(newer, ["memfd-v1", "socket-listen-v1"])
    assert ei.value.errno == errno.EPROTO
    assert "luo-v2" in ei.value.message


def test_not_a_tree_is_einval() -> None:
    with pytest.raises(LuoError) as ei:
        required_compatibles(b"\0" * 64)
    assert ei.value.errno == errno.EINVAL
