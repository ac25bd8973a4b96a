"""What crosses the update, as plain data: the LUO part of the KHO tree.

The core produces and consumes these records; ``luo.kho`` turns them into a flattened device
tree and back. Keeping them free of FDT details lets the state machine be tested without libfdt
and lets the tree format change behind a new compatible string.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FileRecord:
    token: int
    compatible: str
    data: int
    fd_index: int  # position of this file's fd in the handover fd array
    meta: dict[str, str] = field(default_factory=dict)  # owner, size...: for status only


@dataclass(frozen=True)
class SessionRecord:
    name: str
    files: tuple[FileRecord, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryRange:
    """One preserved memory object (a memfd) in the handover: the KHO preserved-memory map."""

    fd_index: int
    size: int
    name: str = ""


@dataclass(frozen=True)
class LuoRecord:
    liveupdate_number: int
    subsystems: dict[str, int] = field(default_factory=dict)
    files: tuple[FileRecord, ...] = ()  # the RFC v2 global table
    sessions: tuple[SessionRecord, ...] = ()

    def all_files(self) -> list[FileRecord]:
        out = list(self.files)
        for s in self.sessions:
            out.extend(s.files)
        return out

    def compatibles(self) -> set[str]:
        return {f.compatible for f in self.all_files()}
