"""parse_tree refuses anything malformed or unknown with LuoError(EINVAL), naming the culprit."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import libfdt
import pytest

from luo.errors import LuoError
from luo.kho import parse_tree
from luo.kho.encoding import node_name_for

Mutate = Callable[[bytes, Callable[[libfdt.Fdt], None]], bytes]
SESSION = "/LUO/luo-session/" + node_name_for("vm 1/é")


def refused(blob: bytes, words: str, fd_count: int | None = None) -> None:
    with pytest.raises(LuoError) as ei:
        parse_tree(blob, fd_count)
    assert ei.value.errno == errno.EINVAL
    assert words in ei.value.message, ei.value.message


def test_not_a_dtb() -> None:
    refused(b"", "shorter than a DTB header")
    refused(b"hello world, this is not a device tree at all", "bad magic")
    refused(bytearray(100), "bad magic")


def test_wrong_type() -> None:
    with pytest.raises(LuoError):
        parse_tree("a string", None)  # type: ignore[arg-type]


def test_truncated(blob: bytes) -> None:
    refused(blob[: len(blob) // 2], "truncated")
    refused(blob[:39], "shorter than a DTB header")


def test_header_lies(blob: bytes) -> None:
    bad = bytearray(blob)
    struct.pack_into(">I", bad, 8, len(blob) + 64)  # off_dt_struct past the end
    refused(bytes(bad), "not a valid DTB")


def _set_str(path: str, prop: str, value: str) -> Callable[[libfdt.Fdt], None]:
    return lambda f: f.setprop_str(f.path_offset(path), prop, value)


def _set_raw(path: str, prop: str, value: bytes) -> Callable[[libfdt.Fdt], None]:
    return lambda f: f.setprop(f.path_offset(path), prop, value)


def _del_prop(path: str, prop: str) -> Callable[[libfdt.Fdt], None]:
    return lambda f: f.delprop(f.path_offset(path), prop)


def _del_node(path: str) -> Callable[[libfdt.Fdt], None]:
    return lambda f: f.del_node(f.path_offset(path))


def _add_node(path: str, name: str) -> Callable[[libfdt.Fdt], None]:
    return lambda f: f.add_subnode(f.path_offset(path), name)


CASES: list[tuple[str, Callable[[libfdt.Fdt], None], str]] = [
    ("root compatible", _set_str("/", "compatible", "kho-v2"), "node / is compatible 'kho-v2'"),
    ("root compatible missing", _del_prop("/", "compatible"), "node / has no 'compatible'"),
    ("no LUO", _del_node("/LUO"), "node / has no 'LUO' child"),
    ("no memory map", _del_node("/preserved-memory-map"), "no 'preserved-memory-map' child"),
    ("luo-v2", _set_str("/LUO", "compatible", "luo-v2"), "node /LUO is compatible 'luo-v2'"),
    ("sessions v1", _set_str("/LUO/luo-session", "compatible", "luo-session-v1"), "luo-session-v1"),
    ("subsystems compat", _set_str("/LUO/subsystems", "compatible", "x"), "/LUO/subsystems is compatible"),
    ("fds compat", _set_raw("/LUO/file-descriptors", "compatible", b"\xff\0"), "not valid UTF-8"),
    ("memory map compat", _set_str("/preserved-memory-map", "compatible", "kho-v1"), "preserved-memory-map"),
    ("no number", _del_prop("/LUO", "liveupdate-number"), "/LUO has no 'liveupdate-number'"),
    ("short number", _set_raw("/LUO", "liveupdate-number", b"\1\0\0\0"), "/LUO:liveupdate-number is 4 bytes"),
    ("short subsystem", _set_raw("/LUO/subsystems", "kvm", b"\1"), "/LUO/subsystems:kvm is 1 bytes"),
    ("long fd-index", _set_raw("/LUO/file-descriptors/0", "fd-index", bytes(8)), "fd-index is 8 bytes"),
    ("no data", _del_prop("/LUO/file-descriptors/0", "data"), "/LUO/file-descriptors/0 has no 'data'"),
    ("no token", _del_prop(SESSION + "/3", "token"), "has no 'token'"),
    ("token vs name", _set_raw(SESSION + "/3", "token", struct.pack("<Q", 4)), "holds token 4"),
    ("compat not a string", _set_raw(SESSION + "/3", "compatible", b"ab"), "NUL-terminated"),
    ("compat two strings", _set_raw(SESSION + "/3", "compatible", b"a\0b\0"), "single NUL-terminated"),
    ("empty compat", _set_raw(SESSION + "/3", "compatible", b"\0"), "compatible is empty"),
    ("meta not a string", _set_raw(SESSION + "/3", "meta,x", b"\1\2"), "meta,x is not"),
    ("unknown file prop", _set_str(SESSION + "/3", "colour", "red"), "unknown property 'colour'"),
    ("unknown LUO child", _add_node("/LUO", "extra"), "unknown child 'extra'"),
    ("unknown LUO prop", _set_str("/LUO", "extra", "x"), "unknown property 'extra'"),
    ("child under file", _add_node(SESSION + "/3", "sub"), "must have no children"),
    ("session name vs node", _set_str(SESSION, "session-name", "other"), "holds name 'other'"),
    ("session name missing", _del_prop(SESSION, "session-name"), "has no 'session-name'"),
    ("mem name vs index", _set_raw("/preserved-memory-map/mem@2", "fd-index", struct.pack("<I", 9)), "mem@9"),
    ("mem size short", _set_raw("/preserved-memory-map/mem@0", "size", bytes(4)), "mem@0:size is 4 bytes"),
    ("mem no label", _del_prop("/preserved-memory-map/mem@0", "label"), "has no 'label'"),
    (
        "mem fd clash",
        _set_raw("/LUO/file-descriptors/0", "fd-index", struct.pack("<I", 1)),
        "fd-index 1 is already",
    ),
]


@pytest.mark.parametrize(("what", "change", "words"), CASES, ids=[c[0] for c in CASES])
def test_malformed_tree_refused(
    blob: bytes, mutate: Mutate, what: str, change: Callable[[libfdt.Fdt], None], words: str
) -> None:
    refused(mutate(blob, change), words)


def test_session_name_over_63_bytes_refused(blob: bytes, mutate: Mutate) -> None:
    long = "x" * 64

    def change(f: libfdt.Fdt) -> None:
        off = f.add_subnode(f.path_offset("/LUO/luo-session"), node_name_for(long))
        f.setprop_str(off, "session-name", long)

    refused(mutate(blob, change), "64 bytes long")


def test_duplicate_token_refused() -> None:
    # libfdt's read-write API refuses duplicate names, so write this tree sequentially by hand.
    sw = libfdt.FdtSw()
    sw.finish_reservemap()

    def file(tok: int, idx: int) -> None:
        with sw.add_node(str(tok)):
            sw.property("compatible", b"memfd-v1\0")
            sw.property("data", bytes(8))
            sw.property("fd-index", struct.pack("<I", idx))
            sw.property("token", struct.pack("<Q", tok))

    with sw.add_node(""):
        sw.property("compatible", b"kho-v1\0")
        with sw.add_node("preserved-memory-map"):
            sw.property("compatible", b"kho-memory-map-v1\0")
        with sw.add_node("LUO"):
            sw.property("compatible", b"luo-v1\0")
            sw.property("liveupdate-number", bytes(8))
            with sw.add_node("subsystems"):
                sw.property("compatible", b"subsystems-v1\0")
            with sw.add_node("file-descriptors"):
                sw.property("compatible", b"file-descriptors-v1\0")
                file(5, 0)
                file(5, 1)
            with sw.add_node("luo-session"):
                sw.property("compatible", b"luo-session-v2\0")
    fdt = sw.as_fdt()
    fdt.pack()
    refused(bytes(fdt.as_bytearray()), "two children named '5'")


def test_fd_index_out_of_range(blob: bytes) -> None:
    refused(blob, "out of range", fd_count=0)


def test_other_root_subtrees_are_ignored(blob: bytes, mutate: Mutate) -> None:
    # A KHO root carries other owners' subtrees; they are not ours to judge.
    changed = mutate(blob, _add_node("/", "other-subsystem"))
    assert parse_tree(changed) == parse_tree(blob)
