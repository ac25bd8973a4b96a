"""2000 fds through the keeper: all come back right, and how long it takes (printed with -s, and
recorded as test properties). The bounds asserted are loose (a loaded CI machine); the numbers
are the point."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from keeper_helpers import content_of

from luo.keeper.client import KeeperStore

N = 2000


def test_2000_fds(store: KeeperStore, memfd: Callable[..., int], record_property: Callable[[str, object], None],
                  capsys: pytest.CaptureFixture[str]) -> None:
    fds = {f"session/{i // 100}/file/{i}": memfd(f"file {i}".encode()) for i in range(N)}

    t0 = time.perf_counter()
    store.put_many(fds.items())
    t_put_many = time.perf_counter() - t0

    t0 = time.perf_counter()
    meta, loaded = store.load()
    t_load = time.perf_counter() - t0
    try:
        assert meta is None and sorted(loaded) == sorted(fds)
        for key, fd in loaded.items():
            assert content_of(fd) == content_of(fds[key])
            assert os.fstat(fd).st_ino == os.fstat(fds[key]).st_ino
    finally:
        for fd in loaded.values():
            os.close(fd)

    t0 = time.perf_counter()
    for key, fd in fds.items():  # one at a time, as luod mirrors a preserve
        store.put(key, fd)
    t_put = (time.perf_counter() - t0) / N

    keys = list(fds)
    t0 = time.perf_counter()
    for key in keys[:500]:  # one at a time, as luod mirrors an unpreserve
        store.drop([key])
    t_drop = (time.perf_counter() - t0) / 500

    t0 = time.perf_counter()
    store.drop(keys[500:])
    t_drop_many = time.perf_counter() - t0
    assert store.ping()["count"] == 0

    numbers = {"put_many_2000_ms": t_put_many * 1e3, "load_2000_ms": t_load * 1e3, "put_each_us": t_put * 1e6,
               "drop_each_us": t_drop * 1e6, "drop_1500_batched_ms": t_drop_many * 1e3}
    for name, value in numbers.items():
        record_property(name, round(value, 2))
    with capsys.disabled():
        print("\nkeeper, 2000 fds: " + ", ".join(f"{k} {v:.2f}" for k, v in numbers.items()))
    assert t_put_many < 2 and t_load < 2 and t_put < 1e-3 and t_drop < 1e-3
