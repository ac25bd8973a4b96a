"""``luo status`` for humans: what is preserved, by whom, and in which session."""

from __future__ import annotations

from typing import Any

HIDDEN_FILE_KEYS = {"token", "compatible", "session", "owner", "direction", "fd", "data"}


def _owner(o: Any) -> str:
    """``comm[pid] uid N`` from the peer's credentials, then ``(for PROGRAM, its claim)`` when the
    client said what it acts for (``luo run``: "luo-run[812] uid 0 (for selftest pid 123, its
    claim)"): the credentials are the kernel's word, the program only the client's."""
    if isinstance(o, dict):
        text = f"{o.get('comm') or '?'}[{o.get('pid', '?')}] uid {o.get('uid', '?')}"
        if o.get("program"):
            text += f" (for {o['program']}, its claim)"
        return text
    return str(o or "-")


def _flags(d: dict[str, Any], skip: set[str]) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items() if k not in skip and v not in (None, False, ""))


def guest_state(vm: dict[str, Any]) -> str:
    """``running 12.3s`` / ``paused 0.4s`` / ``lost``: the VMM's own word and for how long."""
    g = vm.get("guest")
    if not isinstance(g, dict):
        return str(vm.get("state"))
    return f"{vm.get('state')} {g.get('for_s', 0):.1f}s" if vm.get("state") != "lost" else "lost"


def format_status(st: dict[str, Any]) -> str:
    out = [f"state: {st.get('state')}   liveupdate-number: {st.get('liveupdate_number')}   "
           f"host pid: {st.get('pid')}   runtime: {st.get('runtime_dir')}"]
    files = st.get("files", [])
    out.append(f"preserved fds ({len(files)}):")
    for f in files:
        where = f"session {f['session']}" if f.get("session") else "global"
        out.append(f"  token {f.get('token'):<4} {f.get('compatible'):<17} {f.get('direction', ''):<3} {where:<24} "
                   f"owner {_owner(f.get('owner'))}  {_flags(f, HIDDEN_FILE_KEYS)}")
    sessions = st.get("sessions", [])
    out.append(f"sessions ({len(sessions)}):")
    for s in sessions:
        by = f"  retrieved by {_owner(s['retrieved_by'])}" if s.get("retrieved_by") else ""
        out.append(f"  {s.get('name'):<24} {s.get('direction', ''):<3} files {s.get('files')}  "
                   f"owner {_owner(s.get('owner'))}{by}  "
                   f"{_flags(s, {'name', 'files', 'owner', 'direction', 'retrieved_by'})}")
    subs = st.get("subsystems", [])
    if subs:
        names = [s.get("name", "?") if isinstance(s, dict) else str(s) for s in subs]
        out.append("subsystems: " + ", ".join(names))
    vms = st.get("vms", [])
    if vms:
        out.append(f"vms ({len(vms)}):")
        for vm in vms:
            why = (vm.get("guest") or {}).get("why")
            kind = vm.get("vmm", "luo")
            mode = f", last switch {vm['mode']}" if isinstance(vm.get("mode"), str) else ""
            qemu = f" (QEMU pid {vm['qemu_pid']}{mode})" if vm.get("qemu_pid") else ""
            out.append(f"  {vm['name']:<12} {guest_state(vm):<14} {kind} VMM pid {vm['pid']:<7}{qemu} session {vm['session']}  "
                       f"mem {vm.get('mem')} cpus {vm.get('cpus')}  console {vm.get('console')}"
                       + (f"  ({why})" if why else ""))
    if isinstance(st.get("pool"), dict):
        from luo.cli_pool import format_pool

        out += format_pool(st["pool"])
    dev = st.get("device")
    if isinstance(dev, dict):
        out.append(f"/dev/liveupdate: held by pid {dev.get('pid')}"
                   + (f" (for {dev['program']}, its claim)" if dev.get("program") else ""))
    runs = st.get("luo_run") or []
    if runs:
        out.append(f"luo run supervisors ({len(runs)}):")
        for r in runs:
            if r.get("error"):
                out.append(f"  pid {r.get('pid')}: {r['error']}")
                continue
            files = ", ".join(f"{f.get('name')}" + (" (retrieved)" if f.get("incoming") else "")
                              + (f" [host {f.get('host_pid')}]" if f.get("host_pid") != st.get("pid") else "")
                              for f in r.get("files", []))
            out.append(f"  pid {r.get('pid')}: {r.get('program')}  calls served {r.get('served')}  "
                       f"fds given: {files or '-'}")
    fs = st.get("fd_store")
    if isinstance(fs, dict):
        out.append(f"fd store: {fs.get('kind')}, {fs.get('keys')} fds mirrored"
                   + (f", ERROR: {fs['error']}" if fs.get("error") else ""))
    rec = st.get("recovered")
    if isinstance(rec, dict):
        out.append(f"recovered after a crash of pid {rec.get('crashed_pid')} (in {rec.get('crashed_state')}): "
                   f"{rec.get('fds')} fds, sessions {rec.get('sessions')}; held for their owners: "
                   f"{rec.get('held_sessions')}")
    return "\n".join(out)
