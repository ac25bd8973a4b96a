"""Who takes part: registered subsystems and file handlers, in registration order.

Order matters: the first handler whose ``can_preserve`` accepts a file owns it, and subsystems
are called in registration order (the kernel's list order). The registry checks names only;
*when* registering is allowed is the state machine's business (``transitions.OPERATIONS``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from luo.core.calls import guarded
from luo.core.participants import COMPATIBLE_MAX, FileHandler, Subsystem
from luo.errors import LuoError


@dataclass
class SubsystemSlot:
    """A registered subsystem and what the outgoing side knows about it."""

    subsystem: Subsystem
    data: int = 0  # from prepare, refreshed by freeze: goes into the outgoing tree
    prepared: bool = False
    frozen: bool = False

    @property
    def name(self) -> str:
        return self.subsystem.name


def _check_compatible(compatible: object) -> str:
    if not isinstance(compatible, str) or not compatible:
        raise LuoError(errno.EINVAL, f"handler compatible {compatible!r} must be a non-empty string")
    if len(compatible.encode()) > COMPATIBLE_MAX:
        raise LuoError(
            errno.EINVAL, f"handler compatible {compatible!r} is longer than {COMPATIBLE_MAX} bytes"
        )
    if "\0" in compatible:
        raise LuoError(errno.EINVAL, f"handler compatible {compatible!r} contains a NUL")
    return compatible


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "\0" in name:
        raise LuoError(errno.EINVAL, f"subsystem name {name!r} must be a non-empty string without NUL")
    return name


class Registry:
    def __init__(self) -> None:
        self._handlers: list[FileHandler] = []
        self._subsystems: list[SubsystemSlot] = []

    # handlers

    @property
    def handlers(self) -> list[FileHandler]:
        return list(self._handlers)

    def add_handler(self, handler: FileHandler) -> None:
        compatible = _check_compatible(getattr(handler, "compatible", None))
        if self.handler_for(compatible) is not None:
            raise LuoError(errno.EEXIST, f"a handler for {compatible!r} is already registered")
        self._handlers.append(handler)

    def remove_handler(self, compatible: str) -> FileHandler:
        handler = self.handler_for(compatible)
        if handler is None:
            raise LuoError(errno.ENOENT, f"no handler registered for {compatible!r}")
        self._handlers.remove(handler)
        return handler

    def handler_for(self, compatible: str) -> FileHandler | None:
        for handler in self._handlers:
            if handler.compatible == compatible:
                return handler
        return None

    def owner_of(self, fd: int) -> FileHandler:
        """The first handler that accepts ``fd``; ``-ENOENT`` when none does (e.g. /dev/null)."""
        for handler in self._handlers:
            if guarded(lambda h=handler: bool(h.can_preserve(fd)), f"handler {handler.compatible} can_preserve"):
                return handler
        raise LuoError(errno.ENOENT, f"no registered handler can preserve fd {fd}")

    # subsystems

    @property
    def slots(self) -> list[SubsystemSlot]:
        return list(self._subsystems)

    def add_subsystem(self, subsystem: Subsystem) -> None:
        name = _check_name(getattr(subsystem, "name", None))
        if self.slot(name) is not None:
            raise LuoError(errno.EEXIST, f"a subsystem named {name!r} is already registered")
        self._subsystems.append(SubsystemSlot(subsystem))

    def remove_subsystem(self, name: str) -> Subsystem:
        slot = self.slot(name)
        if slot is None:
            raise LuoError(errno.ENOENT, f"no subsystem named {name!r}")
        self._subsystems.remove(slot)
        return slot.subsystem

    def slot(self, name: str) -> SubsystemSlot | None:
        for slot in self._subsystems:
            if slot.name == name:
                return slot
        return None
