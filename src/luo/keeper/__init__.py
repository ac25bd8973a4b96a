"""The fd store: luod's preserved fds, kept where a crash of luod does not lose them.

See luo.keeper.store for the interface and how a backend is chosen, luo.keeper.server for the
keeper process, luo.keeper.systemd for systemd's fd store.
"""

from luo.keeper.store import FdStore, choose_backend, open_store, validate_key

__all__ = ["FdStore", "choose_backend", "open_store", "validate_key"]
