"""``luo run``: start a program under the supervisor and give back its exit status.

The child installs the filter between fork and exec and sends the listener fd to the parent,
which supervises. When the program exits but processes it started still run (a stage-1 holder,
a daemon), their calls must still be served, or every open would fail with ENOSYS: the
supervisor then continues in a background process of its own session (``luo-run`` in ps,
logging to ``<runtime>/luo-run.log``) and the command returns the program's status at once.
That process is no longer the callers' ancestor: ``pidfd_getfd`` and ``process_vm_readv`` need
ptrace rights over them, which root has (and anyone where Yama's ptrace_scope is 0).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import sys
from pathlib import Path

from luo.errors import LuoError
from luo.host.procname import set_process_name
from luo.host.runtime import resolve_runtime_dir
from luo.uapi import bpf
from luo.uapi.seccomp import check_sizes, install_filter, pidfd_open
from luo.uapi.supervisor import Supervisor

log = logging.getLogger("luo.run")

FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
IGNORED = (signal.SIGINT, signal.SIGQUIT)  # the terminal sends them to the program as well


def _child(argv: list[str], to_parent: socket.socket, program: bytes) -> None:
    """Between fork and exec: install the filter, hand over the listener, become the program."""
    code = 127
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; exec would keep that
            signal.signal(sig, signal.SIG_DFL)
        listener = install_filter(program)
        socket.send_fds(to_parent, [b"L"], [listener])
        os.close(listener)
        to_parent.close()
        os.execvp(argv[0], argv)
    except PermissionError as e:
        code = 126
        print(f"luo run: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
    except FileNotFoundError:
        print(f"luo run: {argv[0]}: command not found", file=sys.stderr)
    except (OSError, LuoError) as e:
        print(f"luo run: cannot start {argv[0]}: {e}", file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(code)


def run(argv: list[str], runtime_dir: str | None) -> int:
    if not argv:
        raise LuoError(errno.EINVAL, "no command given (luo run [--] COMMAND [ARGS...])")
    rt = str(resolve_runtime_dir(runtime_dir))
    if os.environ.get("LUO_RUN_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, format="luo-run[%(process)d] %(message)s")
    check_sizes()
    program = bpf.program()
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        parent_end.close()
        _child(argv, child_end, program)
    child_end.close()
    _msg, fds, _flags, _addr = socket.recv_fds(parent_end, 1, 1, socket.MSG_CMSG_CLOEXEC)
    parent_end.close()
    if not fds:  # the child could not install the filter or send it: its status says why
        _, status = os.waitpid(pid, 0)
        return _exit_code(status)
    sup = Supervisor(fds[0], rt, " ".join(argv)[:120])
    sup.listen()
    return _supervise(sup, pid, rt)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _supervise(sup: Supervisor, pid: int, rt: str) -> int:
    pidfd = pidfd_open(pid)
    sup.extra[pidfd] = "main"
    sup.ep.register(pidfd, select.EPOLLIN)
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: _forward(pid, s))
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    status: int | None = None
    while status is None:
        for fd, _ev in sup.poll_once():
            if fd == pidfd:
                _, st = os.waitpid(pid, 0)
                status = _exit_code(st)
    for sig in FORWARDED:  # the pid is free now: nothing may be sent to whoever gets it next
        signal.signal(sig, signal.SIG_DFL)
    sup.ep.unregister(pidfd)
    os.close(pidfd)
    del sup.extra[pidfd]
    # What the program started may still run: serve it from the background (never block the shell).
    sup.poll_once(0)
    if sup.listener_gone:
        sup.close_all()
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        _background(sup, rt)
    return status


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _background(sup: Supervisor, rt: str) -> None:
    code = 0
    try:
        os.setsid()
        for sig in (*FORWARDED, *IGNORED):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        # nothing the command line gave `luo run` (a harness's pipe, a jobserver) stays open here
        keep = sup.own_fds()
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2 and int(name) not in keep:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        _log_to(Path(rt) / "luo-run.log")
        set_process_name("luo-run")
        sup.relisten()  # <runtime>/run/PID.sock under this process's own pid
        log.info("luo run %d: %s exited; serving the processes it started until they end", os.getpid(), sup.program)
        sup.serve_until_idle()
        log.info("luo run %d: no supervised process left (%d calls served)", os.getpid(), sup.served)
    except BaseException:
        log.exception("luo run background supervisor failed")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def _log_to(path: Path) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    try:
        handler: logging.Handler = logging.FileHandler(path)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s luo-run[%(process)d] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
