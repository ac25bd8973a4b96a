"""What a host registers at start: handlers, subsystems, and the compatibles it understands."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from luo.core.participants import FileHandler, Subsystem
from luo.host.runtime import RuntimeDir
from luo.kho import TREE_COMPATIBLES

if TYPE_CHECKING:
    from luo.core.orchestrator import Orchestrator
    from luo.host.daemon import Host


def host_subsystems(runtime: RuntimeDir) -> list[Subsystem]:
    """Subsystems that need no host object (the ``vmm`` one is added by make_host); probes for tests."""
    from luo.testing.probe import probes_from_env

    return probes_from_env(runtime.root)


def make_host(runtime: RuntimeDir, orch: Orchestrator, listener: socket.socket,
              incoming_blob: bytes | None = None) -> Host:
    from luo.host.daemon import Host
    from luo.host.vms import VmmSubsystem, install

    host = Host(runtime, orch, listener, incoming_blob=incoming_blob)
    host.vms = install(host)
    orch.register_subsystem(VmmSubsystem(host.vms))
    return host


def rebind_host(host: Host, orch: Orchestrator, incoming_blob: bytes) -> None:
    """Give a host built ahead of time (at prepare) the orchestrator of the final handover."""
    from luo.host.vms import VmmSubsystem

    host.orch = orch
    host.incoming_blob = incoming_blob
    orch.register_subsystem(VmmSubsystem(host.vms))


def known_compatibles(handlers: Sequence[FileHandler]) -> set[str]:
    return set(TREE_COMPATIBLES) | {h.compatible for h in handlers}
