"""The /dev/liveupdate UAPI as a contract: ioctl numbers, struct layouts, and where each comes from.

Two generations live on the one device and the full command value tells them apart:

- **v7.3** (``include/uapi/linux/liveupdate.h`` as of Linux 7.2/7.3; the session ioctls date from
  6.19, GET_NAME from 7.2): every ioctl is ``_IO(0xBA, nr)``, carries no size or direction bits,
  and takes a struct that starts with ``u32 size`` (the extensible-struct rules are in
  ``luo.uapi.ioctls``).
- **RFC v2** (the seed's design, May 2025): one global table and the state machine, with the
  classic ``_IOWR``/``_IOW``/``_IOR``/``_IO`` encodings and fixed-size arguments.

Nothing here may change without changing what the C programs of ``tests/uapi`` compile against.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

DEVICE_PATH = "/dev/liveupdate"
IOCTL_TYPE = 0xBA
NAME_LEN = 64  # u8 name[64], NUL-terminated

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (IOCTL_TYPE << 8) | nr


def io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


def ioc_type(cmd: int) -> int:
    return (cmd >> 8) & 0xFF


def ioc_nr(cmd: int) -> int:
    return cmd & 0xFF


On = Literal["device", "session"]


@dataclass(frozen=True)
class Ioctl:
    """One ioctl: its name, full command value, argument layout (``struct`` format) and origin."""

    name: str
    cmd: int
    on: On
    layout: str  # struct format of the argument, native alignment made explicit; "" for none
    kernel: str  # the kernel version whose behaviour luo follows for it (docs/uapi.md, per rule)

    @property
    def size(self) -> int:
        return struct.calcsize(self.layout) if self.layout else 0


# -- v7.3 (size-first structs; all _IO) ---------------------------------------------------------
# struct liveupdate_ioctl_create_session / retrieve_session: { u32 size; s32 fd; u8 name[64]; }
SESSION_ARG = "<Ii64s"
# struct liveupdate_session_preserve_fd / retrieve_fd: { u32 size; s32 fd; aligned_u64 token; }
FD_ARG = "<IiQ"
# struct liveupdate_session_finish: { u32 size; u32 reserved; }
FINISH_ARG = "<II"
# struct liveupdate_session_get_name: { u32 size; u32 reserved; u8 name[64]; }
GET_NAME_ARG = "<II64s"

CREATE_SESSION = Ioctl("LIVEUPDATE_IOCTL_CREATE_SESSION", io(0x00), "device", SESSION_ARG, "6.19")
RETRIEVE_SESSION = Ioctl("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", io(0x01), "device", SESSION_ARG, "6.19")
PRESERVE_FD = Ioctl("LIVEUPDATE_SESSION_PRESERVE_FD", io(0x40), "session", FD_ARG, "6.19")
RETRIEVE_FD = Ioctl("LIVEUPDATE_SESSION_RETRIEVE_FD", io(0x41), "session", FD_ARG, "6.19")
FINISH = Ioctl("LIVEUPDATE_SESSION_FINISH", io(0x42), "session", FINISH_ARG, "7.3")
GET_NAME = Ioctl("LIVEUPDATE_SESSION_GET_NAME", io(0x43), "session", GET_NAME_ARG, "7.2")

DEVICE_BASE = 0x00  # LIVEUPDATE_CMD_BASE: the device's table is nr 0x00..0x01
SESSION_BASE = 0x40  # LIVEUPDATE_CMD_SESSION_BASE: a session's table is nr 0x40..0x43
DEVICE_TABLE: dict[int, Ioctl] = {ioc_nr(i.cmd): i for i in (CREATE_SESSION, RETRIEVE_SESSION)}
SESSION_TABLE: dict[int, Ioctl] = {ioc_nr(i.cmd): i for i in (PRESERVE_FD, RETRIEVE_FD, FINISH, GET_NAME)}

# -- RFC v2 (the seed's global calls, on the device) -------------------------------------------
# struct liveupdate_fd { int fd; __u32 flags; __u64 token; }  (16 bytes; no size field)
LIVEUPDATE_FD = "<iIQ"
_FD_SIZE = struct.calcsize(LIVEUPDATE_FD)
FD_PRESERVE = Ioctl("LIVEUPDATE_IOCTL_FD_PRESERVE", iowr(0x00, _FD_SIZE), "device", LIVEUPDATE_FD, "RFC v2")
FD_UNPRESERVE = Ioctl("LIVEUPDATE_IOCTL_FD_UNPRESERVE", iow(0x01, 8), "device", "<Q", "RFC v2")
FD_RESTORE = Ioctl("LIVEUPDATE_IOCTL_FD_RESTORE", iowr(0x02, _FD_SIZE), "device", LIVEUPDATE_FD, "RFC v2")
GET_STATE = Ioctl("LIVEUPDATE_IOCTL_GET_STATE", ior(0x03, 4), "device", "<I", "RFC v2")  # enum: 4 bytes
EVENT_PREPARE = Ioctl("LIVEUPDATE_IOCTL_EVENT_PREPARE", io(0x04), "device", "", "RFC v2")
EVENT_FREEZE = Ioctl("LIVEUPDATE_IOCTL_EVENT_FREEZE", io(0x05), "device", "", "RFC v2")
EVENT_CANCEL = Ioctl("LIVEUPDATE_IOCTL_EVENT_CANCEL", io(0x06), "device", "", "RFC v2")
EVENT_FINISH = Ioctl("LIVEUPDATE_IOCTL_EVENT_FINISH", io(0x07), "device", "", "RFC v2")

RFC_V2: dict[int, Ioctl] = {
    i.cmd: i
    for i in (FD_PRESERVE, FD_UNPRESERVE, FD_RESTORE, GET_STATE, EVENT_PREPARE, EVENT_FREEZE, EVENT_CANCEL,
              EVENT_FINISH)
}
EVENTS = {EVENT_PREPARE.cmd: "prepare", EVENT_FREEZE.cmd: "freeze", EVENT_CANCEL.cmd: "cancel",
          EVENT_FINISH.cmd: "finish"}

# The two generations never share a command value (the device dispatches on it).
assert not set(RFC_V2) & {i.cmd for i in DEVICE_TABLE.values()}
