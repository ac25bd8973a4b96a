"""The ioctl batch runner (luo.vmm.kvm.batch), C and fcntl fallback alike, on a pipe's FIONREAD."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest

from luo.errors import LuoError
from luo.vmm.kvm import batch as kbatch
from luo.vmm.kvm.batch import IoctlBatch

FIONREAD = 0x541B  # writes the bytes waiting in a pipe as an int


@pytest.fixture(params=[True, False], ids=["c", "py"])
def use_cext(request: pytest.FixtureRequest) -> bool:
    if request.param and kbatch._LIB is None:
        pytest.skip("the C batch runner is not built (scripts/setup.sh)")
    return bool(request.param)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_ops_write_their_own_slots(pipe: tuple[int, int], use_cext: bool) -> None:
    r, w = pipe
    os.write(w, b"12345")
    b = IoctlBatch(16, use_cext)
    assert b.cext == use_cext
    b.add(r, FIONREAD, 0, 4, "FIONREAD a")
    b.add(r, FIONREAD, 8, 4, "FIONREAD b", expect=0)
    b.seal()
    assert b.run() is None
    assert struct.unpack_from("<iii", b.view) == (5, 0, 5)


def test_expect_skip_and_errors(pipe: tuple[int, int], use_cext: bool) -> None:
    r, _ = pipe
    b = IoctlBatch(16, use_cext)
    b.add(r, FIONREAD, 0, 4, "first")
    chk = b.add(r, FIONREAD, 4, 4, "checked", expect=1)
    bad = b.add(-1, FIONREAD, 8, 4, "bad fd", skip=True)
    b.seal()
    assert b.run() == (chk, 0)  # FIONREAD returns 0, not 1: stops there
    b.set_expect(chk, 0)
    assert b.run() is None  # the bad op is skipped
    b.set_skip(bad, False)
    with pytest.raises(LuoError) as ei:
        b.run()
    assert ei.value.errno == errno.EBADF and "bad fd" in ei.value.message
    assert b.run(start=bad + 1) is None


def test_trace_names_every_op_run(pipe: tuple[int, int], use_cext: bool) -> None:
    r, _ = pipe
    b = IoctlBatch(8, use_cext)
    b.add(r, FIONREAD, 0, 4, "a")
    b.add(r, FIONREAD, 4, 4, "b", skip=True)
    b.seal()
    b.trace = []
    b.run()
    assert [n for n, _ in b.trace] == ["a"]


def test_no_cext_env_selects_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUO_VMM_NO_CEXT", "1")
    assert not kbatch.have_cext() and not IoctlBatch(8).cext


def test_argument_outside_buffer_refused() -> None:
    b = IoctlBatch(8)
    with pytest.raises(LuoError) as ei:
        b.add(0, FIONREAD, 6, 4, "too far")
    assert ei.value.errno == errno.EINVAL


def test_conditions_decide_at_run_time(pipe: tuple[int, int], use_cext: bool) -> None:
    """if_nonzero / if_different read the buffer when the batch runs; ran() says what ran."""
    r, _ = pipe
    b = IoctlBatch(64, use_cext)
    nz = b.add(r, FIONREAD, 0, 4, "if nonzero", if_nonzero=(16, 8))
    df = b.add(r, FIONREAD, 4, 4, "if different", if_different=(24, 32, 8))
    b.seal()
    assert b.run() is None and not b.ran(nz) and not b.ran(df)
    b.view[20] = 1
    b.view[39] = 7
    assert b.run() is None and b.ran(nz) and b.ran(df)
    assert b.results[nz] == 0
    b.view[31] = 7
    assert b.run() is None and b.ran(nz) and not b.ran(df)
