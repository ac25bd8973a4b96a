"""A fixed list of ioctls whose arguments all live in one preallocated buffer, run in one call.

Save and restore are inside a live update's blackout, and on this machine (PVM) their cost was
not the kernel's work but Python's around it (bench/save_restore.py --profile, 1 GiB, 2 vCPUs,
before this module): 191 µs of ioctls in a 503 µs save, 213 µs in a 610 µs restore. A vCPU ioctl
costs ~2.2-2.8 µs back to back from C, 6-9 µs one by one through ctypes, 3.3-5.7 µs through
``fcntl.ioctl``. So the whole sequence is prepared once, when the VM is created (outside the
blackout): every struct at a fixed offset of one buffer, every op a (fd, request, offset)
triple, optionally checked (an expected return value) or conditional (run only if some bytes of
the buffer are non-zero, or differ from others: decided when the batch runs); a save or restore
is then one call.

That call is ``luo_ioctl_batch`` from ``_ioctl_batch.so`` (csrc/ioctl_batch.c, built by
scripts/setup.sh; why C: its comment) when present and of the expected ABI, else the same list
run with ``fcntl.ioctl`` (the fallback; ``LUO_VMM_NO_CEXT=1`` forces it). Same run, medians:
save 158 µs in C, 226 µs with the fallback; restore 183 and 271.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from luo.errors import LuoError

ABI = 2
OP_SKIP, OP_CHECK, OP_IF_NONZERO, OP_IF_DIFFERENT = 1, 2, 4, 8
NOT_RUN = -(1 << 63)  # results[i] of an op that did not run
OP = struct.Struct("<iIQQqQQQ")  # struct luo_op: fd, flags, request, offset, expect, cond_a, cond_b, cond_len
LIB_PATH = Path(__file__).with_name("_ioctl_batch.so")


def _load() -> C.CDLL | None:
    """The C runner, or None (absent or of another ABI)."""
    if not LIB_PATH.exists():
        return None
    try:
        lib = C.CDLL(str(LIB_PATH), use_errno=False)
        lib.luo_ioctl_batch_abi.restype = C.c_int
        if lib.luo_ioctl_batch_abi() != ABI:
            return None
        fn = lib.luo_ioctl_batch
        fn.argtypes = [C.c_void_p, C.c_int, C.c_int, C.c_void_p, C.POINTER(C.c_int),
                       C.POINTER(C.c_int64), C.c_void_p, C.c_void_p]
        fn.restype = C.c_int
        return lib
    except (OSError, AttributeError):
        return None


_LIB = _load()


def have_cext() -> bool:
    """Whether a batch built now runs in C (the library loaded, and LUO_VMM_NO_CEXT is not 1)."""
    return _LIB is not None and os.environ.get("LUO_VMM_NO_CEXT") != "1"


@dataclass
class Op:
    fd: int
    req: int
    off: int
    size: int
    name: str
    flags: int
    expect: int
    cond_a: int = 0
    cond_b: int = 0
    cond_len: int = 0


class IoctlBatch:
    """Ops over one zeroed buffer of ``size`` bytes (stable address: ctypes owns it).

    Build with ``add`` and ``seal``; then ``set_skip``/``set_expect`` may change an op between
    runs, and ``run`` executes it; ``results[i]`` is then op i's return value, or NOT_RUN.
    ``use_cext=False`` (or LUO_VMM_NO_CEXT=1 when the batch is built) forces the fcntl fallback;
    tests run both.
    """

    def __init__(self, size: int, use_cext: bool | None = None) -> None:
        self.buf = (C.c_char * size)()
        self.addr = C.addressof(self.buf)
        self.view = memoryview(self.buf).cast("B")
        self.ops: list[Op] = []
        self.cext = have_cext() if use_cext is None else (use_cext and _LIB is not None)
        self._packed: C.Array[C.c_char] | None = None
        self._views: list[memoryview] = []
        self.results: C.Array[C.c_int64] = (C.c_int64 * 1)()
        self._err = C.c_int()
        self._res = C.c_int64()
        self._args: tuple[object, ...] = ()
        self.trace: list[tuple[str, int]] | None = None  # (op name, ns) per op run, when a profiler asks

    def add(self, fd: int, req: int, off: int, size: int, name: str, expect: int | None = None,
            skip: bool = False, if_nonzero: tuple[int, int] | None = None,
            if_different: tuple[int, int, int] | None = None) -> int:
        """Append an op whose argument is the ``size`` bytes at ``off``; its index.

        ``if_nonzero=(off, len)``: run only if those bytes are not all zero at run time;
        ``if_different=(a, b, len)``: only if the bytes at a and at b differ."""
        if self._packed is not None:
            raise LuoError(errno.EBUSY, "ioctl batch already sealed")
        flags = (OP_CHECK if expect is not None else 0) | (OP_SKIP if skip else 0)
        cond = (0, 0, 0)
        if if_nonzero is not None:
            flags |= OP_IF_NONZERO
            cond = (if_nonzero[0], 0, if_nonzero[1])
        if if_different is not None:
            flags |= OP_IF_DIFFERENT
            cond = if_different
        for a, n in ((off, size), (cond[0], cond[2]), (cond[1], cond[2])):
            if a < 0 or n < 0 or a + n > len(self.view):
                raise LuoError(errno.EINVAL, f"{name}: bytes {a}+{n} outside the {len(self.view)}-byte buffer")
        self.ops.append(Op(fd, req, off, size, name, flags, expect or 0, *cond))
        return len(self.ops) - 1

    def seal(self) -> None:
        n = len(self.ops)
        self._packed = (C.c_char * max(1, OP.size * n))()
        for i in range(n):
            self._pack(i)
        self._views = [self.view[o.off : o.off + o.size] for o in self.ops]
        self.results = (C.c_int64 * max(1, n))()
        self._args = (self._packed, n, self.addr, C.byref(self._err), C.byref(self._res), self.results)

    def _pack(self, i: int) -> None:
        assert self._packed is not None
        o = self.ops[i]
        OP.pack_into(self._packed, i * OP.size, o.fd, o.flags, o.req, o.off, o.expect, o.cond_a, o.cond_b, o.cond_len)

    def set_skip(self, i: int, skip: bool) -> None:
        o = self.ops[i]
        flags = (o.flags | OP_SKIP) if skip else (o.flags & ~OP_SKIP)
        if flags != o.flags:
            o.flags = flags
            self._pack(i)

    def set_expect(self, i: int, expect: int) -> None:
        o = self.ops[i]
        if o.expect != expect or not o.flags & OP_CHECK:
            o.expect, o.flags = expect, o.flags | OP_CHECK
            self._pack(i)

    def ran(self, i: int) -> bool:
        """Whether op i ran in the last run."""
        return bool(self.results[i] != NOT_RUN)

    def run(self, start: int = 0) -> tuple[int, int] | None:
        """Run ops[start:]. None when all ran (or were not wanted); (index, result) at the first op
        whose result was not its expect (the rest did not run); LuoError at the first that failed."""
        if self._packed is None:
            raise LuoError(errno.EINVAL, "ioctl batch not sealed")
        if self.cext and _LIB is not None:
            if self.trace is not None:
                return self._run_c_traced(start)
            packed, n, addr, err, res, results = self._args
            i = _LIB.luo_ioctl_batch(packed, n, start, addr, err, res, results, None)
            if i >= n:
                return None
            return self._stopped(i)
        return self._run_py(start)

    def _stopped(self, i: int) -> tuple[int, int]:
        if self._err.value:
            e = self._err.value
            raise LuoError(e, f"{self.ops[i].name} failed: {os.strerror(e)}")
        return i, self._res.value

    def _run_c_traced(self, start: int) -> tuple[int, int] | None:
        n = len(self.ops)
        ns = (C.c_uint64 * n)()
        packed, n, addr, err, res, results = self._args
        i = _LIB.luo_ioctl_batch(packed, n, start, addr, err, res, results, ns)  # type: ignore[union-attr]
        assert self.trace is not None
        self.trace += [(self.ops[j].name, ns[j]) for j in range(start, min(i + 1, n)) if ns[j]]
        return None if i >= n else self._stopped(i)

    def _wanted(self, o: Op) -> bool:
        if o.flags & OP_SKIP:
            return False
        v = self.view
        if o.flags & OP_IF_NONZERO and not any(v[o.cond_a : o.cond_a + o.cond_len]):
            return False
        return not (o.flags & OP_IF_DIFFERENT
                    and v[o.cond_a : o.cond_a + o.cond_len] == v[o.cond_b : o.cond_b + o.cond_len])

    def _run_py(self, start: int) -> tuple[int, int] | None:
        """The fallback: the same ops through fcntl.ioctl (which releases the GIL too)."""
        ioctl, views, trace, results = fcntl.ioctl, self._views, self.trace, self.results
        for i in range(start, len(self.ops)):
            o = self.ops[i]
            results[i] = NOT_RUN
            if o.flags and not self._wanted(o):
                continue
            t = time.perf_counter_ns() if trace is not None else 0
            try:
                r = ioctl(o.fd, o.req, views[i], True)
            except (OSError, ValueError) as ex:  # ValueError: a negative fd, which the kernel calls EBADF
                e = (ex.errno if isinstance(ex, OSError) else errno.EBADF) or errno.EIO
                raise LuoError(e, f"{o.name} failed: {os.strerror(e)}") from None
            results[i] = r
            if trace is not None:
                trace.append((o.name, time.perf_counter_ns() - t))
            if o.flags & OP_CHECK and r != o.expect:
                return i, r
        return None
