from __future__ import annotations

import pytest
from core_participants import World


@pytest.fixture
def world() -> World:
    return World()
