"""The pool's real memory: one memfd, hugetlb (2 MiB pages) or shmem, owned by the host daemon.

The host makes the memfd once and hands the very same fd to the next host at every live update,
so the pages never move. Every page is allocated when the pool is made (``fallocate``), as pages
reserved at boot would be: a pool that could not have all of its memory fails at creation with
a sentence, not later with a SIGBUS in a guest.

What this kernel's hugetlbfs does, and why the code looks the way it does:

- ``fallocate(fd, 0, ...)`` allocates huge pages (HugePages_Free drops) and fails with ENOSPC
  when there are too few; glibc's ``posix_fallocate`` could fall back to writing, which hugetlbfs
  refuses, so the real ``fallocate`` is called through libc;
- ``FALLOC_FL_PUNCH_HOLE`` gives pages back to the kernel's free huge pages, a hole reads as zeros;
- ``read(2)`` works, ``write(2)`` does not (EINVAL): writes go through a temporary shared mapping;
- ``fstat().st_blksize`` is the huge page size (2 MiB), 4 KiB for shmem: that is how an adopted
  fd's backing is checked.

Huge pages come from the kernel's persistent pool (``vm.nr_hugepages``). If it has too few free,
the host raises it by what is missing and remembers how many it added (``hugepages_added``), so
a host that stops for good, without handing the pool over, gives exactly those back.
``vm.nr_hugepages`` is machine-wide: another user of huge pages changing it at the same time can
make the figures read here stale; every change is read back, never assumed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from luo.errors import LuoError
from luo.pool.extents import GRANULE, fmt_bytes, is_int
from luo.pool.spec import BACKINGS, Backing

log = logging.getLogger("luo.pool")

MFD_CLOEXEC = 0x0001
MFD_HUGETLB = 0x0004
MFD_HUGE_SHIFT = 26
MFD_HUGE_2MB = 21 << MFD_HUGE_SHIFT  # log2(2 MiB) in the size bits
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
HUGE_PAGE = GRANULE  # the pool's unit is exactly one 2 MiB huge page

# Module attributes, not constants in the code, so tests can point them at files of their own.
MEMINFO = Path("/proc/meminfo")
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
# The 2 MiB hstate in sysfs: what to read and write when 2 MiB is not the default huge page
# size (default_hugepagesz=1G), since /proc/meminfo and vm.nr_hugepages then speak of 1G pages.
HSTATE_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """The fallocate(2) syscall (glibc's), OSError on failure; never a fallback to writes."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class HugePages:
    """The kernel's 2 MiB huge pages, as /proc/meminfo counts them (pages; ``size`` in bytes).

    ``rsvd`` are free pages promised to mappings that have not touched them yet: only
    ``free - rsvd`` can be allocated by someone else.
    """

    total: int
    free: int
    rsvd: int
    surp: int
    size: int

    @property
    def available(self) -> int:
        return max(0, self.free - self.rsvd)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo as numbers: ``kB`` fields in bytes, counts as they are."""
    out: dict[str, int] = {}
    for line in MEMINFO.read_text().splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not fields or not fields[0].isdigit():
            continue
        unit = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
        out[key.strip()] = int(fields[0]) * unit
    return out


def _two_mb_is_default(info: dict[str, int]) -> bool:
    return info.get("Hugepagesize") == HUGE_PAGE


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def hugepages() -> HugePages:
    """The 2 MiB huge pages: from /proc/meminfo, or from sysfs if 2 MiB is not the default size.

    EOPNOTSUPP if the kernel has no 2 MiB huge pages at all.
    """
    info = _meminfo()
    if _two_mb_is_default(info):
        return HugePages(
            info.get("HugePages_Total", 0),
            info.get("HugePages_Free", 0),
            info.get("HugePages_Rsvd", 0),
            info.get("HugePages_Surp", 0),
            HUGE_PAGE,
        )
    try:
        persistent = _read_int(HSTATE_2M / "nr_hugepages")
        surp = _read_int(HSTATE_2M / "surplus_hugepages")
        return HugePages(
            persistent + surp,
            _read_int(HSTATE_2M / "free_hugepages"),
            _read_int(HSTATE_2M / "resv_hugepages"),
            surp,
            HUGE_PAGE,
        )
    except (OSError, ValueError, IndexError) as e:
        raise LuoError(
            errno.EOPNOTSUPP,
            f"this kernel has no 2 MiB huge pages ({HSTATE_2M}: {e}); a hugetlb pool needs them: boot with "
            "hugepagesz=2M, or make the pool with the shmem backing (--pool SIZE:shmem).",
        ) from e


def _nr_path() -> Path:
    """The knob of the persistent 2 MiB pages: vm.nr_hugepages if 2 MiB is the default size."""
    return NR_HUGEPAGES if _two_mb_is_default(_meminfo()) else HSTATE_2M / "nr_hugepages"


def _read_nr(path: Path) -> int:
    try:
        return _read_int(path)
    except (OSError, ValueError, IndexError) as e:
        raise LuoError(
            getattr(e, "errno", None) or errno.EIO,
            f"cannot read the number of huge pages from {path} ({e}); is /proc (or /sys) mounted?",
        ) from e


def _write_nr(path: Path, count: int) -> int:
    """Ask the kernel for ``count`` persistent pages; returns what it granted (it may give fewer)."""
    try:
        path.write_text(f"{count}\n")
    except OSError as e:
        raise LuoError(
            e.errno or errno.EIO,
            f"cannot set {path} to {count} ({e.strerror}); the host must run as root to reserve huge "
            "pages, or reserve them at boot (hugepages=N on the kernel command line).",
        ) from e
    return _read_nr(path)


def ensure_free_hugepages(n: int) -> int:
    """Make sure ``n`` 2 MiB huge pages can be allocated now; returns how many pages it added to
    vm.nr_hugepages for that (0 if enough were free), which the caller gives back when done.

    If the machine's available memory (MemAvailable) cannot hold the missing pages, nothing is
    asked of the kernel: raising vm.nr_hugepages that far would take every free page of the host
    (and its VMs) before failing. If the kernel grants too few, vm.nr_hugepages goes back to what
    it was. Both refusals are ENOMEM.
    """
    if not is_int(n) or n < 0:
        raise LuoError(errno.EINVAL, f"{n!r} is not a number of huge pages.")
    hp = hugepages()
    if hp.available >= n:
        return 0
    missing = n - hp.available
    path = _nr_path()
    old = _read_nr(path)
    target = old + missing
    boot = f"free memory or reserve them at boot (hugepages={target} on the kernel command line)"
    mem_available = _meminfo().get("MemAvailable", 0)
    if missing * HUGE_PAGE > mem_available:
        raise LuoError(
            errno.ENOMEM,
            f"the pool needs {n} free 2 MiB hugetlb pages, the kernel has {hp.available} (HugePages_Free "
            f"less HugePages_Rsvd) and the {missing} missing ones ({fmt_bytes(missing * HUGE_PAGE)}) are more "
            f"than the {mem_available >> 20} MiB of available memory, so vm.nr_hugepages was left at {old}; "
            f"{boot}.",
        )
    granted = _write_nr(path, target)
    after = hugepages()
    if after.available >= n:
        added = max(0, granted - old)
        log.info("vm.nr_hugepages raised from %d to %d for the pool (%d pages)", old, granted, n)
        return added
    restored = _write_nr(path, old)
    if restored != old:
        log.warning("vm.nr_hugepages is %d after putting it back to %d", restored, old)
    raise LuoError(
        errno.ENOMEM,
        f"the pool needs {n} free 2 MiB hugetlb pages, the kernel has {after.available} (HugePages_Free) "
        f"even after raising vm.nr_hugepages to {granted}; {boot}.",
    )


def give_back_hugepages(count: int) -> int:
    """Lower the persistent 2 MiB pages by ``count``, never below 0 nor below the pages in use
    or promised (total - free + rsvd); returns how many it took away. Raises LuoError."""
    if count <= 0:
        return 0
    path = _nr_path()
    current = _read_nr(path)
    hp = hugepages()
    in_use = hp.total - hp.free + hp.rsvd
    target = min(current, max(0, current - count, in_use))
    if target == current:
        return 0
    return current - _write_nr(path, target)


def _check_backing(backing: object) -> Backing:
    if backing not in BACKINGS:
        raise LuoError(errno.EINVAL, f"pool backing {backing!r} is not one of {', '.join(BACKINGS)}.")
    return cast(Backing, backing)


def _is_memfd(fd: int) -> bool:
    """A memfd (shmem or hugetlb): a regular file whose /proc link reads ``/memfd:NAME``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:") and stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


class PoolMemory:
    """The pool memfd. Offsets are bytes into it; ranges given to ``scrub`` are 2 MiB aligned."""

    def __init__(self, fd: int, size: int, backing: Backing, hugepages_added: int = 0) -> None:
        self.fd = fd
        self.size = size
        self.backing: Backing = backing
        self.hugepages_added = hugepages_added

    def __repr__(self) -> str:
        return f"PoolMemory(fd={self.fd}, size={fmt_bytes(self.size)}, backing={self.backing})"

    @classmethod
    def create(cls, size: int, backing: Backing, name: str = "luo-pool") -> PoolMemory:
        """A new pool of ``size`` bytes with every page allocated (hugetlb: raising
        vm.nr_hugepages first if needed). Nothing is left behind if it fails."""
        backing = _check_backing(backing)
        if not is_int(size) or size <= 0 or size % HUGE_PAGE:
            raise LuoError(
                errno.EINVAL, f"a pool of {size!r} bytes is not a positive multiple of 2 MiB (the huge page)."
            )
        added = ensure_free_hugepages(size // HUGE_PAGE) if backing == "hugetlb" else 0
        flags = MFD_CLOEXEC | (MFD_HUGETLB | MFD_HUGE_2MB if backing == "hugetlb" else 0)
        fd = -1
        try:
            try:
                fd = os.memfd_create(name, flags)
            except OSError as e:
                raise LuoError(
                    e.errno or errno.EIO,
                    f"cannot make the {backing} memfd {name!r} ({e.strerror}); "
                    + (
                        "this kernel may lack hugetlbfs: use --pool SIZE:shmem."
                        if backing == "hugetlb"
                        else "check the memfd name and the open-file limit."
                    ),
                ) from e
            try:
                os.ftruncate(fd, size)
                fallocate(fd, 0, 0, size)
            except OSError as e:
                what = (
                    "free 2 MiB huge pages" if backing == "hugetlb" else "memory (or a memory cgroup's room)"
                )
                raise LuoError(
                    e.errno or errno.EIO,
                    f"cannot allocate the {fmt_bytes(size)} {backing} pool ({e.strerror}); the host lacks "
                    f"{what} for it. Free memory or make a smaller pool.",
                ) from e
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if added:
                try:
                    give_back_hugepages(added)
                except LuoError as e:
                    log.warning("could not give back %d huge pages: %s", added, e)
            raise
        log.info("pool %s: %s %s, %d huge pages added", name, fmt_bytes(size), backing, added)
        return cls(fd, size, backing, added)

    @classmethod
    def adopt(cls, fd: int, backing: Backing, hugepages_added: int = 0) -> PoolMemory:
        """The pool memfd a previous host handed over, taken as it is: nothing allocated or written.

        ``hugepages_added`` is what the pool's creator raised vm.nr_hugepages by, if the caller
        carried it across (the pool map can): then the last host to stop gives those back.
        EINVAL if ``fd`` is not a memfd of a 2 MiB multiple whose backing is ``backing``.
        """
        backing = _check_backing(backing)
        if not is_int(fd) or not _is_memfd(fd):
            raise LuoError(errno.EINVAL, f"fd {fd!r} handed over as the pool is not a memfd.")
        st = os.fstat(fd)
        if st.st_size <= 0 or st.st_size % HUGE_PAGE:
            raise LuoError(
                errno.EINVAL,
                f"the pool memfd handed over is {st.st_size} bytes, not a positive multiple of 2 MiB; it is not "
                "a pool this version made.",
            )
        is_huge = st.st_blksize == HUGE_PAGE
        if is_huge != (backing == "hugetlb"):
            found = "hugetlb (2 MiB pages)" if is_huge else f"not 2 MiB hugetlb (blocks of {st.st_blksize})"
            raise LuoError(
                errno.EINVAL,
                f"the pool memfd handed over is {found}, but this host was started with a {backing} pool; "
                "start it with the preserved pool's backing.",
            )
        if not is_int(hugepages_added) or hugepages_added < 0:
            raise LuoError(errno.EINVAL, f"{hugepages_added!r} is not a number of huge pages.")
        return cls(fd, st.st_size, backing, hugepages_added)

    # -- bytes ------------------------------------------------------------------------------

    def _check_range(self, offset: object, length: object, what: str) -> tuple[int, int]:
        if not is_int(offset) or not is_int(length) or cast(int, offset) < 0 or cast(int, length) < 0:
            raise LuoError(
                errno.EINVAL, f"{what} at {offset!r} of {length!r} bytes is not a range of the pool."
            )
        off, n = cast(int, offset), cast(int, length)
        if off + n > self.size:
            raise LuoError(
                errno.EINVAL,
                f"{what} at {off:#x} of {n} bytes goes past the end of the {fmt_bytes(self.size)} pool.",
            )
        if self.fd < 0:
            raise LuoError(errno.EBADF, f"{what}: the pool memory was closed.")
        return off, n

    def scrub(self, offset: int, length: int) -> None:
        """Zero ``[offset, offset + length)`` so nothing of its last owner reaches the next one.

        Punching the range drops its pages (every mapping of them too), and allocating it again
        gives the pool fresh zeroed pages, so it keeps the memory it had. For hugetlb the pages
        return to the kernel's free huge pages in between: another user may take them, and then
        the allocation fails (ENOSPC) with the range punched (zeros, never old data) and left to
        be scrubbed again.
        """
        off, n = self._check_range(offset, length, "scrubbing")
        if n == 0 or off % HUGE_PAGE or n % HUGE_PAGE:
            raise LuoError(
                errno.EINVAL,
                f"scrubbing {n} bytes at {off:#x}: the range must be a non-empty run of whole 2 MiB pages.",
            )
        step = "punching"
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
            step = "allocating again"
            fallocate(self.fd, 0, off, n)
        except OSError as e:
            raise LuoError(
                e.errno or errno.EIO,
                f"scrubbing the pool at {off:#x} ({fmt_bytes(n)}) failed while {step} it ({e.strerror}); "
                "the range holds no old data but may lack its pages: free memory and scrub it again.",
            ) from e

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` (read(2) works on both backings)."""
        off, n = self._check_range(offset, n, "reading")
        out = bytearray()
        while len(out) < n:
            chunk = os.pread(self.fd, n - len(out), off + len(out))
            if not chunk:
                raise LuoError(errno.EIO, f"the pool memfd ended at {off + len(out):#x}, before its size.")
            out += chunk
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Put ``data`` at ``offset``: pwrite(2) for shmem, a shared mapping for hugetlb (whose
        write(2) is EINVAL). The hugetlb pages written are allocated first (a no-op for a full
        pool), so a missing page is ENOSPC here rather than a SIGBUS on the store."""
        off, n = self._check_range(offset, len(data), "writing")
        if n == 0:
            return
        if self.backing == "shmem":
            view = memoryview(data)
            done = 0
            while done < n:
                done += os.pwrite(self.fd, view[done:], off + done)
            return
        start = off - off % HUGE_PAGE
        end = -(-(off + n) // HUGE_PAGE) * HUGE_PAGE
        try:
            fallocate(self.fd, FALLOC_FL_KEEP_SIZE, start, end - start)
        except OSError as e:
            raise LuoError(
                e.errno or errno.EIO,
                f"writing the pool at {off:#x}: its pages there are missing and cannot be allocated "
                f"({e.strerror}); free huge pages and scrub the range.",
            ) from e
        with mmap.mmap(self.fd, end - start, mmap.MAP_SHARED, offset=start) as m:
            m[off - start : off - start + n] = data

    # -- state ------------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """What the pool holds: its huge pages and resident bytes, and the machine's huge pages."""
        st = os.fstat(self.fd) if self.fd >= 0 else None
        out: dict[str, Any] = {
            "backing": self.backing,
            "size": self.size,
            "huge_pages": self.size // HUGE_PAGE if self.backing == "hugetlb" else 0,
            "resident": st.st_blocks * 512 if st is not None else 0,
            "hugepages_added": self.hugepages_added,
        }
        try:
            hp = hugepages()
            out["system_hugepages_total"] = hp.total
            out["system_hugepages_free"] = hp.free
        except LuoError:
            out["system_hugepages_total"] = out["system_hugepages_free"] = 0
        return out

    def close(self, give_back: bool = False) -> None:
        """Close the fd (again: nothing). ``give_back``: this host stops without handing the pool
        over, so the huge pages it added to vm.nr_hugepages go back; best effort, since the pool
        is gone either way, and a failure is a warning."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if give_back and self.hugepages_added:
            try:
                taken = give_back_hugepages(self.hugepages_added)
                log.info("gave back %d of the pool's %d huge pages", taken, self.hugepages_added)
            except LuoError as e:
                log.warning("could not give back the pool's %d huge pages: %s", self.hugepages_added, e)
            self.hugepages_added = 0
