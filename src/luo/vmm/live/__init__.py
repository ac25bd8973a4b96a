"""The VMM as a LUO participant: its guest survives updates of the host and of the VMM itself.

- ``statefile``: the preserved record of a paused VM (vCPU + device state, not RAM).
- ``host_link``: the VMM's registration with the host and the requests it answers.
- ``outgoing``: the running VMM (prepare, freeze, cancel, handed_over, fallback).
- ``incoming``: the successor VMM (warm before the pause, restore and resume after the handover).
- ``main``: the process entry points (``luo vmm run`` and ``luo vmm successor``).
"""
