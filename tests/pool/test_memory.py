"""The pool's real memory: hugetlb and shmem memfds, allocated up front, scrubbed in place.

These make real memfds and, for hugetlb, raise vm.nr_hugepages (root); the ``hugetlb`` fixture
puts it back as it was, so the suite leaves the machine as it found it. Pools stay <= 64 MiB.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luo.errors import LuoError
from luo.pool import memory
from luo.pool.memory import HUGE_PAGE, PoolMemory, ensure_free_hugepages, hugepages
from luo.pool.spec import LABEL_AREA_SIZE

M = 1 << 20
NR = Path("/proc/sys/vm/nr_hugepages")
OVERCOMMIT = Path("/proc/sys/vm/nr_overcommit_hugepages")


def _nr() -> int:
    return int(NR.read_text())


def _err(err: int, call: Callable[..., object], *args: object) -> LuoError:
    with pytest.raises(LuoError) as info:
        call(*args)
    assert info.value.errno == err, info.value
    return info.value


@pytest.fixture
def hugetlb() -> Iterator[int]:
    """vm.nr_hugepages (and the overcommit) as found, restored after the test; skip if the
    machine cannot reserve huge pages (not root, or no 2 MiB hugetlb)."""
    if os.geteuid() != 0 or not os.access(NR, os.W_OK) or hugepages().size != HUGE_PAGE:
        pytest.skip("reserving 2 MiB huge pages needs root and a 2 MiB default huge page size")
    saved, saved_overcommit = _nr(), int(OVERCOMMIT.read_text())
    yield saved
    OVERCOMMIT.write_text(f"{saved_overcommit}\n")
    NR.write_text(f"{saved}\n")
    assert _nr() == saved


@pytest.fixture(params=["hugetlb", "shmem"])
def pool(request: pytest.FixtureRequest) -> Iterator[PoolMemory]:
    """An 8 MiB pool of each backing: four 2 MiB extents."""
    if request.param == "hugetlb":
        request.getfixturevalue("hugetlb")
    p = PoolMemory.create(8 * M, request.param, name="luo-pool-test")
    yield p
    p.close(give_back=True)


# -- huge page figures ----------------------------------------------------------------------


def test_hugepages_parses_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "meminfo"
    fake.write_text(
        "MemTotal:       32000000 kB\nMemAvailable:   24000000 kB\nHugePages_Total:      12\n"
        "HugePages_Free:        7\nHugePages_Rsvd:        2\nHugePages_Surp:        1\n"
        "Hugepagesize:       2048 kB\nHugetlb:           24576 kB\n"
    )
    monkeypatch.setattr(memory, "MEMINFO", fake)
    hp = hugepages()
    assert hp == memory.HugePages(total=12, free=7, rsvd=2, surp=1, size=2 * M)
    assert hp.available == 5  # reserved pages are promised to someone already


def test_hugepages_reads_the_2m_hstate_when_1g_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "meminfo"
    fake.write_text("HugePages_Total:  4\nHugePages_Free:  4\nHugepagesize:  1048576 kB\n")
    hstate = tmp_path / "hugepages-2048kB"
    hstate.mkdir()
    for name, value in (
        ("nr_hugepages", 10),
        ("free_hugepages", 6),
        ("resv_hugepages", 1),
        ("surplus_hugepages", 2),
    ):
        (hstate / name).write_text(f"{value}\n")
    monkeypatch.setattr(memory, "MEMINFO", fake)
    monkeypatch.setattr(memory, "HSTATE_2M", hstate)
    assert hugepages() == memory.HugePages(total=12, free=6, rsvd=1, surp=2, size=2 * M)
    assert memory._nr_path() == hstate / "nr_hugepages"
    monkeypatch.setattr(memory, "HSTATE_2M", tmp_path / "none")
    _err(errno.EOPNOTSUPP, hugepages)


def test_meminfo_and_sysfs_agree_here() -> None:
    hp = hugepages()
    sysfs = memory.HSTATE_2M
    if hp.size != HUGE_PAGE or not sysfs.is_dir():
        pytest.skip("2 MiB is not this kernel's default huge page size")
    assert hp.free == int((sysfs / "free_hugepages").read_text())
    assert hp.total - hp.surp == int((sysfs / "nr_hugepages").read_text()) == _nr()


# -- creation -------------------------------------------------------------------------------


def test_hugetlb_pool_takes_its_pages_up_front_and_gives_them_back(hugetlb: int) -> None:
    before = hugepages()
    pool = PoolMemory.create(32 * M, "hugetlb")
    try:
        need = 16
        assert pool.hugepages_added == max(0, need - before.available)
        assert _nr() == hugetlb + pool.hugepages_added
        after = hugepages()
        assert after.free == before.free + pool.hugepages_added - need  # allocated, not reserved
        st = os.fstat(pool.fd)
        assert st.st_size == 32 * M and st.st_blocks * 512 == 32 * M and st.st_blksize == HUGE_PAGE
        use = pool.usage()
        assert use["backing"] == "hugetlb" and use["huge_pages"] == need and use["resident"] == 32 * M
        assert use["system_hugepages_free"] == after.free
        assert os.readlink(f"/proc/self/fd/{pool.fd}").startswith("/memfd:luo-pool")
    finally:
        pool.close(give_back=True)
    assert pool.fd == -1 and pool.hugepages_added == 0
    assert _nr() == hugetlb
    assert hugepages().free == before.free
    pool.close(give_back=True)  # again: nothing


def test_hugetlb_pool_uses_free_pages_without_raising(hugetlb: int) -> None:
    NR.write_text(f"{hugetlb + 8}\n")
    assert _nr() == hugetlb + 8
    pool = PoolMemory.create(16 * M, "hugetlb")
    assert pool.hugepages_added == 0 and _nr() == hugetlb + 8
    pool.close(give_back=True)
    assert _nr() == hugetlb + 8  # the pages were not the pool's to give back


def test_close_without_give_back_keeps_the_pages_raised(hugetlb: int) -> None:
    pool = PoolMemory.create(4 * M, "hugetlb")
    added = pool.hugepages_added
    pool.close(give_back=False)  # handed over: the next host's pool still needs them
    assert _nr() == hugetlb + added


def test_give_back_stays_above_the_pages_in_use(hugetlb: int) -> None:
    pool = PoolMemory.create(8 * M, "hugetlb")
    if pool.hugepages_added != 4:
        pytest.skip("free huge pages existed already")
    keep = os.dup(pool.fd)  # the pool lives on elsewhere (a successor): its pages stay in use
    try:
        pool.close(give_back=True)
        assert _nr() == hugetlb + 4
    finally:
        os.close(keep)


def test_give_back_failure_is_a_warning(
    hugetlb: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pool = PoolMemory.create(4 * M, "hugetlb")
    if not pool.hugepages_added:
        pytest.skip("free huge pages existed already")
    monkeypatch.setattr(memory, "NR_HUGEPAGES", tmp_path / "missing" / "nr_hugepages")
    with caplog.at_level(logging.WARNING, logger="luo.pool"):
        pool.close(give_back=True)
    assert pool.fd == -1
    assert any("could not give back" in r.getMessage() for r in caplog.records)


def test_shmem_pool_is_allocated_up_front() -> None:
    pool = PoolMemory.create(16 * M, "shmem")
    try:
        st = os.fstat(pool.fd)
        assert st.st_blocks * 512 == 16 * M and st.st_blksize != HUGE_PAGE
        assert pool.hugepages_added == 0
        use = pool.usage()
        assert use["resident"] == 16 * M and use["huge_pages"] == 0 and use["backing"] == "shmem"
    finally:
        pool.close(give_back=True)


def test_create_refuses_bad_sizes_and_backings() -> None:
    _err(errno.EINVAL, PoolMemory.create, 3 * M, "shmem")
    _err(errno.EINVAL, PoolMemory.create, 0, "shmem")
    _err(errno.EINVAL, PoolMemory.create, 2 * M, "tmpfs")


def test_impossible_hugetlb_pool_fails_fast_and_changes_nothing(hugetlb: int) -> None:
    before = hugepages()
    e = _err(errno.ENOMEM, PoolMemory.create, 64 << 40, "hugetlb")
    assert "hugepages=" in e.message and "vm.nr_hugepages" in e.message
    assert _nr() == hugetlb and hugepages().free == before.free


def test_ensure_more_hugepages_than_memory_refuses_without_asking(hugetlb: int) -> None:
    e = _err(errno.ENOMEM, ensure_free_hugepages, 10**9)
    assert "1000000000 free 2 MiB hugetlb pages" in e.message
    assert _nr() == hugetlb
    assert ensure_free_hugepages(0) == 0
    _err(errno.EINVAL, ensure_free_hugepages, -1)


def test_ensure_puts_nr_hugepages_back_when_the_kernel_grants_too_few(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A knob that takes any value but pages that never come: the raise must be undone."""
    fake = tmp_path / "meminfo"
    fake.write_text(
        "MemAvailable:   24000000 kB\nHugePages_Total:       5\nHugePages_Free:        1\n"
        "HugePages_Rsvd:        0\nHugePages_Surp:        0\nHugepagesize:       2048 kB\n"
    )
    knob = tmp_path / "nr_hugepages"
    knob.write_text("5\n")
    monkeypatch.setattr(memory, "MEMINFO", fake)
    monkeypatch.setattr(memory, "NR_HUGEPAGES", knob)
    e = _err(errno.ENOMEM, ensure_free_hugepages, 4)
    assert "the kernel has 1 (HugePages_Free) even after raising vm.nr_hugepages to 8" in e.message
    assert "hugepages=8" in e.message
    assert knob.read_text().strip() == "5"
    assert ensure_free_hugepages(1) == 0 and knob.read_text().strip() == "5"


