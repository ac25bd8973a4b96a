"""What a host registers at start: handlers, subsystems, and the compatibles it understands."""

from __future__ import annotations

from collections.abc import Sequence

from luo.core.participants import FileHandler, Subsystem
from luo.host.runtime import RuntimeDir
from luo.kho import TREE_COMPATIBLES


def host_subsystems(runtime: RuntimeDir) -> list[Subsystem]:
    return []


def known_compatibles(handlers: Sequence[FileHandler]) -> set[str]:
    return set(TREE_COMPATIBLES) | {h.compatible for h in handlers}
