"""The ``vmm`` LUO subsystem: VMs are the workloads an update carries.

Its u64 is the number of VMs that crossed. It drives every VM through its driver
(``luo.host.vms.driver``), all of one driver's VMs at once. When it fails it undoes its own
partial work, because LUO does not cancel the participant that failed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from luo import abi
from luo.core.participants import Subsystem
from luo.errors import LuoError
from luo.host import faults
from luo.host.vms.entry import VmEntry
from luo.host.vms.requests import PartialFailure
from luo.protocol import host_vmm as hv

if TYPE_CHECKING:
    from luo.host.vms.supervision import VmSupervisor

log = logging.getLogger("luod")


class VmmSubsystem(Subsystem):
    name = abi.VMM_SUBSYSTEM

    def __init__(self, sup: VmSupervisor) -> None:
        self.sup = sup
        self.prepared: list[VmEntry] = []
        self.frozen: list[VmEntry] = []
        self.timings: dict[str, dict[str, Any]] = {}

    def prepare(self) -> int:
        vms = self.sup.running()
        answers: dict[str, dict[str, Any]] = {}
        done: list[VmEntry] = []
        try:
            for driver, group in self.sup.by_driver(vms):
                try:
                    answers.update(driver.warm(group, self.sup.successor_cmd, self.sup.request_timeout))
                except PartialFailure as e:
                    done += [v for v in group if v.link.state == hv.PREPARED]
                    raise LuoError(e.errno, e.message) from None
                done += group
        except LuoError:
            self._cancel(done)
            self.sup.kill_successors()
            raise
        self.prepared = vms
        self.timings = {n: dict(a) for n, a in answers.items()}
        return len(vms)

    def freeze(self, data: int) -> int:
        """Pause and save every VM; in an update (``switch_after_handover``) only the VMMs that may
        not pause by themselves on ``handed_over`` (VMM-host protocol 1, luo.abi): the others run
        on, each switching after the host's handover."""
        vms = self.prepared
        if self.sup.switch_after_handover:
            vms = [v for v in vms if v.protocol < abi.VMM_HOST_SWITCHES_AFTER_HANDOVER]
        try:
            for driver, group in self.sup.by_driver(vms):
                for n, a in driver.freeze(group, faults.participant_timeout(10.0)).items():
                    self.timings.setdefault(n, {}).update(a)
        except LuoError as e:
            self._cancel(self.prepared)
            self.sup.kill_successors()
            raise LuoError(e.errno, f"freezing VMs failed: {e.message}") from None
        self.frozen = list(self.prepared)
        return len(self.frozen)

    def _cancel(self, vms: list[VmEntry]) -> None:
        """Cancel every VM still in the update; a VMM that fails its cancel keeps its guest anyway."""
        vms = [v for v in vms if v.conn is not None and v.link.state in hv.HOST_IN_UPDATE]
        for driver, group in self.sup.by_driver(vms):
            try:
                driver.cancel(group, faults.participant_timeout(30.0))
            except LuoError as e:
                log.error("cancel: %s", e)

    def cancel(self, data: int) -> None:
        self._cancel(self.prepared)  # not those already handed over: their link says so
        self.sup.kill_successors()
        self.prepared, self.frozen = [], []

    def finish(self, data: int) -> None:
        faults.point("vmm", "finish")
