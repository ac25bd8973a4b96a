"""``luo host``: start a host on a runtime dir (or, with --successor, take over from one)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys

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
    from luo.handlers import default_handlers
    from luo.host.procname import favour_this_thread, set_process_name
    from luo.host.sdnotify import notify
    from luo.host.setup import host_subsystems, make_host

    set_process_name("luod")
    favour_this_thread()
    listener = bind_listener(rt)  # refuses before touching luod.pid when another host serves
    rt.write_pid(os.getpid())  # before the first client can connect (listen() below)
    rt.write_state("normal")
    orch = Orchestrator(handlers=default_handlers(), subsystems=host_subsystems(rt))
    host = make_host(rt, orch, listener)
    listener.listen(128)
    notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving {rt.socket}")
    host.serve_forever()
    return exit_now()


def exit_now() -> int:
    """Leave without interpreter teardown: after a handover this runs inside the VMs' blackout,
    and tearing down a Python interpreter costs milliseconds of a 2-core machine."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
