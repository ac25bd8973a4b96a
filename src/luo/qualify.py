"""``luo qualify``: does live update work from one installed version of luo to another?

A downstream user holds two installations (say two venvs) and needs evidence, before rolling
an update out, that the running one can hand a loaded host to the next one, and what happens
when it cannot. Unit tests of either version cannot say that: only the pair can. So this runs
the real thing in a private runtime dir: a host started from ``--from``, a workload of every
kind luo preserves (a VM, a global memfd, a session with a memfd and a listening TCP socket
with a connection waiting in its queue), ``update --to`` issued by the *outgoing* installation,
and checks that everything arrived bit-exact on the successor. A refused update must leave the
workload intact on the old host, so that is checked too. ``--round-trip`` goes back as well
(a rollback to the previous version is an update like any other).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from luo.client import Client
from luo.client.session import Session
from luo.errors import LuoError
from luo.testing.console import check_continuity
from luo.testing.host import HostProcess
from luo.testing.processes import alive
from luo.testing.vms import HB_MS, MARGIN_MS
from luo.testing.wait import WaitTimeout, wait_for

VM = "q"
GLOBAL_SIZE = 8 << 20
SESSION_SIZE = (4 << 20) + 17  # not a page multiple: the size must cross exactly, too
PING = b"qualify-ping"

# A short-lived client: preserves a memfd through the RFC v2 call and exits, so the host is its
# only holder (what a real agent that hands its fds to luod does).
GLOBAL_CLIENT = r"""
import hashlib, json, os, sys
from luo.client import connect
c = connect(sys.argv[1])
fd = os.memfd_create("qualify-global", os.MFD_ALLOW_SEALING)
data = os.urandom(int(sys.argv[2]))
with open(fd, "wb", closefd=False) as f:
    f.write(data)
print(json.dumps({"token": c.preserve_fd(fd), "sha": hashlib.sha256(data).hexdigest(), "size": len(data)}))
"""


def parse_command(spec: str | None) -> list[str]:
    """The ``luo`` command of an installation: this one by default; a path (a ``luo`` executable,
    or a venv directory holding ``bin/luo``); else a shell-split command line."""
    if not spec:
        return [sys.executable, "-m", "luo"]
    p = Path(spec)
    if p.is_dir() and (p / "bin" / "luo").exists():
        return [str((p / "bin" / "luo").absolute())]
    if p.exists():
        return [str(p.absolute())]  # the host runs it later, from its own cwd
    return shlex.split(spec)


class Failed(Exception):
    """A check did not hold; the message is its one-line reason."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Workload:
    """What one update must carry across, and what to compare it with afterwards."""

    token: int
    sha: str
    size: int
    session_name: str
    session: Session
    session_sha: str
    port: int
    peer: socket.socket  # connected before the update, never accepted by anyone yet

    def close(self) -> None:
        self.session.detach()
        self.peer.close()


