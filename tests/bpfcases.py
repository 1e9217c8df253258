"""What the BPF case tables share (test_bpf, test_csam_bpf, test_variants, test_dirs,
test_differential, test_fastpath_bpf): the subscriber world and its switches, packet
builders, how a verdict reads at each hook, and run_one, which runs a frame through
BPF_PROG_TEST_RUN and checks the verdict, the one counter that moved and the frame out
(a well-formed TCP RST or ICMP "administratively prohibited" when rejected)."""

from __future__ import annotations

import ipaddress
import struct
from functools import reduce
from operator import or_

import packets
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPPoE
from scapy.packet import Raw

from xdpzoot import tables
from xdpzoot.dataplane import dirs, kernel, schema
from xdpzoot.dataplane.layout import Entry
from xdpzoot.model import ICMP, ICMPV6, UDP, Packet
from xdpzoot.model import TCP as P_TCP

# Return codes: XDP_DROP 1, XDP_PASS 2, XDP_TX 3; TC_ACT_OK 0, TC_ACT_SHOT 2, REDIRECT 7.
XDP_VERDICT = {1: "drop", 2: "pass", 3: "reject"}
TC_VERDICT = {0: "pass", 2: "drop", 7: "reject"}

# ---- the world: subscribers, peers, allow-lists ------------------------------------------

DYN4 = "100.64.0.5"          # in the dynamic pool 100.64.0.0/24
BLOCK4 = "100.64.0.9"        # static /29 carved out of that pool
HOST_IN_BLOCK4 = "100.64.0.12"   # dynamic host entry inside the static /29
EXEMPT4 = "100.64.0.50"      # dynamic, op25b_exempt + ip53b_exempt
SUSP4 = "100.64.0.66"        # dynamic, suspended
STATIC4 = "100.64.1.7"       # static pool 100.64.1.0/24
STRANGER4 = "198.51.100.77"  # nobody's
MAIL4, WEB4, RESOLVER4 = "192.0.2.10", "192.0.2.80", "192.0.2.53"
RELAY4, SUPPORT4 = "192.0.2.25", "203.0.113.10"

DYN6 = "2001:db8:100:1::5"
BLOCK6 = "2001:db8:100:8::9"
HOST_IN_BLOCK6 = "2001:db8:100:8::12"
EXEMPT6 = "2001:db8:100:50::1"
SUSP6 = "2001:db8:100:66::5"
STATIC6 = "2001:db8:200::7"
STRANGER6 = "2001:db8:ffff:1::77"
MAIL6, WEB6, RESOLVER6 = "2001:db8:ffff:1::10", "2001:db8:ffff:1::80", "2001:db8:ffff:1::53"
RELAY6, SUPPORT6 = "2001:db8:ffff::25", "2001:db8:fffe::10"
GATEWAY6 = "2001:db8:100:66::1"

# (network, type, flags...): /32 and /128 become host entries, the rest trie prefixes.
SUBS = (
    ("100.64.0.0/24", "dynamic"),
    ("100.64.0.8/29", "static"),
    ("100.64.0.12/32", "dynamic"),
    ("100.64.0.50/32", "dynamic", "op25b_exempt", "ip53b_exempt"),
    ("100.64.0.66/32", "dynamic", "suspended"),
    ("100.64.1.0/24", "static"),
    ("2001:db8:100::/40", "dynamic"),
    ("2001:db8:100:8::/64", "static"),
    ("2001:db8:100:8::12/128", "dynamic"),
    ("2001:db8:100:50::1/128", "dynamic", "op25b_exempt", "ip53b_exempt"),
    ("2001:db8:100:66::/64", "dynamic", "suspended"),
    ("2001:db8:200::/48", "static"),
)
RELAYS = ("192.0.2.25/32", "2001:db8:ffff::25/128")       # OP25B allow-list
SUPPORT = ("203.0.113.0/24", "2001:db8:fffe::/48")        # reachable while suspended

OP = ("op25b", "op25b_v6")
REJ = ("op25b", "op25b_v6", "op25b_reject")
DNS = ("ip53b", "ip53b_v6")
ALL = OP + DNS

HOOKS = kernel.HOOKS
# name: (VLAN tags, PPPoE session)
ENCAPS = {"plain": (0, False), "vlan1": (1, False), "qinq": (2, False), "pppoe": (0, True),
          "qinq+pppoe": (2, True)}
# The model's verdict as the hook reports it: monitor passes, reject is XDP_TX / redirect.
AT_HOOK = {"pass": "pass", "drop": "drop", "reject": "reject", "monitor": "pass"}


def flags_of(switches: tuple[str, ...]) -> int:
    """xz_control flags for switch names (op25b, ip53b_tcp, bypass, ...)."""
    return reduce(or_, (schema.C["XZ_C_" + s.upper()] for s in switches), schema.C["XZ_C_LOADED"])


