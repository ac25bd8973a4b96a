"""The RFC v2 global states, numbered as the UAPI enum."""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    NORMAL = 0
    PREPARED = 1
    FROZEN = 2
    UPDATED = 3

    @property
    def label(self) -> str:
        """The word the state file holds (``/sys/kernel/liveupdate/state``)."""
        return self.name.lower()


class Event(enum.Enum):
    PREPARE = "prepare"
    FREEZE = "freeze"
    CANCEL = "cancel"
    FINISH = "finish"
