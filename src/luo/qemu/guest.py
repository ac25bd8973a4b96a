"""The QEMU driver's default guest: Debian's cloud kernel and our PID 1 (docs/guest-linux.md).

`guest-linux/build.sh` (run by `scripts/setup.sh`) puts the kernel and the initramfs in the
checkout's `.cache/linux-guest`; nothing here builds or downloads, so asking for a missing file
says which command makes it instead of starting a VM that cannot boot.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from luo.errors import LuoError

# src/luo/qemu/guest.py -> the repository root (setup.sh installs luo editable, in place).
CACHE_DIR = Path(__file__).resolve().parents[3] / ".cache" / "linux-guest"

# ttyS0 is the console the guest program prints on; `quiet` keeps kernel messages (which bypass
# the tty and could land mid-line) to errors; panic=-1 reboots at once if PID 1 ever dies, which
# shows up as a second boot line instead of a silent hang. The rest are the guest's own keys with
# their defaults written out (docs/guest.md, "Command line").
DEFAULT_APPEND = "console=ttyS0 quiet panic=-1 hb_ms=100 stall_ms=50"


def _cached(name: str) -> Path:
    path = CACHE_DIR / name
    if not path.exists():
        raise LuoError(
            errno.ENOENT, f"{path} is missing: run scripts/setup.sh (it runs guest-linux/build.sh)"
        )
    return path.resolve()


def default_kernel() -> Path:
    """Debian 12's cloud kernel (bzImage), the versioned file behind the `vmlinuz` symlink."""
    return _cached("vmlinuz")


def default_initrd() -> Path:
    """The gzipped newc initramfs whose /init is guest-linux/luo-linux-guest.c."""
    return _cached("initrd.cpio.gz")


def kernel_version() -> str:
    """`<package> <version>` of the cached kernel, e.g. for a VM's log."""
    return _cached("kernel-version").read_text().strip()


def qemu_binary() -> str:
    """The qemu-system-x86_64 on PATH (Debian's qemu-system-x86, installed by the set-up)."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise LuoError(errno.ENOENT, "qemu-system-x86_64 is not installed: run scripts/setup.sh")
    return path
