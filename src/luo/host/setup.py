"""What a host registers at start: handlers, subsystems, and the compatibles it understands."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from luo.abi import TREE_COMPATIBLES
from luo.core.participants import FileHandler, Subsystem
from luo.host.runtime import RuntimeDir

if TYPE_CHECKING:
    from luo.core.orchestrator import Orchestrator
    from luo.host.daemon import Host
    from luo.pool.service import PoolService


def host_subsystems(runtime: RuntimeDir) -> list[Subsystem]:
    """Subsystems that need no host object (the ``vmm`` one is added by make_host); probes for tests.
    Each runs under a deadline (luo.host.watchdog): a hung subsystem must not hang the host."""
    from luo.host.watchdog import TimedSubsystem
    from luo.testing.probe import probes_from_env

    return [TimedSubsystem(s) for s in probes_from_env(runtime.root)]


def host_handlers() -> list[FileHandler]:
    """The file handlers a host registers, in order, each under a deadline; the probe handler of
    the fault tests first when ``LUO_PROBE_HANDLER=1``."""
    from luo.handlers import default_handlers
    from luo.host.watchdog import TimedHandler
    from luo.testing.probe import probe_handlers_from_env

    return [TimedHandler(h) for h in [*probe_handlers_from_env(), *default_handlers()]]


def make_host(runtime: RuntimeDir, orch: Orchestrator, listener: socket.socket,
              incoming_blob: bytes | None = None, pool: PoolService | None = None) -> Host:
    """``pool``: the host's memory pool (luo.pool), new or taken over at prepare."""
    from luo.host.daemon import Host
    from luo.host.vms import install
    from luo.pool.host import install as install_pool

    host = Host(runtime, orch, listener, incoming_blob=incoming_blob)
    host.vms = install(host)
    host.pool = pool
    install_pool(host)
    _register_subsystems(host, orch)
    return host


def rebind_host(host: Host, orch: Orchestrator, incoming_blob: bytes) -> None:
    """Give a host built ahead of time (at prepare) the orchestrator of the final handover."""
    host.orch = orch
    host.incoming_blob = incoming_blob
    _register_subsystems(host, orch)


def _register_subsystems(host: Host, orch: Orchestrator) -> None:
    orch.register_subsystem(vmm_subsystem(host))
    if host.pool is not None:
        from luo.host.watchdog import TimedSubsystem
        from luo.pool.host import PoolSubsystem

        orch.register_subsystem(TimedSubsystem(PoolSubsystem(host)))


def vmm_subsystem(host: Host) -> Subsystem:
    """The ``vmm`` subsystem under a deadline longer than its own waits on the VMMs, which time
    out first and say which VMM did not answer."""
    from luo.host.vms import VmmSubsystem
    from luo.host.watchdog import TimedSubsystem

    return TimedSubsystem(VmmSubsystem(host.vms), timeout=host.vms.request_timeout + 30.0)


def known_compatibles(handlers: Sequence[FileHandler]) -> set[str]:
    return set(TREE_COMPATIBLES) | {h.compatible for h in handlers}
