"""``luo qualify`` run as a downstream user would: a subprocess, its JSON verdict, its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from luo.qualify import parse_command
from luo.testing.processes import pids_of
from luo.vmm.live.main import default_image

no_vm = ("needs /dev/kvm" if not os.access("/dev/kvm", os.R_OK | os.W_OK)
         else "the test guest is not built: run ./scripts/setup.sh" if not Path(default_image()).exists()
         else "")
needs_vm = pytest.mark.skipif(bool(no_vm), reason=no_vm)


def qualify(root: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    cp = subprocess.run([sys.executable, "-m", "luo", "--runtime-dir", str(root), "qualify", "--json", *args],
                        capture_output=True, text=True, timeout=180)
    assert "Traceback" not in cp.stderr, cp.stderr
    return cp.returncode, json.loads(cp.stdout), cp.stderr


def checks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in result["checks"]}


@pytest.mark.kvm
@needs_vm
def test_same_installation_round_trip_passes(short_dir: Path) -> None:
    root = short_dir / "rt"
    rc, result, stderr = qualify(root, "--round-trip")
    by_name = checks(result)
    assert rc == 0, stderr
    assert result["ok"] is True
    assert all(c["ok"] for c in result["checks"]), [c for c in result["checks"] if not c["ok"]]
    for leg in ("A->B", "B->A"):
        for what in ("update", "new host", "global memfd", "session memfd", "session socket",
                     "VM blackout reported", "VM continuity", "finish"):
            assert f"{leg}: {what}" in by_name, sorted(by_name)
        assert result["blackouts"][leg] > 0
        assert {"start", "prepare", "freeze", "handover"} <= set(result["phases"][leg])
    assert result["from"] == result["to"]
    assert "as preserved" in by_name["A->B: global memfd"]["detail"]
    assert "queued before the update" in by_name["B->A: session socket"]["detail"]
    assert not pids_of(root), "qualify left processes of its runtime dir running"
    assert "PASS" in stderr  # the table goes to stderr with --json


@pytest.mark.kvm
@needs_vm
def test_successor_lacking_memfd_v1_fails_and_leaves_the_workload_on_a(short_dir: Path) -> None:
    """--to a wrapper standing for another installation, one that does not know memfd-v1. The
    fault is in the wrapper's own environment only: the outgoing host is a normal one."""
    wrapper = short_dir / "old-luo"
    wrapper.write_text(f"#!/bin/sh\nLUO_FAULTS=successor-forget=memfd-v1 exec {sys.executable} -m luo \"$@\"\n")
    wrapper.chmod(0o755)
    root = short_dir / "rt"
    rc, result, stderr = qualify(root, "--to", str(wrapper))
    by_name = checks(result)
    assert rc == 1, stderr
    assert result["ok"] is False
    assert result["to"] == str(wrapper)
    update = by_name["A->B: update"]
    assert not update["ok"]
    assert "EOPNOTSUPP" in update["detail"] and "memfd-v1" in update["detail"], update
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    assert failed == ["A->B: update"], failed
    for what in ("host", "VM", "files"):
        c = by_name[f"A->B: intact on the old host: {what}"]
        assert c["ok"], c
    assert "unchanged" in by_name["A->B: intact on the old host: host"]["detail"]
    assert "bit-exact" in by_name["A->B: intact on the old host: files"]["detail"]
    assert "A->B: new host" not in by_name  # nothing claimed about a successor that never took over
    assert not pids_of(root), "qualify left processes of its runtime dir running"


def test_command_forms(short_dir: Path) -> None:
    """A path (even one with a space), a venv directory, or a shell-split command line."""
    assert parse_command(None) == [sys.executable, "-m", "luo"]
    spaced = short_dir / "my luo"
    spaced.write_text("#!/bin/sh\n")
    assert parse_command(str(spaced)) == [str(spaced)]
    venv = short_dir / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "luo").write_text("#!/bin/sh\n")
    assert parse_command(str(venv)) == [str(venv / "bin" / "luo")]
    assert parse_command("/opt/py/bin/python -m luo") == ["/opt/py/bin/python", "-m", "luo"]


def test_refuses_a_runtime_dir_in_use(host) -> None:  # noqa: ANN001
    """Qualify ends by killing every process of its runtime dir: never one a host already uses."""
    cp = subprocess.run([sys.executable, "-m", "luo", "--runtime-dir", str(host.root), "qualify"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1 and "EEXIST" in cp.stderr, cp.stderr
    assert host.state() == "normal" and host.client().pid() == host.pid
