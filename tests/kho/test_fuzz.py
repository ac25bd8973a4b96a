"""Damaged blobs give LuoError or a valid parse: never another exception, never a crash.

libfdt reads raw memory, so a crash here would be a segfault of the whole host; that is why
the reader checks the header in Python and runs fdt_check_full before any other call.
"""

from __future__ import annotations

import random
import re

import pytest

from luo.errors import LuoError
from luo.kho import parse_tree, required_compatibles, to_dts
from luo.kho.validate import validate

_SAFETY_NET = re.compile(r"\(\w+(Error|Exception):")


def _expected(e: LuoError) -> None:
    # The catch-all turning a stray exception into LuoError is a last resort: every refusal
    # the fuzzer finds must come from an explicit check with its own sentence.
    assert not _SAFETY_NET.search(e.message), e.message


def _try_all(blob: bytes) -> bool:
    """Run every reader over ``blob``; True if parse_tree accepted it."""
    accepted = False
    try:
        luo, memory = parse_tree(blob)
        validate(luo, memory)  # what parses must also be a valid handover
        accepted = True
    except LuoError as e:
        _expected(e)
    for reader in (required_compatibles, to_dts):
        try:
            reader(blob)
        except LuoError as e:
            _expected(e)
    return accepted


def test_byte_flips(blob: bytes) -> None:
    rng = random.Random(20250515)
    accepted = 0
    for _ in range(3000):
        bad = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(bad))
            bad[i] = rng.randrange(256) if rng.random() < 0.5 else bad[i] ^ (1 << rng.randrange(8))
        accepted += _try_all(bytes(bad))
    # Some flips land in values (a data byte, a meta character) and are legitimately accepted;
    # most must be refused.
    assert 0 < accepted < 3000


def test_every_truncation(blob: bytes) -> None:
    for n in range(len(blob)):
        assert not _try_all(blob[:n]), f"a blob cut to {n} bytes was accepted"


def test_header_field_corruption(blob: bytes) -> None:
    rng = random.Random(7)
    for _ in range(2000):
        bad = bytearray(blob)
        field = rng.randrange(10) * 4
        bad[field : field + 4] = (
            rng.randbytes(4) if rng.random() < 0.5 else (rng.randrange(len(blob) + 64)).to_bytes(4, "big")
        )
        _try_all(bytes(bad))


@pytest.mark.slow
def test_byte_flips_long(blob: bytes) -> None:
    rng = random.Random(1)
    for _ in range(30000):
        bad = bytearray(blob)
        for _ in range(rng.randint(1, 16)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        _try_all(bytes(bad))
