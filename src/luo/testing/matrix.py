"""The fault matrix: one participant failing at one event in one way, under a real host with a VM.

Each cell starts a host with ``LUO_FAULTS=fault=<participant>:<event>:<kind>`` (luo.host.faults),
a probe subsystem, the probe file handler and a 1-vCPU guest; preserves a global memfd (its client
exits, so only the host holds it) and a session memfd of the probe handler; runs the event (an
update; for ``cancel`` an update whose freeze fails in a second probe; for ``finish`` an update
then ``luo finish``); then checks what the rules promise, whatever happened:

- the update either completed or rolled back, and a host serves (when the fault killed the host
  and nothing took over, a new host is started, as systemd's ``Restart=`` would);
- every guest runs again in exactly one VMM, and its heartbeats go on (except where a VMM died
  while running its guest: nothing can recover a CPU state that was never saved; the guest is
  then reported ``lost``, never ``running``);
- the host that serves holds every preserved memfd, same inode, same sha256;
- ``<runtime>/state`` says what the host says.

``run_cell`` returns the cell's outcome; tests and ``bench/fault_matrix.py`` (the table in
docs/reliability.md) share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from luo.errors import LuoError
from luo.testing.host import HostProcess
from luo.testing.processes import alive, kill_all
from luo.testing.vms import vmm_processes
from luo.testing.wait import wait_for
from luo.vmm.live.guest_state import read_guest_state

EVENTS: dict[str, tuple[str, ...]] = {
    "handler": ("prepare", "freeze", "cancel", "finish"),
    "subsystem": ("prepare", "freeze", "cancel", "finish"),
    "vmm": ("prepare", "freeze", "handover", "cancel", "finish"),
    "successor": ("prepare", "handover", "cancel"),
    "vmm-successor": ("prepare", "freeze", "handover", "cancel", "finish"),
}
KINDS = ("error", "crash", "hang")
CELLS = [(p, e, k) for p, events in EVENTS.items() for e in events for k in KINDS]
TIMEOUT_S = 3  # LUO_PARTICIPANT_TIMEOUT in the cells: how long anyone waits on a hung participant

# A VMM that dies while it runs its guest takes the guest's CPU state with it (it was never
# saved): the one loss no orchestrator can undo. Outside an update it is the same.
GUEST_DIES_WITH_ITS_VMM = {("vmm", "prepare", "crash"), ("vmm", "cancel", "crash"),
                           ("vmm-successor", "finish", "crash")}

PRESERVE_AND_EXIT = r"""
import json, os, sys
from luo.client import connect
c = connect(sys.argv[1])
fd = os.memfd_create("matrix-global", os.MFD_ALLOW_SEALING)
os.write(fd, os.urandom(1 << 20))
print(json.dumps({"token": c.preserve_fd(fd)}))
"""


@dataclass
class Outcome:
    update: str = ""  # completed | rolled back | taken over
    host: str = ""  # how a host serves afterwards: the same, the successor, restarted
    guest: str = ""  # running | lost
    fds: str = ""  # kept
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        return f"{self.update}; {self.host}; guest {self.guest}; fds {self.fds}"


def _sha_and_ino(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.fstat(f.fileno()).st_ino


WATCHED = ("/memfd:matrix-global", "/memfd:luo-probe-matrix")


def _held_by(pid: int) -> dict[int, str]:
    """inode -> sha256 of the cell's two memfds, as far as the process holds them."""
    out: dict[int, str] = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        p = f"/proc/{pid}/fd/{n}"
        try:
            if os.readlink(p).startswith(WATCHED):
                sha, ino = _sha_and_ino(p)
                out[ino] = sha
        except OSError:
            pass
    return out


def _fd_sha_ino(fd: int) -> tuple[str, int]:
    return _sha_and_ino(f"/proc/self/fd/{fd}")


def _serving(host: HostProcess) -> int | None:
    pid = host.pid
    if pid is None or not alive(pid):
        return None
    try:
        host.client(timeout=0.5).status()
    except LuoError:
        return None
    return pid


def run_cell(root: Path, participant: str, event: str, kind: str) -> Outcome:
    spec = f"fault={participant}:{event}:{kind}"
    env = {"LUO_ALLOW_FAULTS": "1", "LUO_FAULTS": spec, "LUO_PROBE_HANDLER": "1",
           "LUO_PARTICIPANT_TIMEOUT": str(TIMEOUT_S), "LUO_PROBES": "m" + (",x:freeze" if event == "cancel" else "")}
    host = HostProcess(root, env).start()
    out = Outcome()
    try:
        return _run(host, root, participant, event, kind, out)
    finally:
        kill_all(root)


