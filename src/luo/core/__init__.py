"""luo.core: the I/O-free Live Update Orchestrator (RFC v2 state machine + 6.19 sessions)."""

from luo.core.orchestrator import Orchestrator
from luo.core.session import SessionHandle
from luo.core.states import Event, State

__all__ = ["Event", "Orchestrator", "SessionHandle", "State"]
