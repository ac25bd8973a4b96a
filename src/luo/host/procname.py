"""Give a process a name an operator recognises in ps/top (``luod``, ``luo-vmm:NAME``)."""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except OSError:
        pass
