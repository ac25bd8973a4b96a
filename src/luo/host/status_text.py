"""``luo status`` for humans."""

from __future__ import annotations

from typing import Any


def format_status(st: dict[str, Any]) -> str:
    out = [f"state: {st.get('state')}   liveupdate-number: {st.get('liveupdate_number')}   host pid: {st.get('pid')}"]
    files = st.get("files", [])
    out.append(f"preserved fds ({len(files)}):")
    for f in files:
        where = f"session {f['session']}" if f.get("session") else "global"
        extra = " ".join(f"{k}={v}" for k, v in f.items()
                         if k not in ("token", "compatible", "session", "owner"))
        out.append(f"  token {f.get('token')}  {f.get('compatible')}  {where}  owner {f.get('owner', '')}  {extra}")
    sessions = st.get("sessions", [])
    out.append(f"sessions ({len(sessions)}):")
    for s in sessions:
        rest = " ".join(f"{k}={v}" for k, v in s.items() if k not in ("name", "files"))
        out.append(f"  {s.get('name')}  {rest}")
    subs = st.get("subsystems", {})
    if subs:
        out.append("subsystems: " + ", ".join(f"{k}" for k in subs))
    vms = st.get("vms", [])
    if vms:
        out.append(f"vms ({len(vms)}):")
        for vm in vms:
            out.append("  " + "  ".join(f"{k}={v}" for k, v in vm.items()))
    return "\n".join(out)
