"""The memory pool in real hosts: guests running from hugetlb pages across updates, restore-once
claims, scrub before reuse, the layout check, run-time shards in the end labels, the map in the
KHO tree (dtc), and the huge pages given back."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest

from luo.client import pool as lp
from luo.errors import LuoError
from luo.testing.console import check_continuity
from luo.testing.host import HostProcess
from luo.testing.wait import wait_for

M = 1 << 20


def pool_of(host: HostProcess) -> dict:
    return lp.status(host.client())


def owner_extents(host: HostProcess, owner: str) -> list[list]:
    return pool_of(host)["owners"].get(owner, {}).get("extents", [])


def read(fd: int, offset: int, n: int) -> bytes:
    return os.pread(fd, n, offset)


def write(fd: int, offset: int, data: bytes) -> None:
    """Through a mapping: a hugetlb memfd has no write(2)."""
    with mmap.mmap(fd, 2 * M, mmap.MAP_SHARED, offset=offset) as m:
        m[: len(data)] = data


def more_beats(host: HostProcess, vm: str, n: int) -> None:
    con = host.console(vm)
    have = con.count()
    wait_for(lambda: con.count() >= have + n, 30, f"{n} more heartbeats from {vm}")


def test_two_guests_from_hugetlb_pages_cross_five_updates(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_POOL": "768M:hugetlb"})
    for vm in ("a", "b"):
        host.luo("vm", "start", vm, "--mem", "256M", "--cpus", "1")
    for vm in ("a", "b"):
        more_beats(host, vm, 2)
    before = {vm: owner_extents(host, f"vm:{vm}") for vm in ("a", "b")}
    assert all(len(e) == 1 and e[0][1] == 256 * M for e in before.values()), before
    assert pool_of(host)["memory"]["huge_pages"] == 384
    for _ in range(5):
        r = host.update()
        assert set(r["vms"]) == {"a", "b"}
        after = {vm: owner_extents(host, f"vm:{vm}") for vm in ("a", "b")}
        # the same extents, claimed back by the VMs' new VMMs when they registered
        assert [[e[:2] for e in x] for x in after.values()] == [[e[:2] for e in x] for x in before.values()]
        assert all(e[2] == "claimed" for x in after.values() for e in x), after
        host.luo("finish")
        for vm in ("a", "b"):
            more_beats(host, vm, 1)
    for vm in ("a", "b"):
        more_beats(host, vm, 3)
        con = host.console(vm)
        assert not [ln for ln in con.lines() if "FAIL" in ln], con.lines()[-10:]
        assert any(ln.startswith("integrity pass=") for ln in con.lines())
        assert not check_continuity(con.heartbeats(), 100.0, 5000)
        assert sum(1 for ln in con.lines() if ln.startswith("luo-guest boot")) == 1
    st = host.luo("status").stdout
    assert "pool: 768M:hugetlb" in st and "vm:a" in st and "luo:pool" in st


def test_restore_once_never_preserved_and_finish(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_POOL": "64M:hugetlb"})
    c = host.client()
    fd, (x,) = lp.alloc(c, "client:x", 4 * M)
    write(fd, x.offset, b"kept across the update")
    _, (y,) = lp.alloc(c, "client:y", 2 * M)
    write(fd, y.offset, b"never claimed")
    os.close(fd)
    host.update()
    c = host.client()
    fd, got = lp.claim(c, "client:x", x.offset)
    assert (got.offset, got.length, got.state) == (x.offset, x.length, "claimed")
    assert read(fd, x.offset, 22) == b"kept across the update"
    with pytest.raises(LuoError) as again:
        lp.claim(c, "client:x", x.offset)
    assert again.value.errno == errno.EINVAL  # restored once already
    with pytest.raises(LuoError) as never:
        lp.claim(c, "client:x", x.offset + 32 * M)  # free space: never preserved
    assert never.value.errno == errno.ENOENT
    with pytest.raises(LuoError) as other:
        lp.claim(c, "client:z", y.offset)
    assert other.value.errno == errno.EPERM
    host.luo("finish")  # y was never claimed: released, scrubbed before reuse
    assert "client:y" not in pool_of(host)["owners"]
    with pytest.raises(LuoError) as late:
        lp.claim(c, "client:y", y.offset)
    assert late.value.errno == errno.ENOENT
    fd2, got2 = lp.alloc(c, "client:z", 60 * M)  # everything but x: y's old extent among it
    covered = [e for e in got2 if e.offset <= y.offset < e.offset + e.length]
    assert covered and read(fd2, y.offset, 4096) == bytes(4096)  # nothing of y crossed to z
    os.close(fd)
    os.close(fd2)


def test_a_stopped_vms_memory_is_scrubbed_and_goes_to_the_next_vm(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_POOL": "512M:hugetlb"})
    host.luo("vm", "start", "a", "--mem", "256M", "--cpus", "1")
    more_beats(host, "a", 3)  # the guest has written its integrity buffer
    (old,) = owner_extents(host, "vm:a")
    c = host.client()
    fd, _ = lp.alloc(c, "client:peek", 2 * M)  # only for the pool's fd
    touched = [off for off in range(old[0], old[0] + old[1], 2 * M) if read(fd, off, 4096) != bytes(4096)]
    assert touched  # the guest's memory holds its data while it runs
    host.luo("vm", "stop", "a")
    assert "vm:a" not in pool_of(host)["owners"]
    host.luo("vm", "start", "b", "--mem", "256M", "--cpus", "1", "--no-pool")  # not from the pool
    assert "vm:b" not in pool_of(host)["owners"]
    _, mine = lp.alloc(c, "client:next", 256 * M)
    assert [(e.offset, e.length) for e in mine] == [(old[0], old[1])]  # a's extent, reused
    assert all(read(fd, off, 4096) == bytes(4096) for off in touched)  # scrubbed: zeros
    lp.free(c, "client:next")
    host.luo("vm", "start", "c", "--mem", "256M", "--cpus", "1")
    assert [e[:2] for e in owner_extents(host, "vm:c")] == [old[:2]]
    more_beats(host, "c", 3)
    more_beats(host, "b", 1)
    os.close(fd)


def test_a_label_less_layout_is_the_command_line(make_host: Callable[..., HostProcess]) -> None:
    env = {"LUO_POOL": "64M:shmem", "LUO_POOL_SHARDS": "16M:devdax,16M:fsdax"}
    host = make_host(env)
    names = [s["name"] for s in lp.shards(host.client())]
    assert names == ["shard0", "shard1"]
    fd, shard = lp.shard_open(host.client(), "shard0", "client:db")
    write(fd, shard["offset"], b"dax data")
    os.close(fd)
    changed = f"env LUO_POOL_SHARDS=32M:devdax {sys.executable} -m luo"
    cp = host.luo("update", "--to", changed, check=False)
    assert cp.returncode != 0 and "prepare failed" in cp.stderr, cp.stderr
    assert "16M:devdax,16M:fsdax" in cp.stderr and "32M:devdax" in cp.stderr, cp.stderr
    assert host.state() == "normal"
    host.update()  # the same layout goes through, and the shard's content and owner with it
    fd, again = lp.shard_open(host.client(), "shard0", "client:db")
    assert read(fd, again["offset"], 8) == b"dax data" and again["owner"] == "client:db"
    with pytest.raises(LuoError) as busy:
        lp.shard_open(host.client(), "shard0", "client:other")
    assert busy.value.errno == errno.EBUSY
    with pytest.raises(LuoError) as fixed:
        lp.shard_create(host.client(), 8 * M)
    assert fixed.value.errno == errno.EOPNOTSUPP
    os.close(fd)


def test_end_labels_are_rewritten_at_run_time_and_read_back_after_an_update(
        make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_POOL": "64M:hugetlb", "LUO_POOL_LABELS": "end"})
    c = host.client()
    assert lp.shards(c) == []
    s0 = lp.shard_create(c, 8 * M, "devdax")
    s1 = lp.shard_create(c, 4 * M, "fsdax")
    assert (s0["name"], s1["name"]) == ("shard0", "shard1")
    host.luo("pool", "shard", "delete", "shard0")
    s2 = host.luo("pool", "shard", "create", "6M").stdout
    assert s2.startswith("shard0: devdax 6 MiB")
    gen = pool_of(host)["label_generation"]
    host.update()
    host.luo("finish")
    after = lp.shards(host.client())
    assert sorted((s["name"], s["mode"], s["size"]) for s in after) == [("shard0", "devdax", 6 * M),
                                                                         ("shard1", "fsdax", 4 * M)]
    assert pool_of(host)["label_generation"] == gen  # read back from the pool's labels, not rewritten
    listed = host.luo("pool", "shard", "list").stdout
    assert "shard1" in listed and "fsdax" in listed


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc (device-tree-compiler) is not installed")
def test_dtc_decodes_the_tree_with_the_pool_map(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_POOL": "64M:shmem", "LUO_POOL_SHARDS": "8M:devdax"})
    fd, _ = lp.alloc(host.client(), "client:x", 4 * M)
    os.close(fd)
    host.luo("prepare")  # the outgoing tree exists once prepared (and the pool is frozen then)
    with pytest.raises(LuoError) as frozen:
        lp.alloc(host.client(), "client:late", 2 * M)
    assert frozen.value.errno == errno.EBUSY
    blob = subprocess.run([*host.command, "--runtime-dir", str(host.root), "kho", "dump", "--outgoing", "--raw"],
                          capture_output=True, check=True, env=host.env).stdout
    dts = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", "-"], input=blob, capture_output=True,
                         check=True).stdout.decode()
    assert 'compatible = "luo-pool-map-v1";' in dts and 'owner = "client:x";' in dts
    assert "order@9" in dts and 'shard-name = "shard0";' in dts
    on_disk = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(host.root / "pool.dtb")],
                             capture_output=True, check=True).stdout.decode()
    assert 'owner = "client:x";' in on_disk
    host.luo("cancel")
    fd, _ = lp.alloc(host.client(), "client:late", 2 * M)  # cancelled: the pool takes changes again
    os.close(fd)


def test_a_pool_too_big_for_the_machine_is_refused_at_start(short_dir) -> None:  # noqa: ANN001
    h = HostProcess(short_dir / "rt", {"LUO_POOL": "64T:hugetlb"})
    with pytest.raises(Exception):  # noqa: B017 - the host exits; its log says why
        h.start(timeout=15)
    assert "ENOMEM" in h.log.read_text() or "huge pages" in h.log.read_text()
    h.stop()


def test_an_fsdax_shard_is_a_file_system_that_crosses_updates(make_host: Callable[..., HostProcess],
                                                              short_dir) -> None:  # noqa: ANN001
    host = make_host({"LUO_POOL": "64M:shmem", "LUO_POOL_SHARDS": "8M:devdax,32M:fsdax"})
    mnt = short_dir / "mnt"
    try:
        out = host.luo("pool", "shard", "mount", "shard1", str(mnt)).stdout
        assert "mounted on" in out
        (mnt / "notes.txt").write_text("written before the update\n")
        os.sync()
        host.update()
        host.luo("finish")
        assert (mnt / "notes.txt").read_text() == "written before the update\n"  # the mount stayed
        assert any(s["owner"] == f"mount:{mnt}" for s in lp.shards(host.client()))
        host.luo("pool", "shard", "umount", "shard1")
        assert not os.path.ismount(mnt)
        host.luo("pool", "shard", "mount", "shard1", str(mnt))  # the new host: the same file system, not a new one
        assert (mnt / "notes.txt").read_text() == "written before the update\n"
        cp = host.luo("pool", "shard", "mount", "shard0", str(short_dir / "m2"), check=False)
        assert cp.returncode != 0 and "devdax" in cp.stderr
    finally:
        if os.path.ismount(mnt):
            host.luo("pool", "shard", "umount", "shard1", check=False)


def test_an_fsdax_shard_of_a_hugetlb_pool_says_why_it_cannot_mount(make_host: Callable[..., HostProcess],
                                                                    short_dir) -> None:  # noqa: ANN001
    host = make_host({"LUO_POOL": "32M:hugetlb", "LUO_POOL_SHARDS": "8M:fsdax"})
    cp = host.luo("pool", "shard", "mount", "shard0", str(short_dir / "mnt"), check=False)
    assert cp.returncode != 0 and "EOPNOTSUPP" in cp.stderr and "hugetlbfs" in cp.stderr


def test_a_crashed_host_takes_the_pool_back_and_its_vm_claims_its_ram(make_host: Callable[..., HostProcess]) -> None:
    """luod SIGKILLed with a VM running from the pool: the restarted host has the pool's memfd from
    the fd store and the map from pool.dtb; the VM's VMM registers again and claims its extent;
    a client's extent waits, preserved, for its owner."""
    import signal

    from luo.testing.processes import alive

    env = {"LUO_ALLOW_FAULTS": "1", "LUO_POOL": "512M:hugetlb"}
    host = make_host(env)
    host.luo("vm", "start", "a", "--mem", "256M", "--cpus", "1")
    more_beats(host, "a", 2)
    fd, (x,) = lp.alloc(host.client(), "client:x", 2 * M)
    write(fd, x.offset, b"survives a crash")
    os.close(fd)
    (ram,) = owner_extents(host, "vm:a")
    old = host.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), 10, "luod to die")
    again = HostProcess(host.root, env).start()
    try:
        wait_for(lambda: any(e[2] == "claimed" for e in owner_extents(again, "vm:a")), 30,
                 "the VM to register again and claim its RAM")
        assert [e[:2] for e in owner_extents(again, "vm:a")] == [ram[:2]]
        assert [e[2] for e in owner_extents(again, "client:x")] == ["preserved"]
        fd, got = lp.claim(again.client(), "client:x", x.offset)
        assert read(fd, got.offset, 16) == b"survives a crash"
        os.close(fd)
        more_beats(again, "a", 2)
    finally:
        again.stop()


