"""Hostile input on the control socket is refused, never fatal (issue 6, point 3).

A real host holds a preserved global memfd (from a client that has gone) and a session with a
memfd. About 100,000 generated and mutated messages then reach it over raw SEQPACKET sockets:
random JSON of every type and depth, variants of the valid request of every op in the host's
tables (global and session), byte-level mutations, garbage, NaN and Infinity, huge integers,
deep nesting (the 200 KB one included), empty and oversize datagrams, with and without stray fds.
Afterwards the same host process must answer, hold exactly as many fds as before, still list the
preserved fds, and carry them bit-exact through a real update.

What would legitimately destroy or replace the preserved state is never sent in a form the host
would accept: ``update``, ``finish``, ``vm_start``, ``vm_stop`` and ``vm_register`` go only as
variants with a bad field (or with a stray fd, which every op that takes none refuses), and no
request names the real global token or the real session. Every message goes through the host's
own parser first (luo.host.wire.parse) to make sure of that, whatever the mutations did to it.
Session ops are fuzzed on scratch sessions the fuzz itself creates and closes.

LUO_FUZZ_MESSAGES and LUO_FUZZ_SEED change the amount and the seed (the seed is printed).
"""

from __future__ import annotations

import array
import collections
import errno
import hashlib
import json
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from luo.errors import LuoError
from luo.host import ops as host_ops
from luo.host import vms as host_vms
from luo.host.wire import MAX_MSG, SCM_MAX_FD, parse
from luo.testing.host import HostProcess
from luo.testing.memfds import sha_of
from luo.testing.wait import wait_for

N_MESSAGES = int(os.environ.get("LUO_FUZZ_MESSAGES", "100000"))
WINDOW = 8  # requests in flight per connection: the host answers each in order
GLOBAL_CONNS = 3
SCRATCH_SESSIONS = 3
REPLY_TIMEOUT = 30.0

KEEP_SESSION = "fuzz-keep"
DANGEROUS = {"update", "finish", "vm_start", "vm_stop", "vm_register"}  # only ever sent in a refused form


# -- the host's op tables -------------------------------------------------------------------


def op_tables() -> tuple[set[str], set[str]]:
    """The op names a host serves (global, on a session fd), read from the code that installs them."""
    stub = SimpleNamespace(ops={}, session_ops={}, extensions=[], runtime=None,
                           orch=SimpleNamespace(status=lambda: {}))
    host_ops.install(stub)  # type: ignore[arg-type]
    host_vms.install(stub)  # type: ignore[arg-type]
    return set(stub.ops), set(stub.session_ops)


# -- raw JSON values: what json.dumps cannot write ------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON-ish token spliced into the text as is (NaN, 1e999, a 5,000-digit integer, ...)."""

    text: str


RAWS = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-1e999"), Raw("1e-999"),
        Raw("9" * 5000), Raw("-" + "9" * 4300), Raw('"\\ud800"'), Raw('"a\\u0000b"'), Raw("nan"), Raw("01"),
        Raw("tru"), Raw('"\\x"'), Raw("[" * 40 + "]" * 40), Raw("{}" * 3)]


