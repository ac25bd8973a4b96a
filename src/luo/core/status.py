"""JSON-able views of preserved files and subsystems for ``luo status``.

Status must never fail because a handler's ``describe`` does: its error is shown instead.
"""

from __future__ import annotations

from luo.core.outgoing import owner_from_meta, safe_describe
from luo.core.participants import IncomingFile, Owner, PreservedFile
from luo.core.registry import Registry


def owner_json(owner: Owner) -> dict[str, object]:
    """pid, uid and comm (from SO_PEERCRED), and ``program`` when the client named one (its claim)."""
    out: dict[str, object] = {"pid": owner.pid, "uid": owner.uid, "comm": owner.comm}
    if owner.program:
        out["program"] = owner.program
    return out


def outgoing_file(pf: PreservedFile) -> dict[str, object]:
    entry: dict[str, object] = {
        "direction": "out",
        "token": pf.token,
        "compatible": pf.compatible,
        "session": pf.session,
        "owner": owner_json(pf.owner),
        "data": pf.data,
        "fd": pf.fd,
        "prepared": pf.prepared,
        "frozen": pf.frozen,
    }
    return {**safe_describe(pf.handler, pf.fd), **entry}


def incoming_file(registry: Registry, inc: IncomingFile) -> dict[str, object]:
    entry: dict[str, object] = {
        "direction": "in",
        "token": inc.token,
        "compatible": inc.compatible,
        "session": inc.session,
        "owner": owner_from_meta(inc.meta),
        "data": inc.data,
        "fd": inc.fd,
        "retrieved": inc.retrieved,
    }
    return {**safe_describe(registry.handler_for(inc.compatible), inc.fd), **entry}