def model_tables(subs=SUBS, relays=RELAYS, support=SUPPORT) -> tables.Tables:
    """The maps as plain values, for model.decide and for load()."""
    t = tables.Tables()
    for i, (net, kind, *fl) in enumerate(subs, 1):
        n = ipaddress.ip_network(net)
        e = Entry(i, schema.TYPES[kind], reduce(or_, (schema.FLAGS[f] for f in fl), 0))
        if n.prefixlen == n.max_prefixlen:
            t.hosts[tables.addr16(n.network_address)] = e
        else:
            t.prefixes[tables.key_of(n)] = e
    t.allow = tables.allow_table([ipaddress.ip_network(n) for n in relays],
                                 [ipaddress.ip_network(n) for n in support])
    return t


def load(dp, t: tables.Tables, flags: int) -> None:
    """Write ``t`` and the switches into the (already emptied) maps, with the exact IPv4
    directory a subscriber load writes (so the data plane skips what it says is absent)."""
    for a, e in t.hosts.items():
        dp.maps.set_host(a, e)
    for k, e in t.prefixes.items():
        dp.maps.set_prefix(k, e)
    dp.maps.write_dir(dirs.subscribers(t.hosts, t.prefixes)[0])
    dp.maps.sync_uniform()
    for k, bits in t.allow.items():
        dp.maps.set_allow(k, bits)
    dp.maps.set_control_flags(flags)


# ---- packets ------------------------------------------------------------------------------


def tcp(role, src, dst, dport, sport=40000, **kw) -> Packet:
    return Packet(role, src, dst, P_TCP, sport, dport, **kw)


def udp(role, src, dst, dport, sport=40000, **kw) -> Packet:
    return Packet(role, src, dst, UDP, sport, dport, **kw)


def ping(role, src, dst, **kw) -> Packet:
    if ":" in src:
        return Packet(role, src, dst, ICMPV6, icmp_type=128, **kw)
    return Packet(role, src, dst, ICMP, icmp_type=8, **kw)



A, C_ = "access", "core"
DYN_SMTP4 = tcp(A, DYN4, MAIL4, 25)
DYN_SMTP6 = tcp(A, DYN6, MAIL6, 25)


def eth(payload, **kw) -> bytes:
    eth = Ether(src=packets.MAC_A, dst=packets.MAC_B, **kw)
    return bytes(eth / payload) if payload else bytes(eth)


def exthdr_chain(n: int) -> bytes:
    """IPv6 TCP SYN to :25 from a dynamic behind ``n`` extension headers (HBH first)."""
    l3 = IPv6(src=DYN6, dst=MAIL6)
    for i in range(n):
        l3 = l3 / (IPv6ExtHdrHopByHop() if i == 0 else IPv6ExtHdrDestOpt())
    return eth(l3 / TCP(sport=40000, dport=25, flags="S") / Raw(b"x" * 4))


def three_tags(pppoe: bool) -> bytes:
    inner = Ether(packets.frame(DYN_SMTP4, vlans=2, pppoe=pppoe))
    return eth(Dot1AD(vlan=10) / Dot1Q(vlan=100) / Dot1Q(vlan=200) / inner[Dot1Q].payload)


# ---- checking a verdict ------------------------------------------------------------------


def ids(cases) -> list[str]:
    """The cases' ids, for parametrize; two rows with one id are a mistake in the table."""
    out = [c.id for c in cases]
    assert len(set(out)) == len(out), "duplicate case id"
    return out


def l2_layers(pkt) -> list:
    """The encapsulation layers of a parsed frame: (class, fields) up to the IP header."""
    out = []
    layer = pkt
    while layer and not isinstance(layer, IP | IPv6):   # NoPayload is false
        fields = dict(layer.fields)
        fields.pop("len", None)   # PPPoE length is checked separately
        if isinstance(layer, Ether):
            fields.pop("src")
            fields.pop("dst")
        out.append((type(layer), fields))
        layer = layer.payload
    return out


