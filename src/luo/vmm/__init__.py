"""luo.vmm: a KVM VMM in Python whose VMs can be saved in one process and rebuilt in another.

Entry points: ``luo.vmm.vm.Vm`` and ``python -m luo.vmm.run``; design in docs/vmm.md.
"""