# -- bytes and scrubbing ----------------------------------------------------------------------


def test_scrub_zeroes_one_extent_and_keeps_the_pages(pool: PoolMemory) -> None:
    for i in range(4):
        pool.write(i * HUGE_PAGE, bytes([0x41 + i]) * HUGE_PAGE)
    free_before = hugepages().free
    pool.scrub(HUGE_PAGE, HUGE_PAGE)
    assert pool.read(HUGE_PAGE, HUGE_PAGE) == bytes(HUGE_PAGE)
    for i in (0, 2, 3):
        assert pool.read(i * HUGE_PAGE, HUGE_PAGE) == bytes([0x41 + i]) * HUGE_PAGE
    assert os.fstat(pool.fd).st_blocks * 512 == pool.size  # punched and allocated again
    assert hugepages().free == free_before
    pool.scrub(0, 2 * HUGE_PAGE)
    assert pool.read(0, 2 * HUGE_PAGE) == bytes(2 * HUGE_PAGE)
    assert pool.read(2 * HUGE_PAGE, 1) == b"C"


def test_scrub_refuses_ranges_that_are_not_whole_pages(pool: PoolMemory) -> None:
    pool.write(0, b"keep")
    for offset, length in ((1, HUGE_PAGE), (0, 4096), (0, 0), (HUGE_PAGE, 3 * M), (-HUGE_PAGE, HUGE_PAGE)):
        _err(errno.EINVAL, pool.scrub, offset, length)
    _err(errno.EINVAL, pool.scrub, pool.size, HUGE_PAGE)  # past the end
    assert pool.read(0, 4) == b"keep"  # nothing was punched


