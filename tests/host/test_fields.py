"""The control socket's input checks: JSON depth and numbers (luo.host.wire), typed fields (luo.host.fields)."""

from __future__ import annotations

import array
import errno
import json
import os
import re
import socket
import time

import pytest

from luo.errors import LuoError
from luo.host import fields
from luo.host.wire import MAX_DEPTH, MAX_ERROR, MAX_MSG, check_depth, error_reply, parse, recv_msg, send_msg


def refused(call, *args, **kw) -> LuoError:  # noqa: ANN001
    with pytest.raises(LuoError) as e:
        call(*args, **kw)
    return e.value


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# -- wire: depth ----------------------------------------------------------------------------


def test_depth_limit_is_exact() -> None:
    check_depth(nested(MAX_DEPTH))
    assert refused(check_depth, nested(MAX_DEPTH + 1)).errno == errno.EINVAL
    assert parse(b'{"x":' + nested(MAX_DEPTH - 1) + b"}") == {"x": json.loads(nested(MAX_DEPTH - 1))}
    assert "deeper than 32" in refused(parse, b'{"x":' + nested(MAX_DEPTH) + b"}").message


def test_many_brackets_side_by_side_are_not_deep() -> None:
    check_depth(b"[" + b"[1]," * 10_000 + b"[]]")
    check_depth(b'{"a":[' + b'{"b":{}},' * 1000 + b"0]}")


def test_brackets_inside_strings_do_not_count() -> None:
    check_depth(b'{"x":"' + b"[{" * 5000 + b'"}')
    check_depth(b'{"x":"\\"' + b"[" * 5000 + b'\\\\"}')  # escaped quote inside, escaped backslash at the end
    # an escaped backslash then a real quote: the brackets after it are outside the string
    assert refused(check_depth, b'["\\\\"' + b"," + nested(40) + b"]").errno == errno.EINVAL


def test_unterminated_string_does_not_hide_or_crash() -> None:
    check_depth(b'{"x":"' + b"[" * 5000)  # json.loads refuses it; no recursion happens inside a string
    assert refused(parse, b'{"x":"' + b"[" * 5000).errno == errno.EINVAL
    assert refused(parse, b'"' + b'\\"' * 100_000).errno == errno.EINVAL


@pytest.mark.parametrize("data", [
    b"[" * 200_000,  # the message that used to end luod with RecursionError
    b'{"a":' * 40_000,
    b"[" * 33 + b"]" * 33,
    b'{"op":"get_state","x":' + b"[" * 2000,
])
def test_deep_messages_are_refused_quickly(data: bytes) -> None:
    t = time.perf_counter()
    e = refused(parse, data)
    assert e.errno == errno.EINVAL and "nested deeper" in e.message
    assert time.perf_counter() - t < 1.0


def test_worst_case_scan_is_linear() -> None:
    """4 MB of flat brackets: no early exit possible, still well under a second."""
    data = b"[" + b"[]," * (MAX_MSG // 3 - 2) + b"[]]"
    t = time.perf_counter()
    check_depth(data)
    assert time.perf_counter() - t < 2.0


# -- wire: numbers, encoding, shape ---------------------------------------------------------


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
def test_non_finite_numbers_are_refused(number: bytes) -> None:
    e = refused(parse, b'{"op":"update","handover_timeout":' + number + b"}")
    assert e.errno == errno.EINVAL and ("finite" in e.message or "JSON allows" in e.message)


def test_finite_numbers_pass() -> None:
    assert parse(b'{"a":1e308,"b":1e-999,"c":-0.0,"d":5}') == {"a": 1e308, "b": 0.0, "c": -0.0, "d": 5}


@pytest.mark.parametrize("data", [
    b"", b" ", b"\xff", b"\xef\xbb\xbf{}", '{"a":1}'.encode("utf-16"), b'{"a":' + b"9" * 5000 + b"}",
    b"[]", b"null", b'"x"', b"{} {}", b"\x00",
])
def test_malformed_is_einval(data: bytes) -> None:
    assert refused(parse, data).errno == errno.EINVAL


def test_error_reply_is_bounded() -> None:
    reply = error_reply(LuoError(errno.EINVAL, "x" * 100_000))
    assert reply["errno"] == errno.EINVAL and len(reply["error"]) <= MAX_ERROR + 3


# -- wire: recv_msg closes the fds of a refused message -------------------------------------


def own_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("data", [b"[" * 200_000, b'{"x":NaN}', b"[1]", b"\xff", b""])
def test_recv_msg_closes_fds_on_refusal(data: bytes) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]).tobytes())])
        before = own_fds()
        e = refused(recv_msg, b)
        assert e.errno == errno.EINVAL
        assert own_fds() == before  # the two received fds are gone again
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_recv_msg_truncated_is_emsgsize() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_MSG)
        try:
            a.send(b"{" + b" " * MAX_MSG + b"}")
        except OSError as e:
            pytest.skip(f"cannot send a datagram over {MAX_MSG} bytes here: {e}")
        assert refused(recv_msg, b).errno == errno.EMSGSIZE
    finally:
        a.close()
        b.close()


def test_round_trip_and_eof() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    send_msg(a, {"op": "get_state", "n": [1, {"x": "[[["}]})
    assert recv_msg(b) == ({"op": "get_state", "n": [1, {"x": "[[["}]}, [])
    a.close()
    assert recv_msg(b) is None
    b.close()


