"""A real luo host in a private runtime dir, for tests, benchmarks and the demo."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from luo.client import Client
from luo.client.connection import open_socket
from luo.errors import LuoError
from luo.host.runtime import RuntimeDir
from luo.testing.console import Console
from luo.testing.processes import kill_all


class HostProcess:
    """A host in ``root``. ``command`` is the ``luo`` of the installation to run (default: this one);
    it starts the host and runs ``luo(...)``. It may be changed after an update to another version,
    so that the host's own installation drives it."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        self.rt = RuntimeDir(Path(root))
        self.command: list[str] = list(command) if command else [sys.executable, "-m", "luo"]
        self.env = {**os.environ, **(env or {})}
        self.env.pop("LUO_RUNTIME_DIR", None)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> Path:
        return self.rt.root

    @property
    def log(self) -> Path:
        return self.root / "luod.log"

    def start(self, timeout: float = 30.0) -> HostProcess:
        self.rt.ensure()
        logf = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen([*self.command, "--runtime-dir", str(self.root), "host"],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self.env,
                                         start_new_session=True)
        finally:
            logf.close()
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        """Wait for the control socket, but not for a host that already exited (a wrong command)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                open_socket(self.rt.socket, max(0.0, min(0.5, deadline - time.monotonic()))).close()
                return
            except LuoError as e:
                if e.errno != errno.ECONNREFUSED or time.monotonic() >= deadline:
                    raise
                code = self.proc.poll() if self.proc is not None else None
                if code is not None:
                    raise LuoError(errno.ESRCH, f"host {' '.join(self.command)} exited (status {code}) before "
                                   f"listening: {self.log_tail(1) or 'nothing in luod.log'}") from None

    @property
    def pid(self) -> int | None:
        return self.rt.read_pid()

    def state(self) -> str:
        return self.rt.state.read_text().strip()

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.root, timeout=timeout)

    def luo(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the real ``luo`` command against this host."""
        cp = subprocess.run([*self.command, "--runtime-dir", str(self.root), *args],
                            capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and cp.returncode != 0:
            raise AssertionError(f"luo {' '.join(args)} failed ({cp.returncode}): {cp.stderr.strip()}\n"
                                 f"--- luod.log ---\n{self.log_tail()}")
        return cp

    def update(self, *extra: str, timeout: float = 120.0) -> dict[str, Any]:
        return json.loads(self.luo("update", "--json", *extra, timeout=timeout).stdout)

    def console(self, vm: str) -> Console:
        return Console(self.rt.vm_dir(vm) / "console.log")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        kill_all(self.root)
        if self.proc is not None:
            self.proc.wait()

    def __enter__(self) -> HostProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
