"""luo.abi, the contract: the negotiation rule, and that every version lives there and only there."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest

from luo import abi
from luo.errors import LuoError
from luo.handlers import default_handlers
from luo.observe.timeline import parse_record

SRC = Path(abi.__file__).parent


# -- the rule: the older of the two newest, if both still speak it ---------------------------------

@pytest.mark.parametrize(("mine", "theirs", "chosen"), [
    ((1, 1), (1, 1), 1),
    ((2, 1), (1, 1), 1),  # a newer side speaks down to a protocol-1 peer...
    ((1, 1), (2, 1), 1),  # ...whichever side it is
    ((3, 2), (5, 1), 3),
    ((3, 1), (3, 3), 3),
])
def test_negotiate_picks_the_older_newest_both_speak(mine: tuple[int, int], theirs: tuple[int, int],
                                                     chosen: int) -> None:
    assert abi.negotiate("P", mine, theirs, "peer", "me") == chosen
    assert abi.negotiate("P", theirs, mine, "me", "peer") == chosen  # both sides agree


@pytest.mark.parametrize(("mine", "theirs"), [
    ((1, 1), (99, 99)),  # a peer that dropped everything we speak
    ((3, 3), (2, 1)),  # we dropped what the peer speaks
    ((5, 4), (3, 1)),
])
def test_negotiate_refuses_disjoint_ranges_on_both_sides_naming_both(mine: tuple[int, int],
                                                                      theirs: tuple[int, int]) -> None:
    for a, b in ((mine, theirs), (theirs, mine)):
        with pytest.raises(LuoError) as e:
            abi.negotiate("VMM channel protocol", a, b, "successor VMM pid 7", "this VMM")
        assert e.value.errno == errno.EPROTONOSUPPORT
        assert "successor VMM pid 7 speaks VMM channel protocol" in e.value.message
        for n in {*a, *b}:
            assert str(n) in e.value.message


def test_refusal_sentence() -> None:
    with pytest.raises(LuoError) as e:
        abi.negotiate("VMM channel protocol", (1, 1), (99, 99), "successor VMM pid 7", "this VMM")
    assert str(e.value) == ("EPROTONOSUPPORT: successor VMM pid 7 speaks VMM channel protocol 99; this VMM "
                            "speaks 1: none in common")
    with pytest.raises(LuoError) as e:
        abi.negotiate("P", (4, 3), (2, 1), "peer", "me")
    assert e.value.message == "peer speaks P 1 to 2; me speaks 3 to 4: none in common"


def test_announced_defaults_to_protocol_1() -> None:
    assert abi.announced({}) == (1, 1)  # every version before the field: protocol 1 only
    assert abi.announced({"protocol": 4}) == (4, 4)  # no oldest: only its newest
    assert abi.announced(abi.announce(3, 2)) == (3, 2)


@pytest.mark.parametrize("msg", [
    {"protocol": "2"}, {"protocol": True}, {"protocol": 0}, {"protocol": 2, "oldest": 3},
    {"protocol": 2, "oldest": 0}, {"protocol": 2.0}, {"protocol": None}, {"protocol": 1 << 40},
    {"protocol": 2, "oldest": False},
])
def test_announced_refuses_malformed(msg: dict) -> None:
    with pytest.raises(LuoError) as e:
        abi.announced(msg)
    assert e.value.errno == errno.EPROTO


def test_todays_vmms_still_speak_to_protocol_1_peers() -> None:
    """Peers that send no version (every VMM and host before the field) stay compatible both ways;
    dropping them is a deliberate OLDEST bump, which makes this test fail first."""
    for mine in ((abi.VMM_HOST_PROTOCOL, abi.VMM_HOST_OLDEST), (abi.VMM_CHANNEL_PROTOCOL, abi.VMM_CHANNEL_OLDEST)):
        assert abi.negotiate("P", mine, abi.announced({}), "old", "new") == abi.UNVERSIONED
    assert abi.VMM_HOST_SWITCHES_AFTER_HANDOVER > abi.UNVERSIONED  # unversioned VMMs freeze with the host
    assert abi.VMM_HOST_PROTOCOL >= abi.VMM_HOST_SWITCHES_AFTER_HANDOVER  # today's switch after the handover


# -- one contract file ----------------------------------------------------------------------------

def test_compatibles_fit_and_are_distinct() -> None:
    every = [*abi.TREE_COMPATIBLES, *abi.HANDLER_COMPATIBLES, abi.PROBE_MEMFD_COMPATIBLE]
    assert len(set(every)) == len(every)
    assert all(0 < len(c.encode()) <= 48 and re.fullmatch(r"[a-z0-9-]+-v\d+", c) for c in every), every
    assert {h.compatible for h in default_handlers()} == abi.HANDLER_COMPATIBLES


# Literals that are versions: a compatible-like "name-vN", or one of the magic numbers.
_VERSION_LITERAL = re.compile(r"""(["'])[a-z0-9-]+-v\d+\1|LUOVMSF|LUOVMST|"vm:"|"luo-meta"|0x31544F4F424F554C""",
                              re.IGNORECASE)
# The VMM's record and component versions are still defined in luo.vmm (save/restore work; the
# test below keeps them equal to luo.abi's until they import them from there).
_NOT_YET = ("vmm/state.py", "vmm/loader.py")


def test_no_module_but_luo_abi_defines_a_version() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "abi.py" or rel in _NOT_YET:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _VERSION_LITERAL.search(line.split("#", 1)[0]):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "versions belong in luo.abi:\n" + "\n".join(found)


def test_the_vmms_own_versions_agree_with_luo_abi() -> None:
    from luo.vmm import loader, saveplan, state, vcpu_state
    from luo.vmm.devices import clock, irqchip, mmio_console, uart16550

    assert state.MAGIC == abi.VMM_STATE_MAGIC
    assert state.RECORD_VERSION == abi.VMM_STATE_RECORD_VERSION
    assert tuple(state.KNOWN_VERSIONS) == abi.VMM_STATE_RECORDS_READ
    assert loader.BOOT_MAGIC == abi.GUEST_BOOT_MAGIC
    got = {
        "vcpu": (vcpu_state.VERSION, (vcpu_state.VERSION_V1, vcpu_state.VERSION)),
        "irqchip": (irqchip.VERSION, (irqchip.VERSION_V1, irqchip.VERSION)),
        "pit": (irqchip.PIT_VERSION, (irqchip.PIT_VERSION,)),
        "clock": (clock.VERSION, (clock.VERSION,)),
        "uart": (uart16550.VERSION, (uart16550.VERSION_V1, uart16550.VERSION)),
        "mmio-console": (mmio_console.VERSION, (mmio_console.VERSION_V1, mmio_console.VERSION)),
    }
    assert got == abi.VMM_STATE_COMPONENTS
    assert saveplan.CLOCK_VERSION == clock.VERSION


# -- the records that carry their format ----------------------------------------------------------

def test_guest_state_carries_its_format(tmp_path: Path) -> None:
    import os

    from luo.host.runtime import RuntimeDir
    from luo.vmm.live.guest_state import FILE, read_guest_state, write_guest_state

    rt = RuntimeDir(tmp_path)
    rt.vm_dir("g").mkdir(parents=True)
    write_guest_state(rt, "g", "running", "booted")
    path = rt.vm_dir("g") / FILE
    rec = json.loads(path.read_text())
    assert rec["format"] == abi.GUEST_STATE_FORMAT
    assert read_guest_state(rt.vm_dir("g"))["state"] == "running"
    del rec["format"]  # written before the field: format 1
    path.write_text(json.dumps(rec))
    assert read_guest_state(rt.vm_dir("g"))["vmm_pid"] == os.getpid()
    path.write_text(json.dumps({**rec, "format": abi.GUEST_STATE_FORMAT + 1}))
    assert read_guest_state(rt.vm_dir("g")) is None  # not misread: ignored
    path.write_text("[1, 2]")
    assert read_guest_state(rt.vm_dir("g")) is None


def test_update_record_of_a_newer_format_is_refused_naming_both() -> None:
    rec = {"liveupdate_number": 1, "phases_ms": {"start": 1.0}}
    assert parse_record(json.dumps(rec))  # no format: as before the field
    assert parse_record(json.dumps({**rec, "format": abi.UPDATE_RECORD_FORMAT}))
    with pytest.raises(LuoError) as e:
        parse_record(json.dumps({**rec, "format": abi.UPDATE_RECORD_FORMAT + 1}), "r.json")
    assert e.value.errno == errno.EINVAL
    assert f"format {abi.UPDATE_RECORD_FORMAT + 1} is newer" in e.value.message
    assert f"up to {abi.UPDATE_RECORD_FORMAT}" in e.value.message
    with pytest.raises(LuoError):
        parse_record(json.dumps({**rec, "format": "2"}))
