"""The VMM driver seam: what the host needs from a kind of VMM to carry its VMs through updates.

The host's VM supervision (``supervision``) and the ``vmm`` LUO subsystem (``subsystem``) know VMs
only through this interface; each kind of VMM (``luo vm start --vmm KIND``) is one implementation,
registered in ``luo.host.vms.drivers``. Our KVM VMM is the first (``luo_vmm``); QEMU is planned.

Every method that acts on several VMs gets all of one driver's VMs at once, so a driver can work
on them in parallel (ours sends every request before awaiting the first answer). Methods raise
LuoError; ``warm``, ``freeze`` and ``cancel`` raise a ``PartialFailure`` naming the VMs that did
succeed, so that the subsystem undoes exactly those.

The rules every driver keeps (docs/design.md, docs/reliability.md):
- ``warm`` starts each VM's successor VMM from the update's new installation while the guest runs;
  a refusal (incompatible versions, a successor that cannot build the VM) comes here, before any
  guest pauses.
- ``hand_over`` is called once the new host has confirmed it holds every VM's session; only then
  may a guest move to its successor VMM, and never two VMMs run one guest.
- ``cancel`` leaves every guest running on the VMM it ran on before ``warm``, and no successor
  VMM alive (``kill_successors`` is the backstop).
"""

from __future__ import annotations

import abc
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from luo.host.vms.entry import VmEntry


@dataclass(frozen=True)
class VmSpec:
    """What ``luo vm start`` asked for: the common part, and the driver's own options (checked by
    its ``options``)."""

    name: str
    mem: int
    cpus: int
    options: dict[str, Any] = field(default_factory=dict)


class VmmDriver(abc.ABC):
    takes_pool = False  # its VMs' RAM can be extents of the host's memory pool (luo.pool)
    pool_extents_max = 4096  # how many extents one VM's RAM may be made of

    def pool_ok(self, spec: VmSpec) -> bool:
        """Whether ``spec``'s VM takes its RAM from the host's pool, when the host has one."""
        return self.takes_pool

    kind: ClassVar[str]  # the name ``luo vm start --vmm`` selects it by
    description: ClassVar[str]
    # What this update asked of the successor VMMs (``luo update --qemu PATH``: {"qemu": PATH}); set
    # by the supervisor before ``warm``.
    successor_options: dict[str, Any] = {}  # noqa: RUF012 (replaced, never mutated)

    @abc.abstractmethod
    def options(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Check and return the driver's own fields of a ``vm_start`` request (luo.host.fields)."""

    @abc.abstractmethod
    def start(self, spec: VmSpec, vdir: Path) -> subprocess.Popen[bytes]:
        """Start the VMM process for a new VM; it registers with the host when the guest runs."""

    @abc.abstractmethod
    def warm(self, vms: Sequence[VmEntry], successor_cmd: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Prepare: start and warm each VM's successor VMM; the answers are the per-VM timings."""

    @abc.abstractmethod
    def freeze(self, vms: Sequence[VmEntry], timeout: float) -> dict[str, dict[str, Any]]:
        """Pause and save each guest now (a plain ``luo freeze``, or a VMM that cannot switch later)."""

    @abc.abstractmethod
    def hand_over(self, vms: Sequence[VmEntry]) -> None:
        """The new host holds everything: each VM switches to its successor VMM (or stays)."""

    @abc.abstractmethod
    def cancel(self, vms: Sequence[VmEntry], timeout: float) -> None:
        """Undo ``warm``/``freeze``: each guest runs on its VMM, its successor gone."""

    @abc.abstractmethod
    def kill_successors(self, vms: Sequence[VmEntry]) -> None:
        """A backstop after a cancel: no successor VMM outlives an update that did not happen."""

    @abc.abstractmethod
    def stop(self, vm: VmEntry, timeout: float) -> None:
        """Stop the guest and its VMM, releasing its session."""

    @abc.abstractmethod
    def describe(self, vm: VmEntry) -> dict[str, Any]:
        """What ``luo status`` and ``luo vm list`` show of the VM beyond the common fields."""
