"""One VM as the host knows it: its name, the VMM process that runs it and where it stands."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from luo import abi
from luo.abi import VM_SESSION_PREFIX
from luo.protocol import host_vmm
from luo.protocol.table import Cursor

if TYPE_CHECKING:
    from luo.host.daemon import Conn

VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
VM_NAME_RULE = "letters, digits, '_', '.', '-'; at most 48, the first a letter or digit"


def session_name(vm: str) -> str:
    """The VM's session: its RAM and state memfds (``luo.abi.VM_SESSION_PREFIX``)."""
    return VM_SESSION_PREFIX + vm


@dataclass
class VmEntry:
    name: str
    pid: int
    kind: str = "luo"  # the VMM driver that runs it (luo.host.vms.drivers)
    conn: Conn | None = None
    info: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None  # when this host started the VMM itself
    successor: subprocess.Popen[bytes] | None = None
    report: dict[str, Any] | None = None  # blackout accounting sent by a successor VMM
    protocol: int = abi.UNVERSIONED  # the VMM-host protocol negotiated at registration
    link: Cursor = field(default_factory=lambda: Cursor(host_vmm.HOST))  # the host<->VMM channel's state
    exit_code: int | None = None

    @property
    def state(self) -> str:
        """What the status shows: the channel's state, with the exit code once the VMM is gone."""
        s = self.link.state
        return f"exited ({self.exit_code})" if s == host_vmm.EXITED and self.exit_code is not None else s

    @property
    def serving(self) -> bool:
        """Registered and answering requests (not handed over, stopped or gone)."""
        return self.conn is not None and self.link.state in host_vmm.HOST_SERVING
