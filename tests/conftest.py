from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path for runtime dirs: AF_UNIX socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="luo-t-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
