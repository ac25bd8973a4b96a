"""luo.kho: the handover as a real flattened device tree (KHO's container format).

``build_tree`` writes the LUO records and the preserved-memory map as a DTB with libfdt;
``parse_tree`` reads one back, refusing anything malformed with LuoError(EINVAL);
``to_dts`` prints one as dts without dtc. See docs/kho.md for the layout.
"""

from luo.abi import TREE_COMPATIBLES
from luo.kho.builder import build_tree
from luo.kho.dts import to_dts
from luo.kho.parser import check_compatibles, parse_pool, parse_tree, required_compatibles

__all__ = [
    "TREE_COMPATIBLES",
    "build_tree",
    "check_compatibles",
    "parse_pool",
    "parse_tree",
    "required_compatibles",
    "to_dts",
]
