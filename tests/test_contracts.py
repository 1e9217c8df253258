"""RADIUS contracts in the maps: the subscriber file's `user` column, session entries written
by Instance.apply_sessions with their contract's id, type, rates and state slot, kept and
re-resolved by loads of the file, and CoA/Disconnect on the contract; the verdicts on a
session address through BPF_PROG_TEST_RUN. Real maps: the shared compiled data plane."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import packets
import pytest
from test_radius import smtp_verdict

from xdpzoot import tables
from xdpzoot.dataplane import schema
from xdpzoot.dataplane.instance import Instance
from xdpzoot.dataplane.layout import ZERO_KEY, Entry
from xdpzoot.model import TCP, UDP, Packet
from xdpzoot.sources.files import SourceError
from xdpzoot.sources.radius_server import Action
from xdpzoot.sources.sessions import Change
from xdpzoot.sources.subscribers import parse_subscribers_text

net = ipaddress.ip_network
C = schema.C
DYNAMIC, STATIC = schema.TYPES["dynamic"], schema.TYPES["static"]
SESSION, SUSPENDED = C["XZ_F_SESSION"], C["XZ_F_SUSPENDED"]
USER, STATIC_USER, EXEMPT_USER = "abc12345@zoot.example", "biz@zoot.example", "ex@zoot.example"

FILE = """\
subscriber,address,type,up_kbps,down_kbps,flags,plan,user
9000,100.64.0.0/16,dynamic,,,,,
50,100.64.0.50,dynamic,,,,,
2001,,dynamic,100000,1000000,,home-1g,abc12345@zoot.example
3001,198.51.100.8/29,static,5000,5000,,biz,biz@zoot.example
3001,,static,5000,5000,,biz,biz@zoot.example
4001,,dynamic,,,op25b_exempt;ip53b_exempt,,ex@zoot.example
"""
USERS = {USER: 2001, STATIC_USER: 3001, EXEMPT_USER: 4001}


@pytest.fixture
def inst(dp, tmp_path) -> Iterator[Instance]:
    """An instance on the shared data plane, emptied, with FILE loaded and OP25B / IP53B
    on; the contracts map emptied before and after."""
    dp.maps.contract_map.delete_many(dp.maps.contract_map.keys())
    dp.maps.set_control_flags(C["XZ_C_LOADED"] | C["XZ_C_OP25B"] | C["XZ_C_OP25B_V6"]
                              | C["XZ_C_IP53B"] | C["XZ_C_IP53B_V6"])
    i = Instance(dp.pin_dir)
    load(i, tmp_path, FILE)
    try:
        yield i
    finally:
        i.close()
        dp.maps.contract_map.delete_many(dp.maps.contract_map.keys())


def load(i: Instance, tmp_path: Path, text: str, max_shrink: float | None = None):
    path = tmp_path / "subscribers.csv"
    path.write_text(text)
    _, hosts, prefixes, contracts = tables.read_subscribers(str(path))
    return i.load_subscribers(hosts, prefixes, max_shrink=max_shrink, path=str(path),
                              contracts=contracts)


def host(i: Instance, a: str) -> Entry | None:
    return i.maps.get_host(tables.addr16(a))


def start(i: Instance, user: str, *nets: str):
    return i.apply_sessions(Change(tuple((net(n), user) for n in nets)), USERS)


def stop(i: Instance, *nets: str):
    return i.apply_sessions(Change((), tuple(map(net, nets))), USERS)


def verdict(dp, role: str, src: str, dst: str, proto: int, dport: int) -> str:
    frame = packets.frame(Packet(role, src, dst, proto, 40000, dport))
    return {1: "drop", 2: "pass"}.get(dp.run("xdp", role, frame).retval, "other")


# --- the user column ------------------------------------------------------------------------


def test_user_column_rows() -> None:
    rows = parse_subscribers_text(FILE)
    contract = next(r for r in rows if r.user == USER)
    assert contract.network is None and (contract.sub_id, contract.plan) == (2001, "home-1g")
    assert [r.user for r in rows if r.sub_id == 3001] == [STATIC_USER] * 2


@pytest.mark.parametrize("rows, problem", [
    ("7,,dynamic,,,,,", "3: empty address (only a row with a user may have none)"),
    ("7,,dynamic,,,,,x@y\n8,,dynamic,,,,,x@y", "4: user 'x@y' is subscriber 7's (line 3)"),
    ("7,,dynamic,,,,,x@y\n7,,dynamic,,,,,z@y", "4: subscriber 7 has user 'x@y' already"),
    ("7,,dynamic,,,,,x@y\n7,,static,,,,,x@y", "4: duplicate of line 3"),
    ('7,,dynamic,,,,,"x,y"', "3: bad user 'x,y' (printable, no commas"),
    ("7,,dynamic,,,,,x\x07y", "3: bad user"),
    ("7,,dynamic,,,,," + "u" * 254, "3: bad user"),
    ("7,100.64.0.0/24,dynamic,,,,,x@y", "3: a pool (a dynamic row with a prefix) has no user"),
    ("7,100.64.0.0/24,dynamic,,,,,\n7,,dynamic,,,,,x@y",
     "4: subscriber 7 is the pool of line 3: a contract needs an id of its own"),
])
def test_user_column_problems(rows: str, problem: str) -> None:
    text = "# line 1\nsubscriber,address,type,up_kbps,down_kbps,flags,plan,user\n" + rows + "\n"
    with pytest.raises(SourceError) as info:
        parse_subscribers_text(text, "s.csv")
    assert f"s.csv:{problem}" in str(info.value)


# --- session entries ------------------------------------------------------------------------


def test_session_entries_take_the_contract(dp, inst: Instance) -> None:
    c = inst.contracts()
    assert set(c) == {2001, 3001, 4001} and all(e.slot for e in c.values())
    got = start(inst, USER, "100.64.7.5/32", "2001:db8:200::/56")
    assert got == {"written": 2}
    e = host(inst, "100.64.7.5")
    assert e == Entry(2001, DYNAMIC, SESSION, 100000, 1000000, c[2001].slot)
    assert inst.maps.match_prefix(tables.addr16("2001:db8:200::9"))[1] == e
    # a user in no row: not written; the file's own row for an address: stays
    assert start(inst, "stranger@x", "100.64.7.6/32") == {"unknown": 1}
    assert start(inst, USER, "100.64.0.50/32") == {"conflict": 1}
    assert host(inst, "100.64.7.6") is None and host(inst, "100.64.0.50").sub_id == 50
    # BPF: OP25B for the dynamic contract, on IPv4 and on its delegated prefix
    assert smtp_verdict(dp, "100.64.7.5") == "drop"
    assert smtp_verdict(dp, "2001:db8:200::9") == "drop"
    # a static contract's session in a /24 with no host entry yet: the directory opened it
    # (a pool address there is dropped: the pool's entry would say so)
    assert smtp_verdict(dp, "100.64.9.1") == "drop"
    assert start(inst, STATIC_USER, "100.64.9.9/32") == {"written": 1}
    assert smtp_verdict(dp, "100.64.9.9") == "pass"
    assert host(inst, "100.64.9.9").slot == c[3001].slot   # shared with its file block
    # the contract's flags exempt it from OP25B and IP53B
    start(inst, EXEMPT_USER, "100.64.9.10/32")
    assert smtp_verdict(dp, "100.64.9.10") == "pass"
    assert verdict(dp, "core", "203.0.113.9", "100.64.9.10", UDP, 53) == "pass"
    assert verdict(dp, "core", "203.0.113.9", "100.64.7.5", UDP, 53) == "drop"


def test_stop_removes_only_session_entries(inst: Instance) -> None:
    start(inst, USER, "100.64.7.5/32", "2001:db8:200::/56")
    assert stop(inst, "100.64.7.5/32", "100.64.0.50/32", "2001:db8:200::/56",
                "100.64.7.99/32") == {"removed": 2}
    assert host(inst, "100.64.7.5") is None and host(inst, "100.64.0.50").sub_id == 50
    assert inst.maps.match_prefix(tables.addr16("2001:db8:200::9")) is None
    assert {tables.net_of(k) for k, _ in inst.maps.prefix_items()} == {
        net("100.64.0.0/16"), net("198.51.100.8/29")}


def test_reconnect_keeps_the_slot_and_its_counters(dp, inst: Instance) -> None:
    slot = inst.contracts()[2001].slot
    start(inst, USER, "100.64.7.5/32")
    frame = packets.frame(Packet("access", "100.64.7.5", "203.0.113.80", TCP, 40000, 443))
    dp.maps.set_switch(C["XZ_C_RATES"], True)
    assert dp.run("xdp", "access", frame).retval == 2
    first = inst.volumes([slot])[slot].up_packets
    stop(inst, "100.64.7.5/32")
    start(inst, USER, "100.64.7.77/32")
    assert host(inst, "100.64.7.77").slot == slot
    frame = packets.frame(Packet("access", "100.64.7.77", "203.0.113.80", TCP, 40000, 443))
    dp.run("xdp", "access", frame)
    assert first == 1 and inst.volumes([slot])[slot].up_packets == 2
    assert inst.owners()[slot] == 2001


def test_reload_keeps_and_resolves_session_entries(inst: Instance, tmp_path: Path) -> None:
    start(inst, USER, "100.64.7.5/32", "2001:db8:200::/56")
    start(inst, STATIC_USER, "100.64.9.9/32")
    start(inst, EXEMPT_USER, "100.64.9.10/32")
    slots = {s: e.slot for s, e in inst.contracts().items()}
    # the contract's rates change, 4001 leaves, a row of the file takes 100.64.9.9
    text = (FILE.replace("100000,1000000", "20000,50000")
            .replace("4001,,dynamic,,,op25b_exempt;ip53b_exempt,,ex@zoot.example\n", "")
            + "77,100.64.9.9,static,,,,,\n")
    change = load(inst, tmp_path, text, max_shrink=0.5)
    assert (change.added, change.removed) == (1, 0)
    e = host(inst, "100.64.7.5")
    assert e == Entry(2001, DYNAMIC, SESSION, 20000, 50000, slots[2001])
    assert inst.maps.match_prefix(tables.addr16("2001:db8:200::1"))[1] == e
    assert host(inst, "100.64.9.9").sub_id == 77
    assert host(inst, "100.64.9.10") is None   # its contract left: the pool's again
    assert set(inst.contracts()) == {2001, 3001}
    # the shrink guard counts the file's entries only: the sessions are not the file's
    few = "subscriber,address,type,user\n9000,100.64.0.0/16,dynamic,\n2001,,dynamic," + USER
    start(inst, USER, *(f"100.64.8.{i}/32" for i in range(10)))
    with pytest.raises(SourceError, match="sources.max_shrink"):
        load(inst, tmp_path, few + "\n", max_shrink=0.5)
    assert load(inst, tmp_path, few + "\n50,100.64.0.50,dynamic,\n77,100.64.9.9,static,\n"
                "3001,198.51.100.8/29,static,\n", max_shrink=0.5).removed == 0
    assert len(inst.session_networks()) == 12


def test_addressless_contract_keeps_its_slot(inst: Instance, tmp_path: Path) -> None:
    slot = inst.contracts()[2001].slot
    assert inst.owners()[slot] == 2001 and inst.subscriber_slot(2001, "2001") == (2001, slot)
    load(inst, tmp_path, FILE + "5,192.0.2.5,static,,,,,\n1,192.0.2.1,static,,,,,\n")
    assert inst.contracts()[2001].slot == slot


def test_coa_suspend_and_rate(dp, inst: Instance, tmp_path: Path) -> None:
    start(inst, USER, "100.64.7.5/32")
    inst.act(Action("rate", (USER,), 1000, None), USERS)
    assert host(inst, "100.64.7.5")[3:5] == (1000, 1000000)
    inst.act(Action("suspend", (USER,)), USERS)
    frame = packets.frame(Packet("access", "100.64.7.5", "203.0.113.80", TCP, 40000, 443))
    assert dp.run("xdp", "access", frame).retval == 1
    # the suspension holds for a new session, and through a reload; the rate does not
    stop(inst, "100.64.7.5/32")
    start(inst, USER, "100.64.7.6/32")
    assert host(inst, "100.64.7.6").flags == SESSION | SUSPENDED
    load(inst, tmp_path, FILE)
    assert host(inst, "100.64.7.6") == inst.contracts()[2001]._replace(
        flags=SESSION | SUSPENDED)
    assert host(inst, "100.64.7.6")[3:5] == (100000, 1000000)
    assert inst.contract_sizes() == {"contracts": 3, "suspended": 1, "session_entries": 1}
    assert "contract 2001" in inst.suspend(2001, False)
    assert host(inst, "100.64.7.6").flags == SESSION
    with pytest.raises(Exception, match="no contract"):
        inst.act(Action("suspend", ("stranger@x",)), USERS)


def test_usage_state_shows_coa_and_throttles(inst: Instance) -> None:
    """`usage`'s view of the maps: a CoA rate and suspension and a throttle set by hand on
    a contract show without any volume rule; a pool address has no slot of its own."""
    start(inst, USER, "100.64.7.5/32")
    st = inst.subscriber_state(2001)
    assert st is not None and st["slot"] == host(inst, "100.64.7.5").slot
    assert not st["suspended"] and st["throttle_up_kbps"] == 0
    inst.act(Action("rate", (USER,), 1000, 2000), USERS)
    inst.act(Action("suspend", (USER,)), USERS)
    with inst.locked():
        inst.throttle(st["slot"], 500, 0)
    st = inst.subscriber_state(2001)
    assert (st["up_kbps"], st["down_kbps"], st["suspended"]) == (1000, 2000, True)
    assert st["throttle_by_hand_kbps"] == 500 and st["throttle_up_kbps"] == 500
    assert inst.subscriber_state(999_999) is None


def test_directory_copy_follows_whole_writes(dp, inst: Instance, tmp_path: Path) -> None:
    """A load closes /24s; the instance's copy of the directory is read again after one."""
    start(inst, STATIC_USER, "100.64.9.9/32")
    stop(inst, "100.64.9.9/32")
    load(inst, tmp_path, FILE)   # closes 100.64.9.0/24 again
    assert inst.maps.contract_map.lookup(ZERO_KEY) is not None
    start(inst, STATIC_USER, "100.64.9.9/32")
    assert smtp_verdict(dp, "100.64.9.9") == "pass"
