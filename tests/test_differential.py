"""The BPF programs against the reference model, on worlds and packets hypothesis draws.

A world is a subscriber table (host entries and prefixes in 100.64.0.0/16, 198.51.100.0/24
and 2001:db8::/32, random type and flags), two allow-lists and the switches. Packets are
drawn mostly from and near that table, so that the rules fire: addresses a few steps from
the pools' starts, ports mostly 25, 53, 587 or 80, every fragment state, short and full
L4 headers, any TCP flags, IP options / extension headers and any encapsulation. Each
packet goes through one hook, and the hook's verdict and the one counter that moved must
be model.decide's.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import packets
from bpfcases import flags_of, load, run_one
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from xdpzoot import model, tables
from xdpzoot.dataplane import schema
from xdpzoot.dataplane.layout import Entry
from xdpzoot.model import ICMP, ICMPV6, TCP, UDP, Packet

# Where subscribers live (the table draws its entries here) and where the rest of the
# Internet lives (peers; the allow-lists draw from both).
SUB_BASES = {4: ("100.64.0.0", "100.64.1.0", "198.51.100.0"),
             6: ("2001:db8::", "2001:db8:0:1::", "2001:db8:1::")}
PEER_BASES = {4: ("192.0.2.0", "203.0.113.0"), 6: ("3fff::", "3fff:0:0:1::")}
SPREAD = 20   # addresses drawn base .. base+SPREAD-1: collisions with the table are common
PREFIX_LENS = {4: (16, 22, 24, 28, 29, 30, 31), 6: (32, 40, 48, 64, 120, 125, 127)}
ALLOW_LENS = {4: (24, 28, 30, 32), 6: (64, 120, 126, 128)}
PORTS = (25, 53, 587, 80)
SWITCHES = ("op25b", "op25b_v6", "op25b_reject", "ip53b", "ip53b_tcp", "ip53b_v6")
TCP_FLAGS = (0x02, 0x10, 0x18, 0x04, 0x14, 0x01, 0x11, 0x12, 0x00)


def address(family: int, bases) -> st.SearchStrategy[str]:
    return st.builds(lambda b, i: str(ipaddress.ip_address(b) + i),
                     st.sampled_from(bases[family]), st.integers(0, SPREAD - 1))


def network(family: int, bases, lens) -> st.SearchStrategy:
    return st.builds(lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False),
                     address(family, bases), st.sampled_from(lens[family]))


families = st.sampled_from((4, 6))
# Built once: hypothesis spends more time building a strategy than drawing from it.
SUB_ADDR = {f: address(f, SUB_BASES) for f in (4, 6)}
PEER_ADDR = {f: address(f, PEER_BASES) for f in (4, 6)}
ANY_ADDR = {f: PEER_ADDR[f] | SUB_ADDR[f] for f in (4, 6)}
PORT = st.sampled_from(PORTS) | st.integers(0, 65535)
RULE_PORT = {"access": st.just(25) | PORT, "core": st.just(53) | PORT}
L4_LEN = st.none() | st.none() | st.integers(0, 28)
TCP_FLAGS_ANY = st.sampled_from(TCP_FLAGS) | st.integers(0, 255)


def odds(on: int, off: int) -> st.SearchStrategy[bool]:
    """True about ``on`` times in ``on + off``. hypothesis favours the first element of
    sampled_from, so the likelier answer goes first."""
    choices = (True,) * on + (False,) * off
    return st.sampled_from(choices if on >= off else choices[::-1])


def _flags(suspended: bool, op25b_exempt: bool, ip53b_exempt: bool) -> int:
    f = schema.FLAGS
    return (suspended and f["suspended"]) | (op25b_exempt and f["op25b_exempt"]) | \
        (ip53b_exempt and f["ip53b_exempt"])


# Mostly dynamic (the rules are about them), now and then suspended or exempt.
DYNAMIC, STATIC = schema.TYPES["dynamic"], schema.TYPES["static"]
entries = st.builds(Entry, st.integers(1, 1000), st.sampled_from((DYNAMIC, DYNAMIC, STATIC)),
                    st.builds(_flags, odds(1, 5), odds(1, 4), odds(1, 4)),
                    pool_bits=st.just(0))


@dataclass(frozen=True)
class Shot:
    """One packet as the model sees it, how its frame is built and where it enters."""

    packet: Packet
    vlans: int
    pppoe: bool
    hook: str


def _inside(draw, nets: list) -> str:
    """An address in one of ``nets``, near its start."""
    n = draw(st.sampled_from(nets))
    return str(n.network_address + draw(st.integers(0, min(n.num_addresses, SPREAD) - 1)))


@dataclass(frozen=True)
class World:
    """A subscriber table, allow-lists and switches, and where its packets draw from."""

    tables: tables.Tables
    flags: int
    hosts: list[str]
    nets: list
    allowed: list


@st.composite
def worlds(draw) -> World:
    """A world: subscriber table, allow-lists, switches."""
    t = tables.Tables()
    for _ in range(draw(st.integers(0, 4))):
        a = draw(families.flatmap(lambda f: address(f, SUB_BASES)))
        t.hosts[tables.addr16(a)] = draw(entries)
    for _ in range(draw(st.integers(1, 5))):
        n = draw(families.flatmap(lambda f: network(f, SUB_BASES, PREFIX_LENS)))
        t.prefixes[tables.key_of(n)] = draw(entries)
    anywhere = families.flatmap(lambda f: network(f, PEER_BASES, ALLOW_LENS)) | \
        families.flatmap(lambda f: network(f, SUB_BASES, ALLOW_LENS))
    relays = draw(st.lists(anywhere, max_size=3))
    support = draw(st.lists(anywhere, max_size=3))
    t.allow = tables.allow_table(relays, support)
    on = [s for s in SWITCHES if draw(odds(3, 1))]
    on += [s for s in ("bypass", "monitor") if draw(odds(1, 19))]
    return World(t, flags_of(tuple(on)), [str(tables.ip_of(a)) for a in t.hosts],
                 [tables.net_of(k) for k in t.prefixes], relays + support)


@st.composite
def shots(draw, w: World) -> Shot:
    """One packet in world ``w``."""
    # The subscriber's side: mostly an address the table knows, sometimes any.
    how = draw(st.sampled_from(("host", "prefix", "prefix", "prefix", "any")))
    if how == "host" and w.hosts:
        me = draw(st.sampled_from(w.hosts))
    elif how in ("host", "prefix"):
        me = _inside(draw, w.nets)
    else:
        me = draw(ANY_ADDR[draw(families)])
    family = 6 if ":" in me else 4
    # The other side: mostly a peer, often on an allow-list.
    listed = [n for n in w.allowed if n.version == family]
    if listed and draw(odds(1, 1)):
        peer = _inside(draw, listed)
    else:
        peer = draw(ANY_ADDR[family])

    role = draw(st.sampled_from(schema.ROLES))
    src, dst = (me, peer) if role == "access" else (peer, me)
    icmp_proto = ICMP if family == 4 else ICMPV6
    # OP25B is about TCP from subscribers, IP53B mostly about UDP to them.
    protos = (TCP, TCP, UDP, icmp_proto) if role == "access" else (UDP, UDP, TCP, icmp_proto)
    proto = draw(st.sampled_from(protos))
    icmp = (8, 0, 3, 11) if family == 4 else (128, 129, 1, 132, 133, 135, 136, 137, 138)
    frag = draw(st.sampled_from(("none",) * 5 + ("first", "later")))
    p = Packet(role, src, dst, proto,
               # dport: the port each pipeline looks at, more often than the others
               sport=draw(PORT), dport=draw(RULE_PORT[role]), frag=frag,
               l4_len=draw(L4_LEN), tcp_flags=draw(TCP_FLAGS_ANY),
               icmp_type=draw(st.sampled_from(icmp)), ip_extra=draw(odds(1, 3)))
    return Shot(p, draw(st.integers(0, 2)), draw(st.booleans()),
                draw(st.sampled_from(("xdp", "tc"))))


# `make test`: 300 worlds of one packet each. `make fuzz` (XZ_FUZZ=1): XZ_FUZZ_WORLDS worlds
# of XZ_FUZZ_PACKETS packets each, 100,000 packets by default.
FUZZ = os.environ.get("XZ_FUZZ") == "1"
WORLDS = int(os.environ.get("XZ_FUZZ_WORLDS", 2000)) if FUZZ else 300
PACKETS = int(os.environ.get("XZ_FUZZ_PACKETS", 50)) if FUZZ else 1


def test_bpf_agrees_with_model(dp):
    checked = []

    @settings(max_examples=WORLDS, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scenario=worlds().flatmap(lambda w: st.tuples(
        st.just(w), st.lists(shots(w), min_size=PACKETS, max_size=PACKETS))))
    def agree(scenario):
        w, packets_in = scenario
        dp.reset()
        load(dp, w.tables, w.flags)
        note(f"switches {tables.control_names(w.flags)}")
        for shot in packets_in:
            p = shot.packet
            want = model.decide(p, w.flags, w.tables)
            event(f"{want.verdict}/{want.reason}")
            dp.maps.clear_counters()
            frame = packets.frame(p, vlans=shot.vlans, pppoe=shot.pppoe)
            try:
                run_one(dp, shot.hook, p.role, frame, want.verdict, want.reason)
            except AssertionError:
                note(f"{shot}: the model says {want.verdict}/{want.reason}")
                raise
        checked.append(len(packets_in))

    agree()
    print(f"\ndifferential: {len(checked)} worlds, {sum(checked)} packets agree with the model")
    assert sum(checked) >= WORLDS * PACKETS or not FUZZ, "fewer packets than asked for"