def test_read_and_write_anywhere_on_both_backings(pool: PoolMemory) -> None:
    across = HUGE_PAGE - 3  # straddles two huge pages
    pool.write(across, b"0123456789")
    assert pool.read(across, 10) == b"0123456789"
    assert pool.read(HUGE_PAGE, 7) == b"3456789"
    label = pool.size - LABEL_AREA_SIZE  # the end-label area, the pool's last 128 KiB
    record = os.urandom(LABEL_AREA_SIZE)
    pool.write(label, record)
    assert pool.read(label, LABEL_AREA_SIZE) == record
    pool.write(0, b"")
    assert pool.read(0, 0) == b""
    _err(errno.EINVAL, pool.write, pool.size - 2, b"abc")
    _err(errno.EINVAL, pool.read, pool.size, 1)
    _err(errno.EINVAL, pool.read, -1, 1)


def test_closed_pool_refuses_io() -> None:
    pool = PoolMemory.create(2 * M, "shmem")
    pool.close()
    _err(errno.EBADF, pool.read, 0, 1)
    _err(errno.EBADF, pool.scrub, 0, HUGE_PAGE)


def test_scrub_whose_pages_are_gone_fails_with_the_errno(hugetlb: int) -> None:
    """Pages taken by someone else between the punch and the allocation: ENOSPC, the range zeros,
    and a write there is ENOSPC too (not a SIGBUS on a page that cannot be faulted in)."""
    pool = PoolMemory.create(4 * M, "hugetlb")
    try:
        pool.write(0, b"secret")
        OVERCOMMIT.write_text("0\n")
        NR.write_text("0\n")  # the pool's pages become surplus: freed ones leave the hugetlb pool
        e = _err(errno.ENOSPC, pool.scrub, 0, HUGE_PAGE)
        assert "allocating again" in e.message
        assert pool.read(0, 6) == bytes(6)
        assert os.fstat(pool.fd).st_blocks * 512 == 2 * M
        _err(errno.ENOSPC, pool.write, 0, b"x")
    finally:
        pool.close(give_back=True)


