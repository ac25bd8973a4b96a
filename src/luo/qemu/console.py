"""A QEMU VM's serial console, relayed into the VM's console.log by the luo process that runs it.

QEMU serves the serial port on a Unix socket of its own (``-chardev socket,server=on``) and the
luo VMM connects to it before the guest runs (a QEMU started with ``-S``; a successor QEMU at
warm-up), so no byte is printed to nobody. Across an update the old QEMU prints until it stops
and the new one only after it resumes: the old VMM drains what its QEMU wrote before it lets the
successor go, and both append to the same log, so every line is in it once and in order.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

from luo.errors import LuoError


class ConsoleRelay:
    def __init__(self, sock_path: str, log_path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise LuoError(errno.ETIMEDOUT, f"QEMU's console {sock_path}: {e.strerror}") from None
                time.sleep(0.01)  # QEMU creates the socket a moment after it starts
        self.sock = s
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.lock = threading.Lock()  # one writer at a time: the thread, or drain()
        self.closed = False
        self.bytes = 0
        self.thread = threading.Thread(target=self._run, name="console", daemon=True)
        self.thread.start()

    def _pump(self, timeout: float | None) -> bool:
        """Copy what is there (waiting up to ``timeout``); False at EOF."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return True
        with self.lock:
            if self.closed:
                return False
            try:
                data = self.sock.recv(65536)
            except OSError:
                return False
            if not data:
                return False
            os.write(self.log_fd, data)
            self.bytes += len(data)
        return True

    def _run(self) -> None:
        while not self.closed and self._pump(0.5):
            pass

    def drain(self) -> None:
        """Copy everything QEMU has written so far (call it with the guest stopped)."""
        while not self.closed and select.select([self.sock], [], [], 0)[0]:
            if not self._pump(0):
                return

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.sock.close()
            os.close(self.log_fd)
