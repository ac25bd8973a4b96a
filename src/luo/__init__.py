"""luo: live update for hypervisor hosts (LUO + KHO carried out for a userspace host)."""

from luo.errors import LuoError

__all__ = ["LuoError"]
__version__ = "0.1.0"