# -- adoption -------------------------------------------------------------------------------


def test_adopt_sees_the_same_memory(pool: PoolMemory) -> None:
    pool.write(3 * HUGE_PAGE + 100, b"survives the update")
    handed = os.dup(pool.fd)
    os.close(pool.fd)  # the old host is gone; its successor holds the only fd
    pool.fd = -1
    adopted = PoolMemory.adopt(handed, pool.backing, hugepages_added=pool.hugepages_added)
    try:
        assert adopted.size == 8 * M and adopted.backing == pool.backing
        assert adopted.hugepages_added == pool.hugepages_added
        assert adopted.read(3 * HUGE_PAGE + 100, 19) == b"survives the update"
        adopted.scrub(3 * HUGE_PAGE, HUGE_PAGE)
        assert adopted.read(3 * HUGE_PAGE + 100, 19) == bytes(19)
    finally:
        pool.hugepages_added = 0
        adopted.close(give_back=True)


def test_adopt_refuses_the_wrong_backing(pool: PoolMemory) -> None:
    other = "shmem" if pool.backing == "hugetlb" else "hugetlb"
    e = _err(errno.EINVAL, PoolMemory.adopt, pool.fd, other)
    assert f"started with a {other} pool" in e.message
    _err(errno.EINVAL, PoolMemory.adopt, pool.fd, "tmpfs")


def test_adopt_refuses_what_is_not_a_pool(tmp_path: Path) -> None:
    regular = tmp_path / "pool"
    regular.write_bytes(bytes(2 * M))
    fd = os.open(regular, os.O_RDWR)
    small = os.memfd_create("small", os.MFD_CLOEXEC)
    os.ftruncate(small, 4096)
    try:
        _err(errno.EINVAL, PoolMemory.adopt, fd, "shmem")  # a regular file, not a memfd
        _err(errno.EINVAL, PoolMemory.adopt, small, "shmem")  # not a 2 MiB multiple
        _err(errno.EINVAL, PoolMemory.adopt, 99999, "shmem")  # not open
    finally:
        os.close(fd)
        os.close(small)
