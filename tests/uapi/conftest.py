"""C programs that use /dev/liveupdate as the kernel defines it, run under ``luo run``.

The programs (tests/uapi/c) are built once per session with the machine's gcc, dynamic and
``-static``; every test that takes ``progs`` runs for both. A program prints one line per
check (``ok N - ...`` / ``not ok N - ...``) and exits non-zero if any failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from luo.testing.host import HostProcess
from luo.testing.processes import alive
from luo.testing.wait import wait_for

C_DIR = Path(__file__).parent / "c"
PROGRAMS = ("luo_api", "luo_rfcv2", "luo_twostage", "luo_fork_exec", "luo_threads")
CFLAGS = ["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread"]
RUN_TIMEOUT = 60.0


@dataclass
class Programs:
    linkage: str  # "dynamic" or "static"
    paths: dict[str, Path]

    def __getitem__(self, name: str) -> str:
        return str(self.paths[name])


def compile_programs(gcc: str, out: Path, static: bool) -> dict[str, Path]:
    """Build every program into ``out`` (in parallel); raise with gcc's output on failure."""
    procs = {}
    for name in PROGRAMS:
        argv = [gcc, *CFLAGS, *(["-static"] if static else []), "-I", str(C_DIR),
                "-o", str(out / name), str(C_DIR / f"{name}.c")]
        procs[name] = (argv, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    errors = []
    for argv, p in procs.values():
        output, _ = p.communicate(timeout=120)
        if p.returncode != 0:
            errors.append(f"{' '.join(argv)}\n{output}")
    if errors:
        raise RuntimeError("gcc failed:\n" + "\n".join(errors))
    return {name: out / name for name in PROGRAMS}


def static_libc_present(gcc: str) -> bool:
    got = subprocess.run([gcc, "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(got) and os.path.exists(got)


@pytest.fixture(scope="session")
def gcc() -> str:
    path = shutil.which("gcc")
    if path is None:
        pytest.skip("gcc is not installed: the /dev/liveupdate C test programs cannot be built")
    return path


@pytest.fixture(scope="session", params=["dynamic", "static"])
def progs(request: pytest.FixtureRequest, gcc: str, tmp_path_factory: pytest.TempPathFactory) -> Programs:
    static = request.param == "static"
    if static and not static_libc_present(gcc):
        pytest.skip("static C programs need libc.a (Debian: libc6-dev)")
    out = tmp_path_factory.mktemp(f"uapi-{request.param}")
    return Programs(request.param, compile_programs(gcc, out, static))


@pytest.fixture(scope="session")
def luo_run_available() -> None:
    cp = subprocess.run([sys.executable, "-m", "luo", "run", "--help"], capture_output=True, text=True, timeout=60)
    if cp.returncode != 0:
        pytest.skip(f"`luo run` is not available yet: {(cp.stderr or cp.stdout).strip().splitlines()[-1:]}")


@pytest.fixture
def host(short_dir: Path) -> Iterator[HostProcess]:
    h = HostProcess(short_dir / "rt")
    try:
        h.start()
        yield h
    finally:
        h.stop()  # also after a failed start: what it started (its keeper) must not linger


# -- running programs under `luo run` ----------------------------------------------------


@dataclass
class Ran:
    argv: list[str]
    returncode: int
    out: str
    err: str
    host_log: str = ""

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def describe(self) -> str:
        failed = [ln for ln in self.lines if ln.startswith(("not ok", "Bail out!", "#   "))]
        return (f"`{' '.join(self.argv)}` exited {self.returncode}\n"
                f"--- failed checks ---\n" + "\n".join(failed) +
                f"\n--- stdout ---\n{self.out}--- stderr ---\n{self.err}--- luod.log (tail) ---\n{self.host_log}")

    def assert_passed(self) -> Ran:
        oks = [ln for ln in self.lines if ln.startswith("ok ")]
        bad = [ln for ln in self.lines if ln.startswith(("not ok", "Bail out!"))]
        assert self.returncode == 0 and not bad and oks, self.describe()
        return self


@dataclass
class Program:
    """A program started under ``luo run`` (stdout and stderr go to files, never pipes: whatever
    ``luo run`` leaves serving in the background may keep inherited pipes open)."""

    host: HostProcess
    argv: list[str]
    out_path: Path
    err_path: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def start(self, stdin: bool) -> Program:
        cmd = [sys.executable, "-m", "luo", "--runtime-dir", str(self.host.root), "run", "--", *self.argv]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=self.host.env, start_new_session=True)
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def ran(self, returncode: int) -> Ran:
        return Ran(self.argv, returncode, self.output(), self.err_path.read_text(errors="replace"),
                   self.host.log_tail(30))

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        """The first output line starting with ``prefix``; fails at once if the program exits first."""
        def found() -> str | None:
            for ln in self.output().splitlines():
                if ln.startswith(prefix):
                    return ln
            if self.proc.poll() is not None:
                raise AssertionError(f"program exited before printing {prefix!r}:\n"
                                     + self.ran(self.proc.returncode).describe())
            return None
        return wait_for(found, timeout, f"{prefix!r} from {self.argv[0]}")

    def send(self, text: str = "go\n") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait(self, timeout: float = RUN_TIMEOUT) -> Ran:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"timed out after {timeout:g} s:\n" + self.ran(-1).describe()) from None
        finally:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        return self.ran(rc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()


class Runner:
    """Starts programs under ``luo run`` on one host; ends whatever is left at teardown."""

    def __init__(self, host: HostProcess, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir
        self.started: list[Program] = []
        self.pids: list[int] = []  # other processes to end (holders found through pid files)

    def start(self, *argv: str, stdin: bool = False) -> Program:
        n = len(self.started)
        stem = f"{n:02d}-{Path(argv[0]).name}"
        p = Program(self.host, list(argv), self.workdir / f"{stem}.out", self.workdir / f"{stem}.err")
        self.started.append(p.start(stdin))
        return p

    def run(self, *argv: str, timeout: float = RUN_TIMEOUT) -> Ran:
        return self.start(*argv).wait(timeout)

    def cleanup(self) -> None:
        for p in self.started:
            p.kill()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def luo(host: HostProcess, luo_run_available: None, tmp_path: Path) -> Iterator[Runner]:
    r = Runner(host, tmp_path)
    yield r
    r.cleanup()


# -- looking at the host ------------------------------------------------------------------


def status(host: HostProcess) -> dict[str, Any]:
    return json.loads(host.luo("status", "--json").stdout)


def sessions(host: HostProcess) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in status(host)["sessions"]}


def read_pid(path: Path, timeout: float = 10.0) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), timeout, f"pid file {path}"))


def wait_dead(pid: int, timeout: float) -> None:
    wait_for(lambda: not alive(pid), timeout, f"process {pid} to end")


def pattern(seed: int, length: int) -> bytes:
    """The bytes luo_memfd() of check.h writes: the same function of seed and offset."""
    return bytes(((off * 131 + seed * 7 + (off >> 12)) & 0xFF) for off in range(length))


def settle(seconds: float = 0.2) -> None:
    """A short pause before asserting that nothing changes (never used to wait for a change)."""
    time.sleep(seconds)
