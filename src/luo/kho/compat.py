"""Node names of the handover tree (fixed by the layout; see docs/kho.md).

The compatible strings that version each node are in ``luo.abi``, with the rule for bumping them.
"""

from __future__ import annotations

MEMORY_MAP_NODE = "preserved-memory-map"
LUO_NODE = "LUO"
SUBSYSTEMS_NODE = "subsystems"
FILE_DESCRIPTORS_NODE = "file-descriptors"
SESSIONS_NODE = "luo-session"