UNPARSABLE = [Raw("NaN"), Raw("Infinity"), Raw("1e999"), Raw("9" * 5000), Raw("[" * 40 + "]" * 40)]


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down (True is not 1 here, unlike in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def dumps(obj: Any) -> bytes:
    raws: list[str] = []

    def swap(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(o, dict):
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        return o

    text = json.dumps(swap(obj), separators=(",", ":"))
    for i, r in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', r, 1)
    return text.encode("utf-8", "surrogatepass")


# -- field specs: good values and bad ones, per op ------------------------------------------

BIG = [2**64, 2**64 - 1, -(2**63) - 1, 10**4000, -1, 0]
NOT_NUMBERS = [True, False, "1", [], {}, [1], {"a": 1}]
NOT_STRINGS = [1, 0, True, 1.5, [], {}, ["a"], {"a": "b"}]


@dataclass
class Field:
    good: Callable[[random.Random], Any]
    bad: list[Any]


def u64_good(r: random.Random) -> int:
    return r.choice([r.randrange(1, 64), r.getrandbits(64), 2**64 - 1, r.randrange(1000, 10**6)])


def session_name_good(r: random.Random) -> str:
    return r.choice([f"fz-{r.getrandbits(32):x}", "é" * 31 + "-", f"{'s' * 50}{r.getrandbits(24):x}"[:63]])


def vm_name_good(r: random.Random) -> str:
    return f"fz{r.getrandbits(24):x}"


TOKEN = Field(u64_good, [-1, 2**64, 1.0, 0.5, True, False, "1", [], {}, [0], 10**4000, Raw("NaN"), Raw("1e999")])
SESSION_NAME = Field(session_name_good, ["x" * 64, "é" * 32, "a\x00b", Raw('"\\ud800"'), *NOT_STRINGS, "x" * 5000])
VM_NAME = Field(vm_name_good, ["", "-x", "../x", "a b", "a" * 49, "x\n", "x/y", *NOT_STRINGS])
PROGRAM = Field(lambda r: r.choice(["", "selftest pid 123", "é" * 100]),
                ["x" * 201, "é" * 101, "a\x00b", Raw('"\\ud800"'), *NOT_STRINGS])
U64 = Field(u64_good, [-1, 2**64, 1.0, True, "1", [], {}, 10**4000, Raw("NaN")])
TIMEOUT_BAD = [0, -1, 0.0, -0.5, 3601, 1e300, 10**4000, *NOT_NUMBERS, Raw("NaN"), Raw("Infinity"), Raw("1e999")]


def timeout_good(r: random.Random) -> float:
    return r.choice([0.01, 1, 5.5, 3600])


TEMPLATES: dict[str, dict[str, Field]] = {
    "get_state": {},
    "status": {},
    "vm_list": {},
    "prepare": {},
    "freeze": {},
    "cancel": {},
    "finish": {},
    "preserve_fd": {"token": TOKEN},
    "unpreserve_fd": {"token": TOKEN},
    "restore_fd": {"token": TOKEN},
    "retrieve_fd": {"token": TOKEN},
    "create_session": {"name": SESSION_NAME, "program": PROGRAM},
    "retrieve_session": {"name": SESSION_NAME, "program": PROGRAM},
    "get_name": {},
    "open_device": {"program": PROGRAM},
    "close_device": {},
    "preserved_size": {"dev": U64, "ino": U64},
    "kho_dump": {"which": Field(lambda r: r.choice(["incoming", "outgoing"]),
                                ["Incoming", "both", "", 1, True, [], {}, "incoming\x00"])},
    "wait_update": {"wait": Field(lambda r: r.choice([0.001, 0.01, 1]), TIMEOUT_BAD)},
    "update": {
        "handover_timeout": Field(timeout_good, TIMEOUT_BAD),
        "start_timeout": Field(timeout_good, TIMEOUT_BAD),
        "to": Field(lambda r: r.choice(["", "/nonexistent/luo"]),
                    [5, True, {}, [1], ["a", 2], [], "   ", "'unbalanced", "a\x00b", ["x" * 5000], 1.5]),
        "faults": Field(lambda r: [], [5, "corrupt-tree", [1], [None], ["x" * 300], {}, True]),
    },
    "vm_start": {
        "name": VM_NAME,
        "mem": Field(lambda r: r.choice(["256M", 64 << 20, "1G"]),
                     ["lots", -1, 0, 1 << 41, True, "1.5", "5X", 1.5, "2T", "", [], Raw("NaN")]),
        "cpus": Field(lambda r: r.randrange(1, 65), [0, 65, -1, True, 2.5, "2", [], 10**4000]),
        "image": Field(lambda r: "/nonexistent/guest.elf", [5, [], {}, "a\x00b", "x" * 5000]),
        "cmdline": Field(lambda r: "console=ttyS0", [5, [], {}, "a\x00b", "x" * 5000]),
        "timeout": Field(timeout_good, TIMEOUT_BAD),
    },
    "vm_stop": {"name": VM_NAME},
    "vm_register": {
        "name": VM_NAME,
        "pid": Field(lambda r: r.randrange(1, 1 << 22), [0, -1, 1 << 23, True, "1", 1.5, [], 2**64]),
        "info": Field(lambda r: {"mem": 1 << 28, "cpus": 1}, [5, "x", [], True, {"k": "x" * 20000}]),
        "report": Field(lambda r: {"blackout_ms": 1.5}, [5, "x", [], True, {"k": "x" * 70000}]),
    },
}
REQUIRED = {"unpreserve_fd": {"token"}, "restore_fd": {"token"}, "retrieve_fd": {"token"},
            "create_session": {"name"}, "retrieve_session": {"name"}, "preserved_size": {"dev", "ino"},
            "vm_start": {"name"},
            "vm_stop": {"name"}, "vm_register": {"name"}}
SESSION_TOKEN_REQUIRED = {"preserve_fd"}  # on a session fd the token is required


# -- the generator --------------------------------------------------------------------------


class Gen:
    """Random messages. ``invalid_variant`` is the only source of the ops in DANGEROUS without fds."""

    def __init__(self, r: random.Random, op_names: list[str]) -> None:
        self.r = r
        self.op_names = op_names
        self.scalars: list[Callable[[], Any]] = [
            lambda: None, lambda: r.random() < 0.5, lambda: r.randrange(-1000, 1000), lambda: r.choice(BIG),
            lambda: r.uniform(-1e9, 1e9), lambda: r.choice([0.0, -0.0, 1e308, 5e-324]), self.string,
            lambda: r.choice(RAWS),
        ]

    def string(self) -> str:
        r = self.r
        k = r.random()
        if k < 0.5:
            return "".join(r.choice("abcdefghijklmnopqrstuvwxyz_-.:/ ") for _ in range(r.randrange(0, 20)))
        if k < 0.7:
            return "".join(chr(r.randrange(0, 0x3000)) for _ in range(r.randrange(0, 10)))
        if k < 0.8:
            return r.choice(self.op_names)
        if k < 0.9:
            return '"\\[{' * r.randrange(1, 20)
        return r.choice(["", "\x00", "\ud800", "x" * r.randrange(100, 20000)])

    def value(self, depth: int) -> Any:
        r = self.r
        if depth <= 0 or r.random() < 0.45:
            return r.choice(self.scalars)()
        if r.random() < 0.5:
            return [self.value(depth - 1) for _ in range(r.randrange(0, 5))]
        return {self.string()[:12]: self.value(depth - 1) for _ in range(r.randrange(0, 5))}

    def op_value(self) -> Any:
        r = self.r
        k = r.random()
        if k < 0.75:
            return r.choice(self.op_names)
        if k < 0.85:
            name = r.choice(self.op_names)
            return r.choice([name.upper(), name + " ", name[:-1], " " + name, name + "\x00", name * 30])
        return self.value(2)

    def variant(self, op: str, *, on_session: bool, must_fail: bool) -> dict[str, Any]:
        """The request of ``op``, each field good, bad or absent; at least one bad if ``must_fail``."""
        r = self.r
        spec = TEMPLATES[op]
        names = list(spec)
        bad: set[str] = set()
        if must_fail:
            if not names:
                raise AssertionError(f"{op} has no field to make bad")
            bad = set(r.sample(names, r.randrange(1, len(names) + 1)))
        elif names and r.random() < 0.5:
            bad = set(r.sample(names, r.randrange(1, len(names) + 1)))
        required = set(REQUIRED.get(op, set()))
        if on_session and op in SESSION_TOKEN_REQUIRED:
            required.add("token")
        msg: dict[str, Any] = {"op": op}
        for name in names:
            f = spec[name]
            if name in bad:
                msg[name] = r.choice(f.bad)
            elif name in required or r.random() < 0.7:
                msg[name] = f.good(r)
        if r.random() < 0.2:  # unknown fields are ignored: they must not change the outcome
            for _ in range(r.randrange(1, 4)):
                msg.setdefault(self.string()[:10] or "x", self.value(2))
        return msg

    def mutate(self, data: bytes) -> bytes:
        r = self.r
        b = bytearray(data)
        for _ in range(r.randrange(1, 5)):
            k = r.randrange(7)
            i = r.randrange(len(b) + 1)
            if k == 0 and b:
                b[min(i, len(b) - 1)] ^= 1 << r.randrange(8)
            elif k == 1:
                b[i:i] = bytes([r.randrange(256)])
            elif k == 2:
                del b[i : i + r.randrange(1, 8)]
            elif k == 3:
                j = r.randrange(len(b) + 1)
                b[i:i] = b[min(i, j) : max(i, j)][:2000]
            elif k == 4:
                del b[i:]
            elif k == 5:
                b[i:i] = r.choice([b"[" * r.randrange(1, 50), b"{", b'"', b"\\", b"NaN", b"\xff\xfe", b"\x00"])
            else:
                b[i:i] = dumps(self.value(3))
        return bytes(b)

    SPECIALS = [
        b"[" * 200_000,  # the 200 KB nested message that used to end luod
        b'{"a":' * 40_000,
        b'{"op":"get_state","x":' + b"[" * 33 + b"]" * 33 + b"}",  # one level too deep
        b'{"op":"get_state","x":' + b"[" * 31 + b"]" * 31 + b"}",  # deep but allowed
        b'{"op":"get_state","x":"' + b"[" * 5000 + b'"}',  # brackets in a string are text
        b'{"op":"get_state","x":"\\"' + b"[" * 5000 + b'"}',
        b'{"op":"get_state","x":"' + b"[" * 5000,  # unterminated
        b'{"op":"get_state"} ' + b"[" * 1000,
        b"\xef\xbb\xbf{}",
        '{"op":"get_state"}'.encode("utf-16"),
        '{"op":"get_state"}'.encode("utf-32"),
        b'{"op":"get_state","x":NaN}',
        b'{"op":"get_state","x":-Infinity}',
        b'{"op":"get_state","x":1e400}',
        b'{"op":"get_state","x":' + b"1" * 5000 + b"}",
        b'{"op":' + b"9" * 4000 + b"}",
        b'{"op":"\\ud800"}',
        b'{"op":"' + b"x" * 100_000 + b'"}',
        b'{"op":"get_state","op":"status"}',
        b"null", b"true", b"0", b'"op"', b"[]", b"{}", b" ", b"\x00", b"\xff" * 64,
    ]

    def message(self, on_session: bool) -> tuple[bytes, bool]:
        """(bytes, built to fail): one message for a global or a session connection."""
        r = self.r
        k = r.random()
        if k < 0.45:
            op = r.choice(self.op_names)
            must_fail = op in DANGEROUS
            if must_fail and not TEMPLATES[op]:  # no field to make bad: the parser refuses it
                return dumps({"op": op, "x": r.choice(UNPARSABLE)}), True
            return dumps(self.variant(op, on_session=on_session, must_fail=must_fail)), must_fail
        if k < 0.60:
            msg: dict[str, Any] = {"op": self.op_value()}
            for _ in range(r.randrange(0, 5)):
                msg[self.string()[:12]] = self.value(3)
            return dumps(msg), False
        if k < 0.70:
            return dumps(self.value(r.randrange(0, 8))), False
        if k < 0.87:
            op = r.choice(self.op_names)
            base = dumps(self.variant(op, on_session=on_session, must_fail=op in DANGEROUS and bool(TEMPLATES[op])))
            return self.mutate(base), False
        if k < 0.95:
            return r.choice(self.SPECIALS[2:]), False
        return os.urandom(r.randrange(1, 300)), False


# -- connections ----------------------------------------------------------------------------


@dataclass
class Pending:
    op: Any  # the op as the host parses it (None when it does not parse)
    fds: int


@dataclass
class Chan:
    sock: socket.socket
    session: bool
    pending: collections.deque[Pending] = field(default_factory=collections.deque)


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(REPLY_TIMEOUT)
    s.connect(str(path))
    return s


def send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(SCM_MAX_FD * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data and not fds:
        return None
    assert not flags & socket.MSG_TRUNC, "a reply larger than 1 MiB"
    reply = json.loads(data)
    assert isinstance(reply, dict) and isinstance(reply.get("errno"), int), reply
    return reply, list(fds)


class Fuzzer:
    def __init__(self, host: HostProcess, seed: int, protect_tokens: set[int], protect_names: set[str]) -> None:
        self.host = host
        self.r = random.Random(seed)
        global_ops, session_ops = op_tables()
        missing = (global_ops | session_ops) - set(TEMPLATES)
        assert not missing, f"ops without a fuzz template: {sorted(missing)}; add them to TEMPLATES"
        self.gen = Gen(self.r, sorted(global_ops | session_ops))
        self.protect_tokens = protect_tokens
        self.protect_names = protect_names
        self.chans = [Chan(connect(host.rt.socket), False) for _ in range(GLOBAL_CONNS)]
        self.scratch: list[Chan] = []
        self.leaked_tokens: list[int] = []  # global preserves that succeeded, to unpreserve
        self.sent = 0
        self.replies = 0
        self.errnos: collections.Counter[int] = collections.Counter()
        self.internal_errors: list[str] = []
        self.accepted_dangerous: list[str] = []
        self.reconnects = 0
        self.gated = 0
        self.sessions_created = 0
        null = os.open("/dev/null", os.O_RDONLY)
        rd, wr = os.pipe()
        mem = os.memfd_create("fuzz-stray", os.MFD_ALLOW_SEALING)
        os.write(mem, b"stray" * 100)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stray_socks = [a, b]
        self.strays = [null, rd, wr, mem, a.fileno()]
        self.stray_owned = [null, rd, wr, mem]

    # ---------------------------------------------------------------------------------------
    def stray_fds(self) -> list[int]:
        r = self.r
        k = r.random()
        if k < 0.72:
            return []
        if k < 0.995:
            return [r.choice(self.strays) for _ in range(r.randrange(1, 4))]
        return [r.choice(self.strays) for _ in range(r.randrange(4, SCM_MAX_FD + 1))]

    def gate(self, data: bytes, fds: list[int], on_session: bool) -> tuple[list[int], Any]:
        """Parse as the host will, and make sure of the refusal of whatever could touch the
        protected state: a dangerous op must carry a field from its bad list (checked here on the
        parsed message, whatever mutations did), or it gets a stray fd, which every op refuses
        but preserve_fd. Returns the fds to send and the op as the host will see it."""
        if len(data) > MAX_MSG:
            return fds, None
        try:
            msg = parse(data)
        except LuoError:
            return fds, None
        op = msg.get("op")
        if on_session or fds or not isinstance(op, str):
            return fds, op  # scratch sessions are ours to break; a non-string op is refused
        spec = TEMPLATES.get(op, {})
        surely_refused = any(same(msg[name], b) for name, f in spec.items() if name in msg for b in f.bad)
        token, name = msg.get("token"), msg.get("name")
        risky = (op in DANGEROUS and not surely_refused
                 or op in ("unpreserve_fd", "restore_fd") and any(token == t for t in self.protect_tokens)
                 or op in ("retrieve_session", "create_session") and any(name == n for n in self.protect_names))
        if risky:
            self.gated += 1
            return [self.strays[0]], op
        return fds, op

    def chan_for(self) -> Chan:
        if self.scratch and self.r.random() < 0.25:
            return self.r.choice(self.scratch)
        return self.r.choice(self.chans)

    def submit(self, ch: Chan, data: bytes, fds: list[int], op: Any) -> None:
        try:
            send(ch.sock, data, fds)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.reconnect(ch)
                return
            raise
        ch.pending.append(Pending(op, len(fds)))
        self.sent += 1

    def drain(self, ch: Chan) -> None:
        while ch.pending:
            p = ch.pending.popleft()
            got = recv(ch.sock)
            if got is None:
                self.reconnect(ch)
                return
            reply, rfds = got
            self.replies += 1
            self.errnos[reply["errno"]] += 1
            if str(reply.get("error", "")).startswith("internal error"):
                self.internal_errors.append(f"{p.op!r}: {reply['error']}")
            self.take(ch, p, reply, rfds)

    def take(self, ch: Chan, p: Pending, reply: dict[str, Any], rfds: list[int]) -> None:
        if reply["errno"] == 0 and p.op in DANGEROUS and not ch.session:
            self.accepted_dangerous.append(f"{p.op}: {reply}")
        if reply["errno"] == 0 and p.op == "preserve_fd" and not ch.session:
            self.leaked_tokens.append(reply["token"])
        if (reply["errno"] == 0 and p.op == "create_session" and not ch.session and len(rfds) == 1
                and len(self.scratch) < SCRATCH_SESSIONS):
            self.sessions_created += 1
            s = socket.socket(fileno=rfds.pop())
            s.settimeout(REPLY_TIMEOUT)
            self.scratch.append(Chan(s, True))
        for fd in rfds:
            os.close(fd)

    def reconnect(self, ch: Chan) -> None:
        ch.pending.clear()
        ch.sock.close()
        if ch.session:
            self.scratch.remove(ch)
            return
        self.reconnects += 1
        ch.sock = connect(self.host.rt.socket)

    def close_scratch(self) -> None:
        """Closing a session fd unpreserves the session and whatever the fuzz preserved in it."""
        ch = self.scratch.pop(self.r.randrange(len(self.scratch)))
        ch.sock.close()

    def unpreserve_leaked(self) -> None:
        ch = self.chans[0]
        self.drain(ch)
        keep: list[int] = []
        for t in self.leaked_tokens:
            send(ch.sock, dumps({"op": "unpreserve_fd", "token": t}), [])
            got = recv(ch.sock)
            assert got is not None
            self.sent += 1
            self.replies += 1
            if got[0]["errno"] == errno.EBUSY or got[0]["errno"] and got[0]["errno"] != errno.ENOENT:
                keep.append(t)  # refused while prepared or frozen: later
        self.leaked_tokens = keep

    # -- the rare ones ------------------------------------------------------------------------
    def empty_datagram(self) -> None:
        """An empty datagram reads as EOF: the host closes that connection, and only that one."""
        s = connect(self.host.rt.socket)
        s.send(b"")
        assert s.recv(16) == b""
        s.close()
        self.sent += 1

    def expect(self, ch: Chan, data: bytes, fds: list[int], err: int) -> None:
        """One message whose refusal is known: sent alone on ``ch``, its errno checked."""
        self.drain(ch)
        send(ch.sock, data, fds)
        got = recv(ch.sock)
        assert got is not None, f"the host closed the connection on {data[:40]!r}"
        assert got[0]["errno"] == err, (data[:40], got[0])
        for fd in got[1]:
            os.close(fd)
        self.sent += 1
        self.replies += 1
        self.errnos[err] += 1

    def oversize(self) -> None:
        """More than MAX_MSG: the host's read is truncated and refused with EMSGSIZE."""
        s = connect(self.host.rt.socket)
        try:
            s.setsockopt(socket.SOL_SOCKET, 32, MAX_MSG * 2)  # SO_SNDBUFFORCE (root)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MSG * 2)
        data = b'{"op":"get_state","pad":"' + b"x" * MAX_MSG + b'"}'
        try:
            send(s, data, [self.strays[3]])
        except OSError as e:
            assert e.errno == errno.EMSGSIZE, e
            s.close()
            return
        got = recv(s)
        assert got is not None and got[0]["errno"] == errno.EMSGSIZE, got
        s.close()
        self.sent += 1
        self.replies += 1
        self.errnos[errno.EMSGSIZE] += 1


    # -- the run ------------------------------------------------------------------------------
    def run(self, n: int) -> None:
        r = self.r
        rare_every = max(1, n // 20)
        next_rare = rare_every // 2
        while self.sent < n:
            ch = self.chan_for()
            for _ in range(WINDOW):
                data, _ = self.gen.message(ch.session)
                fds = self.stray_fds()
                if not data and not fds:
                    self.empty_datagram()  # would end this connection: on one of its own
                    continue
                fds, op = self.gate(data, fds, ch.session)
                self.submit(ch, data, fds, op)
                if ch.session and ch not in self.scratch:
                    break
            if ch.session and ch not in self.scratch:
                continue
            self.drain(ch)
            if self.sent >= next_rare:
                next_rare += rare_every
                self.expect(self.chans[0], Gen.SPECIALS[0], self.stray_fds(), errno.EINVAL)  # 200 KB of [
                self.expect(self.chans[1], Gen.SPECIALS[1], self.stray_fds(), errno.EINVAL)
                self.expect(self.chans[1], b"", [self.strays[1]], errno.EINVAL)  # no bytes, but an fd
                self.empty_datagram()
                self.oversize()
                if self.scratch:
                    self.close_scratch()
                self.unpreserve_leaked()
            if self.sent % 997 < WINDOW and r.random() < 0.5:
                self.submit(self.chans[0], dumps({"op": "cancel"}), [], "cancel")  # mostly NORMAL
                self.drain(self.chans[0])

    def close(self) -> None:
        for ch in self.chans + self.scratch:
            self.drain(ch)
        for ch in self.scratch:
            ch.sock.close()
        self.scratch = []
        self.submit(self.chans[0], dumps({"op": "cancel"}), [], "cancel")  # NORMAL again, if it was not
        self.drain(self.chans[0])
        self.unpreserve_leaked()
        assert not self.leaked_tokens, f"preserved by the fuzz and not unpreservable: {self.leaked_tokens}"
        for ch in self.chans:
            ch.sock.close()
        for fd in self.stray_owned:
            os.close(fd)
        for s in self.stray_socks:
            s.close()


# -- the test -------------------------------------------------------------------------------

MiB = 1 << 20


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fd_count(host: HostProcess) -> int:
    """The host's fds, less the one of the probe connection whose answer shows the host has
    handled everything that happened before it connected (closes included)."""
    s = connect(host.rt.socket)
    send(s, b'{"op":"get_state"}', [])
    got = recv(s)
    assert got is not None and got[0]["errno"] == 0
    n = fd_count(got[0]["pid"]) - 1
    s.close()
    return n



def test_fuzz_control_socket(host: HostProcess) -> None:
    t_start = time.perf_counter()
    # a global memfd preserved by a client that then goes away (RFC v2 call)
    gdata = os.urandom(MiB + 123)
    with host.client() as c:
        fd = os.memfd_create("fuzz-global", os.MFD_ALLOW_SEALING)
        os.write(fd, gdata)
        gtoken = c.preserve_fd(fd)
        os.close(fd)
    # a session with a memfd, kept open through the fuzz
    sdata = os.urandom(MiB // 2 + 7)
    c = host.client()
    sess = c.create_session(KEEP_SESSION)
    fd = os.memfd_create("fuzz-session", os.MFD_ALLOW_SEALING)
    os.write(fd, sdata)
    sess.preserve_fd(fd, 1)
    os.close(fd)
    c.close()

    pid = host.pid
    assert pid is not None
    before = settled_fd_count(host)
    seed = int(os.environ.get("LUO_FUZZ_SEED", str(random.randrange(1 << 32))))
    fz = Fuzzer(host, seed, {gtoken}, {KEEP_SESSION})
    t0 = time.perf_counter()
    fz.run(N_MESSAGES)
    fz.close()
    elapsed = time.perf_counter() - t0
    print(f"\nfuzz seed {seed}: {fz.sent} messages ({fz.replies} replies) in {elapsed:.1f} s, "
          f"{fz.sent / elapsed:.0f}/s; {fz.reconnects} reconnects, {fz.gated} gated, "
          f"{fz.sessions_created} scratch sessions; errnos {dict(fz.errnos.most_common())}")

    assert fz.sent >= N_MESSAGES
    assert not fz.internal_errors, fz.internal_errors[:10]
    assert not fz.accepted_dangerous, fz.accepted_dangerous[:10]
    assert fz.reconnects == 0, "the host closed a connection that had sent no empty datagram"
    # the same host, alive and answering
    assert host.proc is not None and host.proc.poll() is None
    assert host.pid == pid
    # exactly the fds it had before, once every connection of ours is closed
    wait_for(lambda: settled_fd_count(host) == before, 10,
             f"the host's fd count to come back to {before} (now {fd_count(pid)})")
    with host.client() as c:
        assert c.state.label == "normal"
        st = c.status()
    assert st["pid"] == pid
    # the preserved fds are still there, and nothing the fuzz preserved is left
    assert sorted((f["token"], f["session"], f["name"]) for f in st["files"]) == [
        (gtoken, None, "fuzz-global"), (1, KEEP_SESSION, "fuzz-session")], st["files"]
    assert [(s["name"], s["files"]) for s in st["sessions"]] == [(KEEP_SESSION, [1])]
    assert "Traceback" not in host.log.read_text(errors="replace")

    # and they cross a real update bit-exact
    result = host.update()
    assert result["old_pid"] == pid and host.pid == result["new_pid"] != pid
    sess.close()  # the old host's session fd is dead; the session is retrieved from the new host
    with host.client() as c:
        gfd = c.restore_fd(gtoken)
        assert sha_of(gfd) == hashlib.sha256(gdata).hexdigest()
        os.close(gfd)
        s2 = c.retrieve_session(KEEP_SESSION)
        sfd = s2.retrieve_fd(1)
        assert sha_of(sfd) == hashlib.sha256(sdata).hexdigest()
        os.close(sfd)
        s2.finish()
        s2.close()
    print(f"fuzz test total {time.perf_counter() - t_start:.1f} s")


def test_refusals_name_the_field_and_change_nothing(host: HostProcess) -> None:
    """Each bad value of a dangerous op is refused with EINVAL before anything starts."""
    s = connect(host.rt.socket)
    pid = host.pid

    def ask(msg: dict[str, Any] | bytes, fds: list[int] | None = None) -> dict[str, Any]:
        send(s, msg if isinstance(msg, bytes) else dumps(msg), fds or [])
        got = recv(s)
        assert got is not None
        for fd in got[1]:
            os.close(fd)
        return got[0]

    r = random.Random(0)
    for op in sorted(DANGEROUS):
        for name, f in TEMPLATES[op].items():
            for bad in f.bad:
                good = {k: TEMPLATES[op][k].good(r) for k in REQUIRED.get(op, set()) if k != name}
                reply = ask({"op": op, **good, name: bad})
                assert reply["errno"] == errno.EINVAL, (op, name, bad, reply)
                assert "internal error" not in reply["error"]
    reply = ask({"op": "update", "handover_timeout": -1})
    assert reply["error"].startswith("handover_timeout: "), reply
    assert ask(b'{"op":"update","handover_timeout":NaN}')["errno"] == errno.EINVAL
    assert ask({"op": 5})["error"].startswith("op: ")
    assert ask({"op": ["get_state"]})["errno"] == errno.EINVAL
    assert ask({"op": "x" * 100_000})["errno"] == errno.EINVAL
    assert len(ask({"op": "get_state" * 7})["error"]) < 200
    assert ask(Gen.SPECIALS[0])["errno"] == errno.EINVAL
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        reply = ask({"op": "get_state"}, [null])
        assert reply["errno"] == errno.EINVAL and reply["error"].startswith("fds: "), reply
        assert ask({"op": "preserve_fd"}, [null, null])["errno"] == errno.EBADF
    finally:
        os.close(null)
    assert ask({"op": "get_state"})["pid"] == pid
    assert host.state() == "normal"
    s.close()