def test_a_vms_ram_goes_only_with_the_vm(make_host: Callable[..., HostProcess]) -> None:
    """Nobody frees a guest's memory behind its VM: `pool free` of a VM's RAM, of a shard's, and a
    second `vm start` over RAM still in the pool are refused; `vm stop` of a VM whose VMM died
    releases it."""
    import signal

    host = make_host({"LUO_POOL": "512M:hugetlb", "LUO_POOL_SHARDS": "64M:devdax"})
    host.luo("vm", "start", "a", "--mem", "256M", "--cpus", "1")
    more_beats(host, "a", 1)
    for owner, word in (("vm:a", "vm stop a"), ("shard:shard0", "shard")):
        cp = host.luo("pool", "free", owner, check=False)
        assert cp.returncode != 0 and word in cp.stderr, cp.stderr
    vmm = next(v for v in host.client().status()["vms"] if v["name"] == "a")["pid"]
    os.kill(vmm, signal.SIGKILL)  # the guest is gone; its RAM stays the VM's until the operator says
    wait_for(lambda: next(v for v in host.client().status()["vms"] if v["name"] == "a")["link"] == "exited",
             15, "the host to see the VMM gone")
    cp = host.luo("vm", "start", "a", "--mem", "256M", "--cpus", "1", check=False)
    assert cp.returncode != 0 and "still has RAM in the pool" in cp.stderr, cp.stderr
    host.luo("vm", "stop", "a")
    assert "vm:a" not in pool_of(host)["owners"]
    host.luo("vm", "start", "a", "--mem", "256M", "--cpus", "1")
    more_beats(host, "a", 2)


def test_the_hosts_own_session_names_are_not_a_clients(make_host: Callable[..., HostProcess]) -> None:
    host = make_host({"LUO_POOL": "32M:shmem"})
    with pytest.raises(LuoError) as e:
        host.client().create_session("luo:pool")
    assert e.value.errno == errno.EPERM
