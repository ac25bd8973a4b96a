"""Compatible strings of the handover tree.

Each node of the tree names its layout with a compatible string, as the kernel's KHO/LUO trees
do. Any change to a node's layout must come with a new string, so a successor can refuse a tree
it does not understand *before* the pause instead of misreading it after.
"""

from __future__ import annotations

KHO_COMPATIBLE = "kho-v1"  # the root
KHO_MEMORY_MAP_COMPATIBLE = "kho-memory-map-v1"  # /preserved-memory-map
LUO_COMPATIBLE = "luo-v1"  # /LUO
SUBSYSTEMS_COMPATIBLE = "subsystems-v1"  # /LUO/subsystems
FILE_DESCRIPTORS_COMPATIBLE = "file-descriptors-v1"  # /LUO/file-descriptors (RFC v2 global table)
LUO_SESSION_COMPATIBLE = "luo-session-v2"  # /LUO/luo-session (6.19 sessions)

# Every compatible of the tree itself (not the file handlers'): what a successor must know to
# read a tree at all.
TREE_COMPATIBLES: frozenset[str] = frozenset(
    {
        KHO_COMPATIBLE,
        KHO_MEMORY_MAP_COMPATIBLE,
        LUO_COMPATIBLE,
        SUBSYSTEMS_COMPATIBLE,
        FILE_DESCRIPTORS_COMPATIBLE,
        LUO_SESSION_COMPATIBLE,
    }
)

# Node names (fixed by the layout; see docs/kho.md).
MEMORY_MAP_NODE = "preserved-memory-map"
LUO_NODE = "LUO"
SUBSYSTEMS_NODE = "subsystems"
FILE_DESCRIPTORS_NODE = "file-descriptors"
SESSIONS_NODE = "luo-session"