def _run(host: HostProcess, root: Path, participant: str, event: str, kind: str, out: Outcome) -> Outcome:
    host.luo("vm", "start", "m1", "--mem", "128M", "--cpus", "1", "--cmdline", "hb_ms=50 stall_ms=0")
    wait_for(lambda: host.console("m1").count() >= 2, 60, "the guest's first heartbeats")
    cp = subprocess.run([sys.executable, "-c", PRESERVE_AND_EXIT, str(root)], capture_output=True, text=True,
                        check=True, env=host.env)
    token = json.loads(cp.stdout)["token"]
    c = host.client()
    sess = c.create_session("matrix")
    fd = os.memfd_create("luo-probe-matrix", os.MFD_ALLOW_SEALING)
    os.write(fd, os.urandom(1 << 20))
    sess.preserve_fd(fd, 3)
    before = _held_by(host.pid or 0)
    os.close(fd)
    assert len(before) == 2, before
    first = host.pid

    upd = subprocess.run([*host.command, "--runtime-dir", str(root), "update", "--json"], capture_output=True,
                         text=True, env=host.env, timeout=120)
    retrieved: dict[int, str] = {}
    if event == "finish" and upd.returncode == 0:
        # finish discards what nobody retrieved: take both files back first, then finish
        c2 = host.client()
        for got in (c2.restore_fd(token), c2.retrieve_session("matrix").retrieve_fd(3)):
            sha, ino = _fd_sha_ino(got)
            retrieved[ino] = sha
        assert retrieved == before, "retrieved files differ from the preserved ones"
        host.luo("finish", check=False, timeout=60)
    # a host serves again: the same, its successor, or (nobody left) a restarted one
    pid = None
    try:
        pid = wait_for(lambda: _serving(host), 3 * TIMEOUT_S + 5, "a host to serve")
    except AssertionError:
        kill_hung_host(host)
        host = HostProcess(root, env_without_faults(host.env)).start()
        pid = host.pid
        out.host = "restarted (recovered from the keeper)"
    if not out.host:
        out.host = "the same host" if pid == first else "the successor"
    st = host.client().status()
    if st.get("recovered") and not out.host.startswith("restarted"):
        out.host += " (recovered)"
    last = st.get("last_update") or {}
    if upd.returncode == 0:
        out.update = "completed"
    elif last.get("orphaned"):
        out.update = "taken over by the successor"
    elif st["state"] == "updated" and pid != first:
        out.update = "completed (the caller saw an error)"
    else:
        out.update = "rolled back"
    assert (root / "state").read_text().strip() == st["state"], "state file disagrees with the host"

    # the guest: in exactly one VMM, running, heartbeats going on
    cell = (participant, event, kind)
    vdir = HostProcess(root).rt.vm_dir("m1")
    if cell in GUEST_DIES_WITH_ITS_VMM:
        wait_for(lambda: (g := read_guest_state(vdir)) and g["state"] == "lost", 15, "the guest reported lost")
        out.guest = "lost with its VMM (reported lost)"
        assert not any(v["name"] == "m1" and v["state"] == "running" for v in host.client().status()["vms"])
    else:
        wait_for(lambda: (g := read_guest_state(vdir)) and g["state"] == "running", 3 * TIMEOUT_S + 10,
                 "the guest to run")
        wait_for(lambda: len(vmm_processes(host)) == 1, 3 * TIMEOUT_S + 10, "exactly one VMM")
        have = host.console("m1").count()
        wait_for(lambda: host.console("m1").count() >= have + 3, 15, "more heartbeats")
        out.guest = "running"
        registered = wait_for(lambda: [v for v in host.client().status()["vms"] if v["name"] == "m1"
                                       and v["state"] == "running"], 3 * TIMEOUT_S + 20, "the VM registered")
        assert registered
        out.guest += f", {len(vmm_processes(host))} VMM"

    # every preserved memfd: held by the serving host, same file, same bytes (or retrieved before finish)
    if retrieved:
        out.fds = "retrieved bit-exact, then finished"
        if host.client().status()["state"] == "updated":  # the finish died with its host: finish again
            host.luo("finish")
            out.notes.append("finish repeated on the restarted host")
        return out
    held = _held_by(host.pid or 0)
    for ino, sha in before.items():
        if ino not in held:
            raise AssertionError(f"memfd inode {ino} is no longer held by the host: lost")
        assert held[ino] == sha, f"memfd inode {ino} changed"
    names = {(f["token"], f.get("session")) for f in host.client().status()["files"]}
    assert (token, None) in names and (3, "matrix") in names, names
    out.fds = "kept, bit-exact"
    return out


def env_without_faults(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "LUO_FAULTS"}


def kill_hung_host(host: HostProcess) -> None:
    """A host that is alive but does not answer is killed, as systemd's watchdog would."""
    pid = host.pid
    if pid and alive(pid):
        os.kill(pid, 9)
        wait_for(lambda: not alive(pid), 10, "the hung host to die")