def check_rst(frame_in: bytes, frame_out: bytes) -> None:
    """frame_out must be the TCP RST that answers the segment in frame_in: same
    encapsulation, MACs, addresses and ports swapped, seq/ack per RFC 9293 3.10.7.1,
    valid checksums, nothing after the TCP header."""
    a, b = Ether(frame_in), Ether(frame_out)
    assert b.src == a.dst and b.dst == a.src
    assert l2_layers(b) == l2_layers(a)
    ipa = a[IP] if IP in a else a[IPv6]
    assert IP in b or IPv6 in b, "no IP header in the reply"
    ipb = b[IP] if IP in b else b[IPv6]
    assert TCP in b, "no TCP header in the reply"
    assert type(ipb) is type(ipa)
    assert (ipb.src, ipb.dst) == (ipa.dst, ipa.src)
    ta, tb = a[TCP], b[TCP]
    assert (tb.sport, tb.dport) == (ta.dport, ta.sport)
    assert tb.dataofs == 5 and tb.options == []
    assert tb.window == 0 and tb.urgptr == 0
    assert len(tb.payload) == 0
    if isinstance(ipa, IP):
        paylen = ipa.len - ipa.ihl * 4 - ta.dataofs * 4
        assert (ipb.ihl, ipb.len, ipb.proto, ipb.ttl) == (5, 40, 6, 64)
        assert ipb.flags == "DF" and ipb.frag == 0
        l3len = 40
    else:
        paylen = ipa.plen - ta.dataofs * 4
        assert (ipb.plen, ipb.nh, ipb.hlim) == (20, 6, 64)
        l3len = 60
    if ta.flags.A:
        assert tb.flags == "R" and tb.seq == ta.ack and tb.ack == 0
    else:
        seg = paylen + bool(ta.flags.S) + bool(ta.flags.F)
        assert tb.flags == "RA" and tb.seq == 0
        assert tb.ack == (ta.seq + seg) % 2**32
    if PPPoE in b:
        assert b[PPPoE].len == l3len + 2
    l2len = len(frame_out) - len(bytes(ipb))
    assert len(bytes(ipb)) == l3len
    assert l2len == len(frame_in) - len(bytes(ipa))
    # Checksums: scapy recomputes them when the fields are deleted.
    redo = b.copy()
    if IP in redo:
        del redo[IP].chksum
    del redo[TCP].chksum
    redo = Ether(bytes(redo))
    if IP in b:
        assert b[IP].chksum == redo[IP].chksum
    assert tb.chksum == redo[TCP].chksum


def _ones(data: bytes) -> int:
    """The Internet checksum's ones'-complement sum, folded."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def check_icmp(frame_in: bytes, frame_out: bytes) -> None:
    """frame_out must be the ICMP (3/13) or ICMPv6 (1/1) "administratively prohibited" for
    the packet in frame_in: same encapsulation, MACs and addresses swapped, the offending IP
    header and 8 bytes after it quoted, valid checksums, PPPoE length fixed."""
    a, b = Ether(frame_in), Ether(frame_out)
    assert b.src == a.dst and b.dst == a.src
    assert l2_layers(b) == l2_layers(a)
    v4 = IP in a
    ipa = bytes(a[IP] if v4 else a[IPv6])
    l2len = len(frame_in) - len(ipa)
    out = frame_out[l2len:]
    if v4:
        assert len(out) == 20 + 8 + 28
        vihl, _, tot, _, frag, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", out[:20])
        assert (vihl, tot, frag, ttl, proto) == (0x45, 56, 0x4000, 64, 1)
        assert (src, dst) == (ipa[16:20], ipa[12:16])
        assert _ones(out[:20]) == 0xFFFF, "IPv4 header checksum"
        icmp = out[20:]
        assert (icmp[0], icmp[1], icmp[4:8]) == (3, 13, bytes(4))
        assert icmp[8:] == ipa[:28]
        assert _ones(icmp) == 0xFFFF, "ICMP checksum"
    else:
        assert len(out) == 40 + 8 + 48
        first, plen, nh, hlim = struct.unpack("!IHBB", out[:8])
        src, dst = out[8:24], out[24:40]
        assert (first, plen, nh, hlim) == (0x60000000, 56, 58, 64)
        assert (src, dst) == (ipa[24:40], ipa[8:24])
        icmp = out[40:]
        assert (icmp[0], icmp[1], icmp[4:8]) == (1, 1, bytes(4))
        assert icmp[8:] == ipa[:48]
        pseudo = src + dst + struct.pack("!IxxxB", len(icmp), 58)
        assert _ones(pseudo + icmp) == 0xFFFF, "ICMPv6 checksum"
    if PPPoE in a:
        assert b[PPPoE].len == len(out) + 2 and b[PPPoE].sessionid == a[PPPoE].sessionid
    for tag in (Dot1AD, Dot1Q):
        if tag in a:
            assert b[tag].vlan == a[tag].vlan


def run_one(dp, hook: str, role: str, frame: bytes, verdict: str, reason: str) -> bytes:
    """Run ``frame``; assert the hook's verdict and that exactly this one packet was
    counted, bytes included, under (role, verdict, reason); a rejected TCP segment must
    come back as its RST, anything else rejected as an ICMP "administratively prohibited",
    a frame not rejected untouched. Returns the frame out."""
    got, out = dp.verdict(hook, role, frame)
    assert got == AT_HOOK[verdict]
    want = {schema.counter_index(role, verdict, reason): (1, len(frame))}
    assert dp.maps.counters_sum() == want, dp.counters()
    if verdict == "reject":
        (check_rst if TCP in Ether(frame) else check_icmp)(frame, out)
    else:
        assert out == frame, "the frame was rewritten although not rejected"
    return out
