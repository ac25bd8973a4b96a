"""Every version luo puts on what crosses an update: this interface is a contract.

Whatever one luo process writes or says and another reads may be read by a *different
installation*: an update runs the outgoing version against the successor's, a rollback the other
way round, a VMM may outlive the host that started it, the fd keeper outlives every host, and
records on disk are read by whichever luo comes next. So each of those things carries a version,
and every version lives here, each with **the rule for bumping it**: what change needs a new
value, and what a peer that does not know the new value does. Every other module imports the
value from here; none defines its own. The kernel keeps its KHO/LUO ABI the same way
(``include/linux/kho/abi/*.h``), and luo-design.md §3 states the rule this file applies
everywhere: *any change to a tree's structure or a serialized record requires a new compatible
string* (here: a new string or number).

Not here:

- The /dev/liveupdate UAPI (ioctl numbers, struct layouts, per kernel generation) has its own
  contract file, ``luo.uapi.abi``: it follows the kernel's header, not a version of ours.
- Formats we only read, whose version belongs to someone else: the DTB header (magic
  ``0xd00dfeed``, version 17, ``luo.kho.reader``) and the KVM API version (12,
  ``luo.vmm.kvm.system``).
- The control socket (libluo and ``luo`` to luod, ``luo.host.wire``) has no version: ops and
  fields are only ever added; a host answers an op it does not know with ENOTTY and ignores fields
  it does not know, and so does every reader of the messages below.

Rules common to every message protocol below: adding a field that a peer may ignore needs no
bump (every receiver ignores fields it does not know); a bump is needed when a message, a field
or the order of messages changes meaning, or when a receiver may no longer ignore a new field.

The VM state record's own versions (``luo.vmm.state``, one per component) are listed here too,
but the VMM's modules still define theirs (they belong to the save/restore work in
``luo.vmm``); ``tests/core/test_abi.py`` checks that both agree until they import them from here.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

from luo.errors import LuoError

# == The KHO tree (luo.kho; docs/kho.md) ==========================================================
#
# Each node of the handover tree names its layout with a compatible string. Bump (a new string:
# "luo-v2") on any change to a node's properties, its children, or the size or meaning of a value.
# A successor host that meets a compatible it does not know refuses the update at prepare with
# EOPNOTSUPP naming it (luo.host.successor, from luo.kho.required_compatibles, before the tree is
# even parsed), before anything is frozen, and the outgoing host carries on with every fd. Nobody speaks down: the outgoing host
# writes the tree, so an update to a version that does not read the strings it writes fails that
# way, cleanly, every time. A version that changes a layout should therefore go on reading the
# string it replaces, so that it can still take over from its predecessor.

KHO_COMPATIBLE = "kho-v1"  # the root
KHO_MEMORY_MAP_COMPATIBLE = "kho-memory-map-v1"  # /preserved-memory-map
LUO_COMPATIBLE = "luo-v1"  # /LUO
SUBSYSTEMS_COMPATIBLE = "subsystems-v1"  # /LUO/subsystems
FILE_DESCRIPTORS_COMPATIBLE = "file-descriptors-v1"  # /LUO/file-descriptors (RFC v2 global table)
LUO_SESSION_COMPATIBLE = "luo-session-v2"  # /LUO/luo-session (6.19 sessions)
# /preserved-memory-map/pool-map: the memory pool's map (luo.pool.memmap; docs/pool.md). A child of
# the memory map under a compatible of its own: a tree without a pool is exactly kho-memory-map-v1
# as before, and a successor that does not know pools refuses a tree with one at prepare by this
# string (EOPNOTSUPP), before the parser ever meets the unknown child.
POOL_MAP_COMPATIBLE = "luo-pool-map-v1"

# Every compatible of the tree itself (not the file handlers'): what a successor must know to
# read a tree at all.
TREE_COMPATIBLES: frozenset[str] = frozenset({
    KHO_COMPATIBLE,
    KHO_MEMORY_MAP_COMPATIBLE,
    LUO_COMPATIBLE,
    SUBSYSTEMS_COMPATIBLE,
    FILE_DESCRIPTORS_COMPATIBLE,
    LUO_SESSION_COMPATIBLE,
    POOL_MAP_COMPATIBLE,
})

# == File handlers (luo.handlers; docs/handlers.md) ===============================================
#
# A preserved file's node carries its handler's compatible (at most 48 bytes, as the kernel's
# handler ops). Bump on any change to what the file's u64 ``data`` means, to the ``meta,*`` keys a
# handler reads back (memfd: ``name``), or to what kind of fd crosses. Same refusal as the tree: a
# successor without a handler for the string refuses at prepare with EOPNOTSUPP naming it.

MEMFD_COMPATIBLE = "memfd-v1"  # data: the size in bytes, checked at prepare, freeze and retrieve
SOCKET_LISTEN_COMPATIBLE = "socket-listen-v1"  # data: the address family of the listening socket
PROBE_MEMFD_COMPATIBLE = "probe-memfd-v1"  # memfd-v1 with fault points: tests only (luo.testing.probe)

HANDLER_COMPATIBLES: frozenset[str] = frozenset({MEMFD_COMPATIBLE, SOCKET_LISTEN_COMPATIBLE})

# == Subsystems ===================================================================================
#
# A subsystem is named, not versioned: /LUO/subsystems holds ``<name> = <u64>``, and a successor
# drops (and logs) the data of a name it has no subsystem for. So the name is the version: a
# subsystem whose u64 changes meaning takes a new name ("vmm-v2"), and nothing may depend on an
# older successor reading it.

VMM_SUBSYSTEM = "vmm"  # u64: how many VMs crossed. Read by nobody: each VM's own session carries it
POOL_SUBSYSTEM = "pool"  # u64: the pool's size in bytes, checked against its record (the pool-map node)

# == The memory pool (luo.pool; docs/pool.md) ======================================================
#
# The pool's memfd crosses as a memfd-v1 file of the host's own session POOL_SESSION (token 0); its
# map is the tree's pool-map node (above). The end-label area (the last 128 KiB of a pool started
# with ``--labels end``) is read by whichever luo comes next, and by nothing else: bump
# POOL_LABEL_FORMAT on any change to a copy's layout; a luo that meets a format it does not know
# refuses to read the labels (EINVAL), and the pool's shards stay as they are.
HOST_SESSION_PREFIX = "luo:"  # the host's own sessions: a client's create or retrieve of one is EPERM
POOL_SESSION = HOST_SESSION_PREFIX + "pool"
POOL_LABEL_MAGIC = b"LUOLABEL"
POOL_LABEL_FORMAT = 1

# == Host to host: the handover messages (luo.host.handover, successor_link, successor) ===========
#
# The successor announces its protocol in its first message (``hello``), before anything is
# prepared. Bump on any change to the handover messages. The outgoing host speaks down to every
# successor from HANDOVER_OLDEST on (protocol 2 gets the full final tree, never "unchanged"),
# refuses an older one with EPROTONOSUPPORT before anything is prepared, and speaks its own protocol
# to a newer one: a version that bumps it must still understand every older protocol's messages
# from HANDOVER_OLDEST on (it is the successor of older hosts), or raise HANDOVER_OLDEST in the
# older version's stead (only possible in a release that older hosts will never update to).
# 1: one-stage handover (the tree and fds at freeze).
# 2: two-stage: the tree, fds and listener at prepare, the final tree at freeze.
# 3: as 2, and the final tree may be "unchanged" (the prepared one stands).

HANDOVER_PROTOCOL = 3
HANDOVER_OLDEST = 2
HANDOVER_UNANNOUNCED = 2  # what a successor that announces no protocol speaks (the versions before it did)

# == The crash record in the fd store (luo.core.crash, luo.host.mirror, luo.keeper) ================
#
# What a restarted luod rebuilds itself from: the fd store's metadata (a journal of units, over a
# snapshot in a memfd of its own). Bump CRASH_RECORD_FORMAT on any change to the metadata's fields
# or to the units' keys or values (luo.core.crash), CRASH_SNAPSHOT_FORMAT on any change to the
# snapshot. A luod reads its own format and every older one it lists (CRASH_RECORD_FORMATS_READ);
# one that meets a format it does not read refuses it (EPROTO, logged), starts empty and then drops
# the store's keys: the preserved fds are lost. A downgrade across a crash must therefore never
# meet a newer format: a new format is written only by a version that every later one reads, and
# a release that bumps it cannot be rolled back while a crash record of it exists.

CRASH_RECORD_FORMAT = "luo-crash-record-v2"  # the metadata: a snapshot key and a journal of units
CRASH_RECORD_FORMAT_V1 = "luo-crash-record-v1"  # a whole crash record (two KHO trees) per write
CRASH_RECORD_FORMATS_READ = (CRASH_RECORD_FORMAT, CRASH_RECORD_FORMAT_V1)
CRASH_SNAPSHOT_FORMAT = "luo-crash-units-v1"  # the snapshot memfd: every unit

# The name of the metadata in either store (the keeper's reserved key, systemd's FDNAME). Never
# renamed: a luod that looks under another name finds no crash record, and the same loss follows.
STORE_META_NAME = "luo-meta"

# The keeper's protocol (luo.keeper.server; ``ping`` answers it). Exact match: a luod refuses a
# keeper of another protocol (EPROTO) and runs without an fd store (said in its log; ``luo status``
# then shows no ``fd_store``). The keeper outlives every luod, updates and crashes alike, so a bump leaves every
# newer luod unprotected until the keeper is restarted, which drops every fd it holds. So do not
# bump it: add ops instead (a keeper answers an op it does not know with ENOTTY).
KEEPER_PROTOCOL = 1

# == VMs: what a VMM and its host, and a VMM and its successor, share ==============================
#
# The VM's session (luo.host.vms, luo.vmm.live.host_link): every VM's RAM and state memfds are
# preserved in the session "vm:NAME" under fixed tokens. A new host knows which VMs crossed (and
# waits for their blackout reports) by its incoming sessions with this prefix; a successor VMM
# retrieves its guest's session by name and its files by token. Never change either: a host that
# looks for another prefix waits for no VM, and a successor VMM that asks for another name or token
# gets ENOENT after the resume (the guest runs, unprotected until it is preserved anew). A new
# convention takes a new prefix or new tokens, read alongside the old ones.
VM_SESSION_PREFIX = "vm:"
VM_RAM_TOKEN = 0  # the guest's RAM memfd (memfd-v1)
VM_STATE_TOKEN = 1  # the state memfd (below)

# The state memfd's header (luo.vmm.live.statefile): magic, u64 record length, u64 pause start
# (CLOCK_MONOTONIC ns), then the VM state record. Bump (LUOVMSF2) on any change to the header. A
# successor VMM reads it at restore, inside the blackout, and refuses a magic it does not know
# (EPROTO): the old VMM then resumes the guest. So a new header must come with a new
# VMM_CHANNEL_PROTOCOL, and the outgoing VMM writes the old header to a successor that negotiated
# the older protocol: the pair then agrees, or is refused at warm-up, before the pause.
VMM_STATEFILE_MAGIC = b"LUOVMSF1"

# The VM state record inside it (luo.vmm.state: magic, u32 record version, u32 header length,
# header, payloads). Bump the record version on any change to the header or the component table,
# a component's version on any change to its payload (one device can change alone). A VMM reads
# every version in VMM_STATE_RECORDS_READ (a newer successor takes over from an older VMM), and
# refuses another with EPROTO at restore, inside the blackout: the old VMM resumes the guest. The
# channel does not yet tell the outgoing VMM which versions its successor reads (protocol-1
# successors from before record version 2 read only version 1), so an update to a VMM that cannot
# read the record fails at its switch, safely, not at prepare; a VMM_CHANNEL_PROTOCOL bump that says
# which records the successor reads (Vm.save(version=1) can already write the old one) would move
# that refusal to warm-up.
VMM_STATE_MAGIC = b"LUOVMST\x00"
VMM_STATE_RECORD_VERSION = 2  # written: a binary header and table, fixed components first
VMM_STATE_RECORDS_READ = (1, 2)  # 1: a JSON header and named blobs
VMM_STATE_COMPONENTS = {  # component: (version written in a version-2 record, every version read)
    "vcpu": (2, (1, 2)),  # 1: named blobs (record version 1); 2: the fast path's fixed layout
    "irqchip": (2, (1, 2)),
    "pit": (1, (1,)),
    "clock": (1, (1,)),
    "uart": (2, (1, 2)),  # luo.vmm.devices.uart16550; 1: JSON
    "mmio-console": (2, (1, 2)),  # 1: JSON
}

# A QEMU VM's state record (luo.qemu.machine), in the same state memfd and header: JSON that says
# what the migration moved (bytes, QEMU's own downtime) and when QEMU stopped the guest (its STOP
# event). The device state itself goes QEMU to QEMU (migration with x-ignore-shared), versioned
# by QEMU's machine type (the VM runs the versioned type, e.g. pc-i440fx-7.2, that its first QEMU
# resolved, so a newer QEMU loads it as the same machine). Bump (-v2) when a key a successor reads
# changes meaning; a successor refuses another format with EPROTO at restore and the old QEMU
# takes the guest back.
QEMU_STATE_RECORD_FORMAT = "luo-qemu-migration-v1"

# The boot block the VMM writes for the test guest (luo.vmm.loader, guest/src/guest.h): read once,
# at boot, by the guest image, which halts on another magic. Bump (LUOBOOT2) with any change to the
# block's layout, and rebuild the guest (guest/): images and VMMs must agree; nothing crosses an
# update in it.
GUEST_BOOT_MAGIC = 0x31544F4F424F554C  # "LUOBOOT1", little-endian

# ``<runtime>/vms/NAME/guest.json`` (luo.vmm.live.guest_state): the VMM that runs the guest writes
# what it is doing; any host reads it (a host and a VMM may be different installations). Adding a
# key needs no bump. Bump on a change to ``state``, ``since`` or ``vmm_pid`` (the keys a reader
# uses): a reader ignores a record of a format it does not know (luo status then shows the host's
# own view of the VM) rather than misread it. A record without ``format`` is format 1.
GUEST_STATE_FORMAT = 1

# == VMM to host: the registration and the host's requests (luo.vmm.live.host_link ↔ ==============
# luo.host.vms.supervision) and VMM to successor VMM: the channel (luo.vmm.live.outgoing ↔ incoming)
#
# Both are negotiated the same way (``negotiate``): each side says the newest protocol it speaks
# and the oldest it still speaks ("protocol", "oldest"); the pair speaks the older of the two
# newest, if both still speak it, else each side refuses the other with EPROTONOSUPPORT naming both
# ranges. A peer that says nothing speaks protocol 1 only (UNVERSIONED). So a newer version speaks
# down to an older peer as long as it keeps the older protocol (its OLDEST), and raising OLDEST is
# how a version drops one. Bump PROTOCOL on any change to the messages or their order (common rule
# above); raise OLDEST when a version can no longer speak an older protocol.
#
# Host and VMM check at registration (``vm_register`` and its reply), before the VMM serves: the
# host refuses the VMM (its registration fails; a new VM's start fails), the VMM refuses the host
# (it does not register and keeps retrying, with its guest running). Successor VMM and outgoing
# VMM check at warm-up, in the host's prepare: the successor refuses before it builds anything and
# the outgoing VMM before it keeps the successor; either way the update's prepare fails with
# EPROTONOSUPPORT and rolls back, and the guest never stops.
UNVERSIONED = 1

# VMM to host. 1: prepare (with the channel to the successor VMM), freeze, cancel, handed_over,
# stop, each answered with ``seq``. A protocol-1 VMM may be one from before the VMs switched after
# the host's handover (docs/design.md), whose ``handed_over`` expects a guest paused by ``freeze``;
# today's VMMs that send no version handle both. 2: as 1, and the VMM pauses and saves on
# ``handed_over`` itself: in an update the host freezes only protocol-1 VMMs (with its own freeze,
# the order they may expect) and lets protocol-2 VMMs switch after the handover.
VMM_HOST_PROTOCOL = 2
VMM_HOST_OLDEST = 1
VMM_HOST_SWITCHES_AFTER_HANDOVER = 2  # the first protocol whose VMMs pause on handed_over themselves

# VMM to successor VMM. 1: ``warm`` (+ RAM and state memfds) -> ``warm`` reply or an error;
# ``saved`` -> ``go`` -> ``resumed``; ``abort`` at any point before ``go``. The order the running
# VMM sends them in changed when the VMs began to switch after the host's handover (``saved`` now
# comes at ``handed_over``, followed at once by ``go``; before, ``saved`` came at the host's freeze
# and ``go`` at ``handed_over``), but a successor sees the same messages in the same order either
# way: VMMs before and after that change are protocol-1 peers of each other in both directions.
VMM_CHANNEL_PROTOCOL = 1
VMM_CHANNEL_OLDEST = 1

# == The update record (luo.observe; docs/observe.md) =============================================
#
# ``<runtime>/updates/NNNNNN.json`` and ``NNNNNN-host.json``, read by ``luo timeline`` and ``luo
# metrics`` of whatever version comes later (or on another machine). Adding fields needs no bump
# (readers ignore the ones they do not use). Bump on a change to a field the readers use
# (``liveupdate_number``, ``phases_ms``, ``timeline`` entries, each VM's ``blackout_ms``,
# ``parts_ms``, ``blackout_ns``): a reader refuses a record of a newer format with EINVAL naming both,
# rather than draw it wrong. A record without ``format`` is 1 without a timeline (laid end to end)
# and 2 with one. 1: host ``phases_ms`` and each VM's ``parts_ms``; 2: + ``timeline`` (every phase
# of every process on CLOCK_MONOTONIC) and each VM's ``blackout_ns``.
UPDATE_RECORD_FORMAT = 2


# == Negotiation ==================================================================================

def announce(newest: int, oldest: int) -> dict[str, int]:
    """The fields a side adds to its message so the other can check it (``negotiate``)."""
    return {"protocol": newest, "oldest": oldest}


def announced(msg: Mapping[str, object]) -> tuple[int, int]:
    """(newest, oldest) a peer announced in ``msg``. Nothing announced: protocol 1 only, as every
    version before the field was added; no ``oldest``: only its newest. EPROTO for anything that
    is not ``1 <= oldest <= protocol`` in integers."""
    newest = msg.get("protocol", UNVERSIONED)
    oldest = msg.get("oldest", newest)
    if not (isinstance(newest, int) and isinstance(oldest, int) and not isinstance(newest, bool)
            and not isinstance(oldest, bool) and 1 <= oldest <= newest < 1 << 31):
        raise LuoError(errno.EPROTO, f"the peer announces protocol {str(newest)[:20]!r} and oldest "
                       f"{str(oldest)[:20]!r}: not integers with 1 <= oldest <= protocol")
    return newest, oldest


def _span(newest: int, oldest: int) -> str:
    return str(newest) if newest == oldest else f"{oldest} to {newest}"


def negotiate(what: str, mine: tuple[int, int], theirs: tuple[int, int], peer: str, me: str) -> int:
    """The protocol two sides speak: the older of their newest, if both still speak it.

    ``mine``/``theirs``: (newest, oldest). Both sides run this with the same two ranges and get the
    same answer, so either may refuse first. Refused: EPROTONOSUPPORT naming both ranges, e.g.
    ``successor VMM pid 7 speaks VMM channel protocol 99; this VMM speaks 1``.
    """
    chosen = min(mine[0], theirs[0])
    if chosen < max(mine[1], theirs[1]):
        raise LuoError(errno.EPROTONOSUPPORT,
                       f"{peer} speaks {what} {_span(*theirs)}; {me} speaks {_span(*mine)}: none in common")
    return chosen