# -- fields ---------------------------------------------------------------------------------


def test_u64() -> None:
    assert fields.u64({"t": 0}, "t") == 0
    assert fields.u64({"t": 2**64 - 1}, "t") == 2**64 - 1
    assert fields.u64({}, "t", None) is None
    assert fields.u64({"t": None}, "t", 7) == 7
    for bad in (True, False, -1, 2**64, 1.0, "1", [], {}, 10**4000):
        e = refused(fields.u64, {"t": bad}, "t")
        assert e.errno == errno.EINVAL and e.message.startswith("t: ")
    assert refused(fields.u64, {}, "t").message == "t: required"


def test_integer() -> None:
    assert fields.integer({"n": 64}, "n", 1, 64) == 64
    assert fields.integer({}, "n", 1, 64, 2) == 2
    for bad in (0, 65, True, 2.0, "2"):
        assert refused(fields.integer, {"n": bad}, "n", 1, 64).errno == errno.EINVAL


def test_finite() -> None:
    assert fields.finite({"t": 3600}, "t", 0, 3600) == 3600.0
    assert fields.finite({"t": 0.001}, "t", 0, 3600) == 0.001
    assert fields.finite({}, "t", 0, 3600, 10.0) == 10.0
    for bad in (float("nan"), float("inf"), -float("inf"), 0, 0.0, -1, 3600.5, True, "5", [], 10**4000):
        e = refused(fields.finite, {"t": bad}, "t", 0, 3600)
        assert e.errno == errno.EINVAL and e.message.startswith("t: "), e


def test_boolean() -> None:
    assert fields.boolean({"b": False}, "b") is False
    assert fields.boolean({}, "b", True) is True
    for bad in (0, 1, "true", None):
        assert refused(fields.boolean, {"b": bad}, "b").errno == errno.EINVAL


def test_text() -> None:
    assert fields.text({"s": "é" * 31}, "s", 63) == "é" * 31
    assert fields.text({}, "s", 10, None) is None
    for bad in (5, True, [], {}, "x" * 64, "é" * 32, "a\x00b", "\ud800"):
        e = refused(fields.text, {"s": bad}, "s", 63)
        assert e.errno == errno.EINVAL and e.message.startswith("s: "), e
    name = re.compile(r"[a-z]+")
    assert fields.text({"s": "abc"}, "s", 10, pattern=name) == "abc"
    e = refused(fields.text, {"s": "ab\n"}, "s", 10, pattern=name, rule="lower-case letters")
    assert "lower-case letters" in e.message


def test_text_error_does_not_echo_a_huge_value() -> None:
    e = refused(fields.text, {"s": "x" * 1_000_000}, "s", 63)
    assert len(e.message) < 200
    e = refused(fields.u64, {"t": "y" * 1_000_000}, "t")
    assert len(e.message) < 200
    e = refused(fields.u64, {"t": 10**4000}, "t")
    assert "bits" in e.message and len(e.message) < 200


def test_choice_str_list_mapping() -> None:
    assert fields.choice({}, "w", ("a", "b"), "a") == "a"
    assert refused(fields.choice, {"w": "c"}, "w", ("a", "b")).errno == errno.EINVAL
    assert refused(fields.choice, {"w": ["a"]}, "w", ("a", "b")).errno == errno.EINVAL
    assert fields.str_list({"l": ["a", "b"]}, "l", 4, 8) == ["a", "b"]
    assert fields.str_list({}, "l", 4, 8, []) == []
    for bad in ("ab", [1], ["a"] * 5, ["x" * 9], {}):
        assert refused(fields.str_list, {"l": bad}, "l", 4, 8).errno == errno.EINVAL
    assert refused(fields.str_list, {"l": ["a", 1]}, "l", 4, 8).message.startswith("l[1]: ")
    assert fields.mapping({"m": {"a": 1}}, "m", 100) == {"a": 1}
    assert fields.mapping({}, "m", 100, None) is None
    for bad in ([], "x", 1, {"a": "x" * 100}):
        assert refused(fields.mapping, {"m": bad}, "m", 100).errno == errno.EINVAL


def test_size() -> None:
    lo, hi = 1 << 20, 1 << 40
    assert fields.size({"m": "256M"}, "m", lo, hi) == 256 << 20
    assert fields.size({"m": "1.5GiB"}, "m", lo, hi) == 3 << 29
    assert fields.size({"m": 64 << 20}, "m", lo, hi) == 64 << 20
    assert fields.size({}, "m", lo, hi, 7) == 7
    for bad in ("lots", "1.5", "", "2T", 0, -1, True, 1.5, [], "5X", "1" * 30):
        e = refused(fields.size, {"m": bad}, "m", lo, hi)
        assert e.errno == errno.EINVAL and e.message.startswith("m: "), (bad, e)


def test_fds() -> None:
    fields.no_fds([], "get_state")
    e = refused(fields.no_fds, [3], "get_state")
    assert e.errno == errno.EINVAL and e.message.startswith("fds: ")
    assert fields.fds_exactly([5], 1, "preserve_fd") == [5]
    assert refused(fields.fds_exactly, [], 1, "preserve_fd").errno == errno.EBADF
    assert refused(fields.fds_exactly, [5, 6], 1, "preserve_fd").errno == errno.EBADF
