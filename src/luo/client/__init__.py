"""libluo for Python."""

from luo.client.client import Client, connect
from luo.client.session import Session
from luo.errors import LuoError

__all__ = ["Client", "Session", "LuoError", "connect"]
