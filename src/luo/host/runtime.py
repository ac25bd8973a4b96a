"""Where a host keeps its public files: the runtime dir and what lives in it.

``state`` and ``luod.pid`` are replaced atomically (write + rename) so a reader never sees a
torn value, even while the host is being replaced by its successor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUNTIME_DIR = "/run/luo"


def resolve_runtime_dir(arg: str | None = None) -> Path:
    return Path(arg or os.environ.get("LUO_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class RuntimeDir:
    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "liveupdate"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def pidfile(self) -> Path:
        return self.root / "luod.pid"

    @property
    def updates(self) -> Path:
        return self.root / "updates"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    def vm_dir(self, name: str) -> Path:
        return self.vms / name

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.updates.mkdir(exist_ok=True)
        self.vms.mkdir(exist_ok=True)

    def write_state(self, label: str) -> None:
        write_atomic(self.state, label + "\n")

    def write_pid(self, pid: int) -> None:
        write_atomic(self.pidfile, f"{pid}\n")

    def read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