def sha_of(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    off = 0
    while chunk := os.pread(fd, 4 << 20, off):
        h.update(chunk)
        off += len(chunk)
    return h.hexdigest(), off


def listen_queue(port: int) -> int | None:
    """Connections waiting in the accept queue of the TCP socket listening on ``port`` (None: no
    such listener). For a listening socket, /proc/net/tcp's rx_queue is that queue's length: this
    looks at the socket the old host holds without touching it."""
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        cols = row.split()
        if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # 0A: TCP_LISTEN
            return int(cols[4].split(":")[1], 16)
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class Qualification:
    def __init__(self, host: HostProcess, cmd_a: list[str], cmd_b: list[str], mem: str, cpus: int,
                 echo: Callable[[str], None]) -> None:
        self.host = host
        self.cmd_a = cmd_a
        self.cmd_b = cmd_b
        self.mem = mem
        self.cpus = cpus
        self.echo = echo
        self.checks: list[Check] = []
        self.blackouts: dict[str, float] = {}
        self.phases: dict[str, dict[str, float]] = {}
        self.vm_running = False
        self.boot_id: str | None = None
        self.workloads: list[Workload] = []
        self.leg = ""

    # -- bookkeeping -------------------------------------------------------------------
    def check(self, name: str, fn: Callable[[], str]) -> bool:
        try:
            ok, detail = True, fn()
        except Failed as e:
            ok, detail = False, str(e)
        except Exception as e:  # whatever the other version does is a finding to report, not a crash
            ok, detail = False, _one_line(e)
        self.checks.append(Check(name, ok, detail))
        self.echo(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def result(self) -> dict[str, Any]:
        return {"from": shlex.join(self.cmd_a), "to": shlex.join(self.cmd_b), "ok": self.ok,
                "checks": [asdict(c) for c in self.checks], "blackouts": self.blackouts, "phases": self.phases}

    # -- the VM ------------------------------------------------------------------------
    def start_vm(self) -> bool:
        def run() -> str:
            cp = self.host.luo("vm", "start", VM, "--mem", self.mem, "--cpus", str(self.cpus), check=False)
            if cp.returncode != 0:
                raise Failed(cp.stderr.strip().splitlines()[-1] if cp.stderr.strip() else f"exit {cp.returncode}")
            con = self.host.console(VM)
            wait_for(lambda: con.count() >= 3, 60, "the guest's first heartbeats")
            self.boot_id = con.heartbeats()[0].boot_id
            self.vm_running = True
            return f"{self.mem}, {self.cpus} vCPUs, boot id {self.boot_id}, VMM pid {self.vmm_pid()}"

        return self.check("workload: VM heartbeating", run)

    def running_vmm_pid(self) -> int:
        """The VMM pid once the host says the VM runs (it may be re-attaching right after an update)."""

        def pid() -> int | None:
            try:
                return self.vmm_pid()
            except Failed:
                return None

        return wait_for(pid, 30, f"VM {VM} to be running")

    def vmm_pid(self) -> int:
        vms = {v["name"]: v for v in self.host.client().status()["vms"]}
        if vms.get(VM, {}).get("state") != "running":
            raise Failed(f"VM {VM} is not running: {vms.get(VM)}")
        return int(vms[VM]["pid"])

    def more_beats(self, n: int = 3) -> None:
        con = self.host.console(VM)
        have = con.count()
        wait_for(lambda: con.count() >= have + n, 30, f"{n} more heartbeats")

    def vm_continuity(self, since: int, problems_before: int, max_gap_ms: float) -> str:
        """The guest's own account since heartbeat ``since``: same boot, no gap, no complaint."""
        self.more_beats()
        con = self.host.console(VM)
        beats = con.heartbeats()[max(since - 1, 0):]
        errors = check_continuity(beats, HB_MS, max_gap_ms)
        if beats and beats[-1].boot_id != self.boot_id:
            errors.insert(0, f"boot id {self.boot_id} -> {beats[-1].boot_id}")
        errors += con.problems()[problems_before:]
        if errors:
            raise Failed("; ".join(errors[:3]))
        return f"boot id {self.boot_id}, heartbeats seq {beats[0].seq}..{beats[-1].seq} without a gap, no stall"

    # -- the files ---------------------------------------------------------------------
    def preserve_workload(self, n: int) -> Workload:
        cp = subprocess.run([sys.executable, "-c", GLOBAL_CLIENT, str(self.host.root), str(GLOBAL_SIZE)],
                            capture_output=True, text=True, timeout=60)
        if cp.returncode != 0:
            raise Failed("the client preserving the global memfd failed: "
                         + (cp.stderr.strip().splitlines() or ["?"])[-1])
        g = json.loads(cp.stdout)
        c = self.host.client()
        name = f"qualify-{n}"
        sess = c.create_session(name)
        fd = os.memfd_create("qualify-session", os.MFD_ALLOW_SEALING)
        data = os.urandom(SESSION_SIZE)
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        try:
            sess.preserve_fd(fd, 1)
        finally:
            os.close(fd)  # the host holds it now, and only the host
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            ls.bind(("127.0.0.1", 0))
            ls.listen(8)
            port = ls.getsockname()[1]
            sess.preserve_fd(ls.fileno(), 2)
        finally:
            ls.close()
        peer = socket.create_connection(("127.0.0.1", port), timeout=10)
        w = Workload(int(g["token"]), g["sha"], int(g["size"]), name, sess, hashlib.sha256(data).hexdigest(),
                     port, peer)
        self.workloads.append(w)
        return w

    def files_kept(self, w: Workload, pid: int) -> str:
        """After a refused update: both memfds still preserved by the old host, bit-exact (read
        through /proc: RFC v2 has no way to look at a preserved file before an update)."""
        st = self.host.client().status()
        files = {(f.get("session"), f["token"]): f for f in st["files"] if f.get("direction") == "out"}
        sessions = {s["name"]: s for s in st["sessions"] if s.get("direction") == "out"}
        if sorted(sessions.get(w.session_name, {}).get("files", [])) != [1, 2]:
            raise Failed(f"session {w.session_name} is not preserved with fds 1 and 2: {sessions.get(w.session_name)}")
        glob = next((f for (s, t), f in files.items() if t == w.token and not s), None)
        if glob is None:
            raise Failed(f"global token {w.token} is no longer preserved")
        mine = next((f for (s, t), f in files.items() if s == w.session_name and t == 1), None)
        checked = []
        for what, entry, sha in (("global memfd", glob, w.sha), ("session memfd", mine, w.session_sha)):
            if entry is None or entry.get("fd") is None:
                continue
            try:
                fd = os.open(f"/proc/{pid}/fd/{entry['fd']}", os.O_RDONLY)
            except PermissionError:
                continue
            try:
                if sha_of(fd)[0] != sha:
                    raise Failed(f"the {what} changed on the old host")
            finally:
                os.close(fd)
            checked.append(what)
        queued = listen_queue(w.port)
        if queued is None:
            raise Failed(f"nothing listens on port {w.port} any more")
        if queued < 1:
            raise Failed(f"port {w.port} still listens, but the connection made before the update is gone")
        how = f"{' and '.join(checked)} bit-exact" if checked else "memfds listed"
        return (f"global token {w.token} and session {w.session_name} still preserved; {how}; "
                f"port {w.port} listening with {queued} connection queued")

    def files_arrived(self, w: Workload) -> None:
        c = self.host.client()
        try:
            self.check(f"{self.leg}: global memfd", lambda: self._global(c, w))
            box: list[Session] = []
            if not self.check(f"{self.leg}: session retrieved", lambda: self._retrieve(c, w, box)):
                return
            try:
                self.check(f"{self.leg}: session memfd", lambda: self._session_memfd(box[0], w))
                self.check(f"{self.leg}: session socket", lambda: self._listener(box[0], w))
                self.check(f"{self.leg}: session finished", lambda: self._session_finish(box[0]))
            finally:
                box[0].close()
        finally:
            c.close()

    def _global(self, c: Client, w: Workload) -> str:
        fd = c.restore_fd(w.token)
        try:
            sha, size = sha_of(fd)
        finally:
            os.close(fd)
        if (sha, size) != (w.sha, w.size):
            raise Failed(f"restored {size} bytes, sha256 {sha[:12]}, expected {w.size} bytes, {w.sha[:12]}")
        return f"restore_fd({w.token}): {size} bytes, sha256 {sha[:12]} as preserved"

    def _retrieve(self, c: Client, w: Workload, box: list[Session]) -> str:
        w.session.detach()  # the old host's end of it is gone
        box.append(c.retrieve_session(w.session_name))
        tokens = box[0].status().get("files")
        return f"retrieve_session({w.session_name}) from the new host, holding {tokens}"

    def _session_memfd(self, s: Session, w: Workload) -> str:
        fd = s.retrieve_fd(1)
        try:
            sha, size = sha_of(fd)
        finally:
            os.close(fd)
        if sha != w.session_sha or size != SESSION_SIZE:
            raise Failed(f"{size} bytes, sha256 {sha[:12]}, expected {SESSION_SIZE} bytes, {w.session_sha[:12]}")
        return f"retrieve_fd(1): {size} bytes, sha256 {sha[:12]} as preserved"

    def _session_finish(self, s: Session) -> str:
        s.finish()
        return "finished"

    def _listener(self, s: Session, w: Workload) -> str:
        listener = socket.socket(fileno=s.retrieve_fd(2))
        try:
            if listener.getsockname()[1] != w.port:
                raise Failed(f"fd 2 listens on port {listener.getsockname()[1]}, not {w.port}")
            listener.settimeout(10)
            conn, _ = listener.accept()
        except TimeoutError:
            raise Failed(f"port {w.port}: the connection made before the update is not in the queue") from None
        finally:
            listener.close()
        with conn:
            conn.settimeout(10)
            w.peer.sendall(PING)
            got = b""
            while len(got) < len(PING) and (chunk := conn.recv(64)):
                got += chunk
        if got != PING:
            raise Failed(f"port {w.port}: accepted, but read {got!r}")
        return f"port {w.port}: accepted the connection queued before the update, data flows"

    # -- one update ----------------------------------------------------------------------
    def run_leg(self, leg: str, cmd_out: list[str], cmd_in: list[str], n: int) -> bool:
        """Update from ``cmd_out`` (which issues it) to ``cmd_in``; False if it did not happen."""
        self.leg = leg
        self.host.command = cmd_out
        self.echo(f"== {leg}: {shlex.join(cmd_out)} -> {shlex.join(cmd_in)}")
        box: list[Workload] = []

        def preserve() -> str:
            w = self.preserve_workload(n)
            box.append(w)
            return (f"global memfd token {w.token} ({w.size} bytes), session {w.session_name}: memfd "
                    f"({SESSION_SIZE} bytes) + listening socket :{w.port} with a connection queued")

        if not self.check(f"{leg}: workload preserved", preserve):
            return False
        w = box[0]
        old_pid = self.host.pid
        con = self.host.console(VM)
        beats_before, problems_before = con.count(), len(con.problems())
        vmm: list[int] = []

        def vm_before() -> str:
            vmm.append(self.running_vmm_pid())
            return f"VMM pid {vmm[0]}, {con.count()} heartbeats so far"

        if self.vm_running and not self.check(f"{leg}: VM running before the update", vm_before):
            return False
        old_vmm = vmm[0] if vmm else None
        out: dict[str, Any] = {}

        def update() -> str:
            try:
                cp = self.host.luo("update", "--to", shlex.join(cmd_in), "--json", check=False, timeout=180)
            except subprocess.TimeoutExpired:
                raise Failed("`luo update` did not return within 180 s") from None
            if cp.returncode != 0:
                lines = cp.stderr.strip().splitlines()
                raise Failed(lines[-1] if lines else f"exit {cp.returncode}, no message")
            out.update(json.loads(cp.stdout))
            return (f"host pid {out['old_pid']} -> {out['new_pid']}, liveupdate-number "
                    f"{out.get('liveupdate_number')}, total {out['total_ms']:.1f} ms")

        if not self.check(f"{leg}: update", update):
            self.intact_on_old_host(leg, w, old_pid, old_vmm, beats_before, problems_before)
            return False
        self.host.command = cmd_in
        self.phases[leg] = out.get("phases_ms", {})
        self.check(f"{leg}: new host", lambda: self._new_host(old_pid, int(out["new_pid"])))
        self.files_arrived(w)
        if self.vm_running:
            vm = out.get("vms", {}).get(VM) or {}
            blackout = vm.get("blackout_ms")
            if isinstance(blackout, int | float):
                self.blackouts[leg] = float(blackout)

            def reported() -> str:
                if not isinstance(blackout, int | float) or blackout <= 0:
                    raise Failed(f"no blackout reported for VM {VM}: {vm}")
                parts = ", ".join(f"{k} {v:.2f}" for k, v in vm.get("parts_ms", {}).items())
                return f"{blackout:.2f} ms ({parts})"

            self.check(f"{leg}: VM blackout reported", reported)
            self.check(f"{leg}: VM continuity",
                       lambda: self._vm_moved(old_vmm) + "; " + self.vm_continuity(
                           beats_before, problems_before, float(blackout or 0) + MARGIN_MS))
        self.check(f"{leg}: finish", self._finish)
        return True

    def _new_host(self, old_pid: int | None, new_pid: int) -> str:
        if new_pid == old_pid:
            raise Failed(f"the host pid is still {old_pid}")
        if self.host.pid != new_pid:
            raise Failed(f"luod.pid names {self.host.pid}, the update reported {new_pid}")
        if not alive(new_pid):
            raise Failed(f"new host pid {new_pid} is not running")
        if old_pid is not None:
            wait_for(lambda: not alive(old_pid), 10, f"the old host (pid {old_pid}) to exit")
        return f"pid {new_pid} (was {old_pid}, which exited), named by luod.pid, state {self.host.state()}"

    def _vm_moved(self, old_vmm: int | None) -> str:
        def moved() -> int | None:
            try:
                pid = self.vmm_pid()
            except Failed:
                return None
            return pid if pid != old_vmm else None

        return f"VMM pid {old_vmm} -> {wait_for(moved, 30, 'the VM to run on its successor VMM')}"

    def _finish(self) -> str:
        cp = self.host.luo("finish", check=False)
        if cp.returncode != 0:
            raise Failed((cp.stderr.strip().splitlines() or [f"exit {cp.returncode}"])[-1])
        if self.host.state() != "normal":
            raise Failed(f"state is {self.host.state()} after finish")
        return "state normal"

    def intact_on_old_host(self, leg: str, w: Workload, old_pid: int | None, old_vmm: int | None,
                           beats_before: int, problems_before: int) -> None:
        """A refused update must change nothing: same host, same VMM, every file still preserved."""

        def host() -> str:
            pid, state = self.host.pid, self.host.state()
            if pid != old_pid or old_pid is None or not alive(old_pid):
                raise Failed(f"host pid {old_pid} -> {pid} (alive: {old_pid is not None and alive(old_pid)})")
            if state != "normal":
                raise Failed(f"state is {state}, not normal")
            return f"host pid {old_pid} unchanged and running, state normal"

        self.check(f"{leg}: intact on the old host: host", host)
        if self.vm_running:
            def vm() -> str:
                pid = self.running_vmm_pid()
                if pid != old_vmm:
                    raise Failed(f"VMM pid {old_vmm} -> {pid}")
                return f"same VMM pid {pid}; " + self.vm_continuity(beats_before, problems_before, MARGIN_MS)

            self.check(f"{leg}: intact on the old host: VM", vm)
        self.check(f"{leg}: intact on the old host: files", lambda: self.files_kept(w, old_pid or 0))

    def close(self) -> None:
        for w in self.workloads:
            w.close()


def format_table(q: Qualification) -> str:
    width = max((len(c.name) for c in q.checks), default=0)
    lines = [f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in q.checks]
    passed = sum(c.ok for c in q.checks)
    lines.append(f"== {'PASS' if q.ok else 'FAIL'}: {passed}/{len(q.checks)} checks passed, "
                 f"from {shlex.join(q.cmd_a)} to {shlex.join(q.cmd_b)}")
    return "\n".join(lines)


def run_qualify(from_cmd: str | None = None, to_cmd: str | None = None, mem: str = "256M", cpus: int = 2,
                round_trip: bool = False, as_json: bool = False, runtime_dir: str | None = None) -> int:
    """Qualify live update from ``from_cmd``'s installation to ``to_cmd``'s; 0 if every check passed."""
    cmd_a, cmd_b = parse_command(from_cmd), parse_command(to_cmd)
    made = runtime_dir is None
    if runtime_dir and Path(runtime_dir).exists() and any(Path(runtime_dir).iterdir()):
        # it ends by killing every process that names its runtime dir: never a live host's
        raise LuoError(errno.EEXIST, f"qualify needs a runtime dir of its own; {runtime_dir} is not empty")
    root = Path(runtime_dir) if runtime_dir else Path(tempfile.mkdtemp(prefix="luo-q-", dir="/tmp")) / "rt"
    out = sys.stderr if as_json else sys.stdout

    def echo(line: str) -> None:
        print(line, file=out, flush=True)

    def progress(line: str) -> None:
        if not line.startswith("PASS"):
            echo(line)  # legs and failures as they happen; every check in the table at the end

    host = HostProcess(root, command=cmd_a)
    q = Qualification(host, cmd_a, cmd_b, mem, cpus, progress)
    echo(f"== luo qualify: from {shlex.join(cmd_a)} to {shlex.join(cmd_b)}, runtime dir {root}")
    try:
        if q.check("host started", lambda: _start(host)):
            q.start_vm()
            went = q.run_leg("A->B", cmd_a, cmd_b, 1)
            if round_trip and went:
                q.run_leg("B->A", cmd_b, cmd_a, 2)
            elif round_trip:
                q.checks.append(Check("B->A: update", False, "not attempted: the update A->B did not happen"))
    finally:
        q.close()
        host.stop()
    echo("== checks")
    echo(format_table(q))
    if as_json:
        print(json.dumps(q.result()))
    if made:
        if q.ok:
            shutil.rmtree(root.parent, ignore_errors=True)
        else:
            echo(f"== logs kept in {root} (luod.log, vms/{VM}/console.log, vms/{VM}/vmm.log)")
    return 0 if q.ok else 1


def _start(host: HostProcess) -> str:
    try:
        host.start(timeout=60)
    except (LuoError, OSError, WaitTimeout) as e:
        tail = host.log_tail(1)
        raise Failed(_one_line(e) + (f"; luod.log: {tail}" if tail and tail not in str(e) else "")) from None
    return f"pid {host.pid}, {shlex.join(host.command)}"
