"""``luo host``: start a host on a runtime dir (or, with --successor, take over from one)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from typing import Any

from luo.errors import LuoError
from luo.host.runtime import RuntimeDir, resolve_runtime_dir


def bind_listener(rt: RuntimeDir) -> socket.socket:
    """Bind the control socket (mode 0600), refusing to steal it from a live host."""
    path = rt.socket
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise LuoError(errno.EADDRINUSE, f"a luo host already serves {path} (pid {rt.read_pid()})")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return s


def raise_fd_limit() -> None:
    """Every preserved fd and every client is an fd of luod: take the hard limit, not the default 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LUO_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s luod[{os.getpid()}] %(levelname)s %(message)s")


def run_host(runtime_dir: str | None, successor_fd: int | None = None) -> int:
    setup_logging()
    rt = RuntimeDir(resolve_runtime_dir(runtime_dir))
    rt.ensure()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if successor_fd is not None:
        from luo.host.successor import run_successor

        return run_successor(successor_fd, rt)
    from luo.core.orchestrator import Orchestrator
    from luo.host.procname import favour_this_thread, set_process_name
    from luo.host.sdnotify import notify
    from luo.host.setup import host_handlers, host_subsystems, make_host

    set_process_name("luod")
    favour_this_thread()
    raise_fd_limit()
    listener = bind_listener(rt)  # refuses before touching luod.pid when another host serves
    rt.write_pid(os.getpid())  # before the first client can connect (listen() below)
    recovered, mirror = _from_store(rt)
    orch = recovered.orch if recovered else Orchestrator(handlers=host_handlers(), subsystems=host_subsystems(rt))
    rt.write_state(orch.state.label)
    held = {h.name: h for h in recovered.sessions} if recovered is not None else {}
    from luo.pool.host import pool_at_start

    pool = pool_at_start(rt.root, orch, held)  # before anyone connects: ENOMEM here stops the host
    host = make_host(rt, orch, listener, pool=pool)
    host.mirror = mirror
    if recovered is not None:
        host.recovered = recovered.report
        host.recovered_sessions = held
    host.pool_changed()
    host.mirror_now()  # the store holds this host's keys before anyone can connect
    listener.listen(128)
    notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving {rt.socket}")
    try:
        host.serve_forever()
    finally:
        if host.pool is not None and not host.orch.handed_over:
            from luo.pool.host import stop_pool

            stop_pool(rt.root, host.pool)
    return exit_now()


def _from_store(rt: RuntimeDir) -> tuple[Any, Any]:
    """What the fd store holds from a host that crashed (None when it holds nothing), and the
    mirror this host keeps in it. A store that cannot be opened leaves the host running without
    one (said in the log and in ``luo status``); unusable metadata is refused with the fds closed."""
    from luo.host.mirror import Mirror, recover_host
    from luo.host.setup import host_handlers, host_subsystems
    from luo.keeper.store import open_store

    log = logging.getLogger("luod")
    try:
        store = open_store(rt.root)
        meta, fds = store.load()
    except LuoError as e:
        log.error("no fd store (%s): preserved fds will not outlive a crash of this host", e)
        return None, None
    if meta is None:
        for fd in fds.values():
            os.close(fd)
        return None, Mirror(store, stale=fds)
    keys = list(fds)
    try:
        recovered = recover_host(meta, fds, host_handlers(), host_subsystems(rt))
    except LuoError as e:
        log.error("the fd store's record of the crashed host is unusable, starting empty: %s", e)
        return None, Mirror(store, stale=keys)
    return recovered, Mirror(store, stale=recovered.stale_keys)


def exit_now() -> int:
    """Leave without interpreter teardown: after a handover this runs inside the VMs' blackout,
    and tearing down a Python interpreter costs milliseconds of a 2-core machine."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
