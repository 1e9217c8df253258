"""The data plane as tables: packet in, verdict and counters out, through BPF_PROG_TEST_RUN.

Every row of CASES says what is sent (a model.Packet), what the maps hold, which switches
are on, and the verdict and reason expected, literally: the table is the spec. Each row runs
on both hooks (XDP, TC) and in five encapsulations, and must count exactly one packet under
(role, verdict, reason). The reference model is checked against the same rows separately
(test_model_agrees), so a disagreement says which side is wrong.

Frames that no model.Packet describes (ARP, LCP, truncated, garbage, ...) have tables of
their own below.
"""

from __future__ import annotations

import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import packets
import pytest
from bpfcases import (
    ALL,
    BLOCK4,
    BLOCK6,
    C_,
    DNS,
    DYN4,
    DYN6,
    DYN_SMTP4,
    DYN_SMTP6,
    ENCAPS,
    EXEMPT4,
    EXEMPT6,
    GATEWAY6,
    HOOKS,
    HOST_IN_BLOCK4,
    HOST_IN_BLOCK6,
    MAIL4,
    MAIL6,
    OP,
    REJ,
    RELAY4,
    RELAY6,
    RESOLVER4,
    RESOLVER6,
    STATIC4,
    STATIC6,
    STRANGER4,
    STRANGER6,
    SUBS,
    SUPPORT4,
    SUPPORT6,
    SUSP4,
    SUSP6,
    WEB4,
    WEB6,
    A,
    eth,
    exthdr_chain,
    flags_of,
    ids,
    load,
    model_tables,
    ping,
    run_one,
    tcp,
    three_tags,
    udp,
)
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import (
    IPv6,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE, PPPoED
from scapy.packet import Raw

from xdpzoot import model
from xdpzoot.dataplane import kernel, schema
from xdpzoot.dataplane.layout import Entry
from xdpzoot.model import ICMPV6, TCP_RST, Packet

TCP_FIN, TCP_PSH, TCP_ACK = 0x01, 0x08, 0x10

@dataclass(frozen=True)
class Case:
    id: str
    desc: str
    packet: Packet
    switches: tuple[str, ...]
    verdict: str          # as counted: pass, drop, reject, monitor
    reason: str
    subs: tuple = SUBS
    model_bug: str | None = None   # known disagreement of model.decide with this row


CASES = [
    # -- OP25B, IPv4 --
    Case("op25b-v4-dynamic-25", "dynamic subscriber to a foreign MX on :25",
         tcp(A, DYN4, MAIL4, 25), OP, "drop", "op25b"),
    Case("op25b-v4-dynamic-587", "submission port is not blocked",
         tcp(A, DYN4, MAIL4, 587), OP, "pass", "ok"),
    Case("op25b-v4-dynamic-reply-from-25", "source port 25 is not the rule",
         tcp(A, DYN4, MAIL4, 40000, sport=25), OP, "pass", "ok"),
    Case("op25b-v4-static-25", "static subscribers run their own mail servers",
         tcp(A, STATIC4, MAIL4, 25), OP, "pass", "ok"),
    Case("op25b-v4-exempt-25", "dynamic with op25b_exempt",
         tcp(A, EXEMPT4, MAIL4, 25), OP, "pass", "exempt"),
    Case("op25b-v4-relay-25", "the ISP's relay is on the OP25B allow-list",
         tcp(A, DYN4, RELAY4, 25), OP, "pass", "allowlist"),
    Case("op25b-v4-disabled", "OP25B switched off", tcp(A, DYN4, MAIL4, 25), DNS, "pass", "ok"),
    Case("op25b-v4-unknown-src", "source is no subscriber",
         tcp(A, STRANGER4, MAIL4, 25), OP, "pass", "unknown"),
    Case("op25b-v4-static-block-in-pool", "a static /29 inside the dynamic /24: most specific wins",
         tcp(A, BLOCK4, MAIL4, 25), OP, "pass", "ok"),
    Case("op25b-v4-host-in-static-block", "a dynamic host entry inside the static /29 wins",
         tcp(A, HOST_IN_BLOCK4, MAIL4, 25), OP, "drop", "op25b"),
    Case("op25b-v4-udp-25", "OP25B is TCP only", udp(A, DYN4, MAIL4, 25), OP, "pass", "ok"),
    Case("op25b-v4-core-role", "inbound SMTP to a dynamic subscriber is not OP25B",
         tcp(C_, MAIL4, DYN4, 25), OP, "pass", "ok"),
    Case("op25b-v4-unparsed-l4", "unfragmented TCP with 8 header bytes: ports unknown",
         tcp(A, DYN4, MAIL4, 25, l4_len=8), OP, "pass", "unparsed"),
    # -- OP25B, IPv6 --
    Case("op25b-v6-dynamic-25", "dynamic IPv6 subscriber to :25",
         tcp(A, DYN6, MAIL6, 25), OP, "drop", "op25b"),
    Case("op25b-v6-dynamic-587", "submission port", tcp(A, DYN6, MAIL6, 587), OP, "pass", "ok"),
    Case("op25b-v6-static-25", "static IPv6 block", tcp(A, STATIC6, MAIL6, 25), OP, "pass", "ok"),
    Case("op25b-v6-exempt-25", "IPv6 host entry with op25b_exempt",
         tcp(A, EXEMPT6, MAIL6, 25), OP, "pass", "exempt"),
    Case("op25b-v6-relay-25", "IPv6 relay on the allow-list",
         tcp(A, DYN6, RELAY6, 25), OP, "pass", "allowlist"),
    Case("op25b-v6-switch-off", "OP25B on for IPv4 only",
         tcp(A, DYN6, MAIL6, 25), ("op25b",), "pass", "ok"),
    Case("op25b-v6-without-op25b", "the IPv6 switch alone does nothing",
         tcp(A, DYN6, MAIL6, 25), ("op25b_v6",), "pass", "ok"),
    Case("op25b-v6-unknown-src", "IPv6 source is no subscriber",
         tcp(A, STRANGER6, MAIL6, 25), OP, "pass", "unknown"),
    Case("op25b-v6-static-in-pool", "a static /64 inside the dynamic /40",
         tcp(A, BLOCK6, MAIL6, 25), OP, "pass", "ok"),
    Case("op25b-v6-host-in-static", "a dynamic /128 inside the static /64",
         tcp(A, HOST_IN_BLOCK6, MAIL6, 25), OP, "drop", "op25b"),
    # -- OP25B reject mode --
    Case("reject-v4-syn", "SYN to :25 answered with RST|ACK",
         tcp(A, DYN4, MAIL4, 25), REJ, "reject", "op25b"),
    Case("reject-v6-syn", "IPv6 SYN to :25 answered with RST|ACK",
         tcp(A, DYN6, MAIL6, 25), REJ, "reject", "op25b"),
    Case("reject-v4-ack", "ACK segment answered with RST, seq = its ack",
         tcp(A, DYN4, MAIL4, 25, tcp_flags=TCP_ACK), REJ, "reject", "op25b"),
    Case("reject-v6-psh-ack", "PSH|ACK segment answered with RST",
         tcp(A, DYN6, MAIL6, 25, tcp_flags=TCP_PSH | TCP_ACK), REJ, "reject", "op25b"),
    Case("reject-v4-rst", "a RST is never answered: dropped",
         tcp(A, DYN4, MAIL4, 25, tcp_flags=TCP_RST), REJ, "drop", "op25b"),
    Case("reject-v6-rst-ack", "a RST|ACK is never answered: dropped",
         tcp(A, DYN6, MAIL6, 25, tcp_flags=TCP_RST | TCP_ACK), REJ, "drop", "op25b"),
    Case("reject-v4-ip-options", "IPv4 options: no rewrite, dropped",
         tcp(A, DYN4, MAIL4, 25, ip_extra=True), REJ, "drop", "op25b"),
    Case("reject-v6-exthdr", "IPv6 extension headers: no rewrite, dropped",
         tcp(A, DYN6, MAIL6, 25, ip_extra=True), REJ, "drop", "op25b"),
    Case("reject-v4-first-fragment", "IPv4 first fragment: no options, answered",
         tcp(A, DYN4, MAIL4, 25, frag="first"), REJ, "reject", "op25b"),
    Case("reject-v6-first-fragment",
         "IPv6 first fragment: the fragment header is an extension header, dropped",
         tcp(A, DYN6, MAIL6, 25, frag="first"), REJ, "drop", "op25b"),
    Case("reject-v4-frag-short", "short first fragment: dropped, not answered",
         tcp(A, DYN4, MAIL4, 25, frag="first", l4_len=8), REJ, "drop", "frag_short"),
    Case("reject-v4-exempt", "exempt in reject mode", tcp(A, EXEMPT4, MAIL4, 25), REJ,
         "pass", "exempt"),
    Case("reject-v6-relay", "relay in reject mode", tcp(A, DYN6, RELAY6, 25), REJ,
         "pass", "allowlist"),
    # -- IP53B (core) --
    Case("ip53b-v4-dynamic-53", "query from the Internet to a dynamic subscriber's :53",
         udp(C_, RESOLVER4, DYN4, 53), DNS, "drop", "ip53b"),
    Case("ip53b-v4-dns-reply", "answer from :53 to the subscriber's resolver port",
         udp(C_, RESOLVER4, DYN4, 40000, sport=53), DNS, "pass", "ok"),
    Case("ip53b-v4-static-53", "static subscribers may run DNS servers",
         udp(C_, RESOLVER4, STATIC4, 53), DNS, "pass", "ok"),
    Case("ip53b-v4-exempt-53", "dynamic with ip53b_exempt",
         udp(C_, RESOLVER4, EXEMPT4, 53), DNS, "pass", "exempt"),
    Case("ip53b-v4-tcp-switch-off", "TCP/53 passes without ip53b_tcp",
         tcp(C_, RESOLVER4, DYN4, 53), DNS, "pass", "ok"),
    Case("ip53b-v4-tcp-switch-on", "TCP/53 dropped with ip53b_tcp",
         tcp(C_, RESOLVER4, DYN4, 53), DNS + ("ip53b_tcp",), "drop", "ip53b"),
    Case("ip53b-v4-disabled", "IP53B switched off", udp(C_, RESOLVER4, DYN4, 53), OP,
         "pass", "ok"),
    Case("ip53b-v4-unknown-dst", "destination is no subscriber",
         udp(C_, RESOLVER4, STRANGER4, 53), DNS, "pass", "unknown"),
    Case("ip53b-v4-access-role", "subscribers' own queries go out",
         udp(A, DYN4, RESOLVER4, 53), DNS, "pass", "ok"),
    Case("ip53b-v4-relay-no-exemption", "the OP25B allow-list does not exempt from IP53B",
         udp(C_, RELAY4, DYN4, 53), DNS, "drop", "ip53b"),
    Case("ip53b-v4-host-in-static-block", "dynamic host entry inside the static /29",
         udp(C_, RESOLVER4, HOST_IN_BLOCK4, 53), DNS, "drop", "ip53b"),
    Case("ip53b-v6-dynamic-53", "IPv6 query to a dynamic subscriber",
         udp(C_, RESOLVER6, DYN6, 53), DNS, "drop", "ip53b"),
    Case("ip53b-v6-dns-reply", "IPv6 answer from :53",
         udp(C_, RESOLVER6, DYN6, 40000, sport=53), DNS, "pass", "ok"),
    Case("ip53b-v6-static-53", "static IPv6 block", udp(C_, RESOLVER6, STATIC6, 53), DNS,
         "pass", "ok"),
    Case("ip53b-v6-exempt-53", "IPv6 host with ip53b_exempt",
         udp(C_, RESOLVER6, EXEMPT6, 53), DNS, "pass", "exempt"),
    Case("ip53b-v6-tcp-switch-off", "IPv6 TCP/53 without ip53b_tcp",
         tcp(C_, RESOLVER6, DYN6, 53), DNS, "pass", "ok"),
    Case("ip53b-v6-tcp-switch-on", "IPv6 TCP/53 with ip53b_tcp",
         tcp(C_, RESOLVER6, DYN6, 53), DNS + ("ip53b_tcp",), "drop", "ip53b"),
    Case("ip53b-v6-switch-off", "IP53B on for IPv4 only",
         udp(C_, RESOLVER6, DYN6, 53), ("ip53b",), "pass", "ok"),
    # -- suspended --
    Case("susp-v4-access-tcp", "a suspended subscriber's web traffic",
         tcp(A, SUSP4, WEB4, 80), ALL, "drop", "suspended"),
    Case("susp-v4-access-icmp", "a suspended subscriber's ping",
         ping(A, SUSP4, WEB4), ALL, "drop", "suspended"),
    Case("susp-v4-access-support", "the support site stays reachable",
         tcp(A, SUSP4, SUPPORT4, 443), ALL, "pass", "allowlist"),
    Case("susp-v4-access-relay", "the OP25B relay is not the support allow-list",
         tcp(A, SUSP4, RELAY4, 25), ALL, "drop", "suspended"),
    Case("susp-v4-core-tcp", "traffic to a suspended subscriber",
         tcp(C_, WEB4, SUSP4, 40000, sport=80), ALL, "drop", "suspended"),
    Case("susp-v4-core-icmp", "ping to a suspended subscriber",
         ping(C_, WEB4, SUSP4), ALL, "drop", "suspended"),
    Case("susp-v4-core-from-support", "the support site's answers come in",
         tcp(C_, SUPPORT4, SUSP4, 40000, sport=443), ALL, "pass", "allowlist"),
    Case("susp-v4-switches-off", "suspension needs no switch",
         tcp(A, SUSP4, WEB4, 80), (), "drop", "suspended"),
    Case("susp-v4-later-fragment", "even later fragments",
         tcp(A, SUSP4, WEB4, 80, frag="later"), ALL, "drop", "suspended"),
    Case("susp-v6-access-tcp", "suspended IPv6 /64", tcp(A, SUSP6, WEB6, 80), ALL,
         "drop", "suspended"),
    Case("susp-v6-access-icmp", "suspended IPv6 echo request", ping(A, SUSP6, WEB6), ALL,
         "drop", "suspended"),
    Case("susp-v6-access-support", "IPv6 support site",
         tcp(A, SUSP6, SUPPORT6, 443), ALL, "pass", "allowlist"),
    Case("susp-v6-core-tcp", "IPv6 traffic to a suspended subscriber",
         tcp(C_, WEB6, SUSP6, 40000, sport=80), ALL, "drop", "suspended"),
    Case("susp-v6-core-icmp", "IPv6 ping to a suspended subscriber", ping(C_, WEB6, SUSP6),
         ALL, "drop", "suspended"),
    Case("susp-v6-core-from-support", "IPv6 support site's answers",
         tcp(C_, SUPPORT6, SUSP6, 40000, sport=443), ALL, "pass", "allowlist"),
    Case("susp-v6-neighbour-solicitation", "ND keeps working for a suspended subscriber",
         Packet(A, SUSP6, GATEWAY6, ICMPV6, icmp_type=135), ALL, "pass", "ok"),
    Case("susp-v6-router-solicitation", "ND starts at type 133",
         Packet(A, SUSP6, GATEWAY6, ICMPV6, icmp_type=133), ALL, "pass", "ok"),
    Case("susp-v6-redirect", "and ends at type 137", Packet(C_, GATEWAY6, SUSP6, ICMPV6,
                                                             icmp_type=137), ALL, "pass", "ok"),
    Case("susp-v6-mld-report", "type 132 (MLD done) is not ND",
         Packet(A, SUSP6, GATEWAY6, ICMPV6, icmp_type=132), ALL, "drop", "suspended"),
    Case("susp-v6-type-138", "type 138 is not ND", Packet(A, SUSP6, GATEWAY6, ICMPV6,
                                                          icmp_type=138), ALL, "drop", "suspended"),
    Case("susp-v6-nd-short", "an NS cut to 4 bytes: type unknown to the rule, dropped",
         Packet(A, SUSP6, GATEWAY6, ICMPV6, icmp_type=135, l4_len=4), ALL, "drop", "suspended"),
    Case("susp-v6-neighbour-solicitation-core", "the router's NS to a suspended subscriber",
         Packet(C_, GATEWAY6, SUSP6, ICMPV6, icmp_type=135), ALL, "pass", "ok"),
    # -- fragments --
    Case("frag-v4-first-25", "IPv4 first fragment, full TCP header: judged by its ports",
         tcp(A, DYN4, MAIL4, 25, frag="first"), OP, "drop", "op25b"),
    Case("frag-v4-first-80", "IPv4 first fragment to :80",
         tcp(A, DYN4, WEB4, 80, frag="first"), OP, "pass", "ok"),
    Case("frag-v6-first-25", "IPv6 first fragment, full TCP header",
         tcp(A, DYN6, MAIL6, 25, frag="first"), OP, "drop", "op25b"),
    Case("frag-v6-first-80", "IPv6 first fragment to :80",
         tcp(A, DYN6, WEB6, 80, frag="first"), OP, "pass", "ok"),
    Case("frag-v4-later", "IPv4 later fragment: no ports, passes",
         tcp(A, DYN4, MAIL4, 25, frag="later"), OP, "pass", "fragment"),
    Case("frag-v6-later", "IPv6 later fragment", tcp(A, DYN6, MAIL6, 25, frag="later"), OP,
         "pass", "fragment"),
    Case("frag-v4-later-core", "IPv4 later fragment of a UDP datagram to a dynamic",
         udp(C_, RESOLVER4, DYN4, 53, frag="later"), DNS, "pass", "fragment"),
    Case("frag-v4-later-unknown", "later fragment from no subscriber",
         tcp(A, STRANGER4, MAIL4, 25, frag="later"), OP, "pass", "unknown"),
    Case("frag-v4-short-dynamic", "IPv4 first fragment with 8 TCP bytes from a dynamic",
         tcp(A, DYN4, MAIL4, 80, frag="first", l4_len=8), OP, "drop", "frag_short"),
    Case("frag-v6-short-dynamic", "IPv6 first fragment with 8 TCP bytes from a dynamic",
         tcp(A, DYN6, MAIL6, 80, frag="first", l4_len=8), OP, "drop", "frag_short"),
    Case("frag-v4-short-static", "short first fragment from a static",
         tcp(A, STATIC4, MAIL4, 25, frag="first", l4_len=8), OP, "pass", "ok"),
    Case("frag-v6-short-static", "short IPv6 first fragment from a static",
         tcp(A, STATIC6, MAIL6, 25, frag="first", l4_len=8), OP, "pass", "ok"),
    Case("frag-v4-short-exempt", "short first fragment from an exempt dynamic",
         tcp(A, EXEMPT4, MAIL4, 25, frag="first", l4_len=8), OP, "pass", "exempt"),
    Case("frag-v4-short-udp-core", "UDP first fragment with 4 header bytes to a dynamic",
         udp(C_, RESOLVER4, DYN4, 53, frag="first", l4_len=4), DNS, "drop", "frag_short"),
    Case("frag-v6-short-udp-core", "IPv6 UDP first fragment with 4 header bytes",
         udp(C_, RESOLVER6, DYN6, 53, frag="first", l4_len=4), DNS, "drop", "frag_short"),
    Case("frag-v4-short-udp-access", "OP25B does not judge UDP fragments",
         udp(A, DYN4, MAIL4, 25, frag="first", l4_len=4), OP, "pass", "ok"),
    Case("frag-v4-options-25", "IPv4 options and :25: still dropped",
         tcp(A, DYN4, MAIL4, 25, ip_extra=True), OP, "drop", "op25b"),
    Case("frag-v6-exthdr-first-25", "IPv6 HBH + DestOpt + first fragment to :25",
         tcp(A, DYN6, MAIL6, 25, frag="first", ip_extra=True), OP, "drop", "op25b"),
    # -- bypass and monitor --
    Case("bypass-op25b", "bypass: a would-be drop passes",
         tcp(A, DYN4, MAIL4, 25), OP + ("bypass",), "pass", "bypass"),
    Case("bypass-suspended", "bypass beats suspension",
         tcp(C_, WEB6, SUSP6, 40000, sport=80), ALL + ("bypass",), "pass", "bypass"),
    Case("bypass-and-monitor", "bypass beats monitor",
         tcp(A, DYN6, MAIL6, 25), OP + ("bypass", "monitor"), "pass", "bypass"),
    Case("monitor-op25b", "monitor: decided and counted, but passed",
         tcp(A, DYN4, MAIL4, 25), OP + ("monitor",), "monitor", "op25b"),
    Case("monitor-reject", "monitor in reject mode: no RST, passed",
         tcp(A, DYN6, MAIL6, 25), REJ + ("monitor",), "monitor", "op25b"),
    Case("monitor-ip53b", "monitor with IP53B", udp(C_, RESOLVER6, DYN6, 53),
         DNS + ("monitor",), "monitor", "ip53b"),
    Case("monitor-suspended", "monitor with suspension", ping(A, SUSP4, WEB4),
         ALL + ("monitor",), "monitor", "suspended"),
    Case("monitor-pass", "monitor changes nothing for passing packets",
         tcp(A, DYN4, MAIL4, 587), OP + ("monitor",), "pass", "ok"),
]



# ---- the table through the kernel ---------------------------------------------------------


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("encap", list(ENCAPS))
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_case(dp, case: Case, encap: str, hook: str):
    load(dp, model_tables(case.subs), flags_of(case.switches))
    vlans, pppoe = ENCAPS[encap]
    frame = packets.frame(case.packet, vlans=vlans, pppoe=pppoe)
    run_one(dp, hook, case.packet.role, frame, case.verdict, case.reason)


def _model_params():
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.model_bug)] if c.model_bug else []
        yield pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("case", list(_model_params()))
def test_model_agrees(case: Case):
    """The reference model answers the table's rows as the table says."""
    d = model.decide(case.packet, flags_of(case.switches), model_tables(case.subs))
    assert (d.verdict, d.reason) == (case.verdict, case.reason)


# ---- RST numbers, literally ---------------------------------------------------------------


def _retcp(frame: bytes, **fields) -> bytes:
    """``frame`` with TCP fields changed and every length and checksum recomputed."""
    p = Ether(frame)
    for k, v in fields.items():
        setattr(p[TCP], k, v)
    del p[TCP].chksum, p[TCP].dataofs
    if IP in p:
        del p[IP].len, p[IP].chksum
    else:
        del p[IPv6].plen
    if PPPoE in p:
        del p[PPPoE].len
    return bytes(p)


# (id, TCP flags, ack, options, RST flags, RST seq, RST ack); the segment has seq 1000
# and 4 bytes of payload.
RST_ROWS = [
    ("syn", "S", 0, [], "RA", 0, 1005),
    ("syn-with-mss", "S", 0, [("MSS", 1460)], "RA", 0, 1005),
    ("fin", "F", 0, [], "RA", 0, 1005),
    ("push-no-ack", "P", 0, [], "RA", 0, 1004),
    ("ack", "A", 0x12345678, [], "R", 0x12345678, 0),
    ("psh-ack", "PA", 0xFFFFFFF0, [], "R", 0xFFFFFFF0, 0),
    ("syn-ack", "SA", 77, [], "R", 77, 0),
]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("encap", ["plain", "qinq+pppoe"])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("row", RST_ROWS, ids=[r[0] for r in RST_ROWS])
def test_rst(dp, row, family, encap, hook):
    _, flags, ack, options, rflags, rseq, rack = row
    src, dst = (DYN4, MAIL4) if family == 4 else (DYN6, MAIL6)
    load(dp, model_tables(), flags_of(REJ))
    vlans, pppoe = ENCAPS[encap]
    frame = _retcp(packets.frame(tcp(A, src, dst, 25), vlans=vlans, pppoe=pppoe),
                   flags=flags, ack=ack, options=options)
    out = run_one(dp, hook, A, frame, "reject", "op25b")
    rst = Ether(out)[TCP]
    assert (str(rst.flags), rst.seq, rst.ack) == (rflags, rseq, rack)
    assert (rst.sport, rst.dport) == (25, 40000)
    assert len(out) == 14 + 4 * vlans + 8 * pppoe + (20 if family == 4 else 40) + 20
    if pppoe:
        assert Ether(out)[PPPoE].sessionid == 0x1234
    if vlans:
        assert (Ether(out)[Dot1AD].vlan, Ether(out)[Dot1Q].vlan) == (100, 200)


# ---- frames no model.Packet describes -----------------------------------------------------


def _patch(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + bytes([value]) + frame[offset + 1:]


@dataclass(frozen=True)
class RawCase:
    id: str
    desc: str
    build: object          # () -> bytes
    role: str
    switches: tuple[str, ...]
    verdict: str
    reason: str
    bug: str | None = None   # known data-plane bug: xfail(strict)
    hooks: tuple[str, ...] = HOOKS


RAW_CASES = [
    RawCase("arp", "ARP is not ours", lambda: eth(ARP(psrc=DYN4, pdst="100.64.0.1")),
            A, ALL, "pass", "unparsed"),
    RawCase("arp-bypass", "bypass is decided before parsing",
            lambda: eth(ARP(psrc=DYN4, pdst="100.64.0.1")), A, ALL + ("bypass",),
            "pass", "bypass"),
    RawCase("unknown-ethertype", "ethertype 0x88b5",
            lambda: eth(Raw(b"\x00" * 46), type=0x88B5), A, ALL, "pass", "unparsed"),
    RawCase("ethernet-only", "14 bytes saying IPv4 (tc: the kernel refuses the run)",
            lambda: eth(b"", type=0x0800), A, ALL, "pass", "unparsed", hooks=("xdp",)),
    RawCase("vlan-tag-only", "18 bytes: a VLAN tag saying IPv4, nothing after",
            lambda: eth(Dot1Q(vlan=200, type=0x0800)), A, ALL, "pass", "unparsed"),
    RawCase("pppoe-discovery", "PADI (0x8863)", lambda: eth(PPPoED(code=0x09)),
            A, ALL, "pass", "unparsed"),
    RawCase("pppoe-lcp", "PPPoE session carrying LCP echo",
            lambda: eth(PPPoE(sessionid=0x1234) / PPP(proto=0xC021) /
                         Raw(b"\x09\x01\x00\x08\x00\x00\x00\x00")),
            A, ALL, "pass", "unparsed"),
    RawCase("pppoe-bad-version", "PPPoE session header with version 2",
            lambda: _patch(packets.frame(DYN_SMTP4, pppoe=True), 14, 0x21),
            A, ALL, "pass", "unparsed"),
    RawCase("ipv4-ihl-4", "IPv4 with ihl 4, else a dropped OP25B SYN",
            lambda: _patch(packets.frame(DYN_SMTP4), 14, 0x44), A, ALL, "pass", "unparsed"),
    RawCase("ipv4-version-6", "version 6 in an IPv4 ethertype",
            lambda: _patch(packets.frame(DYN_SMTP4), 14, 0x65), A, ALL, "pass", "unparsed"),
    RawCase("ipv4-total-length-short", "IPv4 total length 10 < header length",
            lambda: _patch(_patch(packets.frame(DYN_SMTP4), 16, 0), 17, 10), A, ALL,
            "pass", "unparsed"),
    RawCase("ipv6-version-4", "version 4 in an IPv6 ethertype",
            lambda: _patch(packets.frame(DYN_SMTP6), 14, 0x40), A, ALL, "pass", "unparsed"),
    RawCase("ipv6-6-exthdrs", "XZ_MAX_EXTHDR extension headers: still parsed",
            lambda: exthdr_chain(6), A, ALL, "drop", "op25b"),
    RawCase("ipv6-7-exthdrs", "one extension header more than XZ_MAX_EXTHDR: fail open",
            lambda: exthdr_chain(7), A, ALL, "pass", "unparsed"),
    RawCase("three-vlan-tags", "one tag more than XZ_MAX_VLAN: fail open",
            lambda: three_tags(False), A, ALL, "pass", "unparsed"),
    RawCase("three-vlan-tags-pppoe", "three tags, then PPPoE", lambda: three_tags(True),
            A, ALL, "pass", "unparsed"),
    RawCase("three-vlan-tags-core", "three tags on the core side",
            lambda: three_tags(False), C_, ALL, "pass", "unparsed"),
]


def _raw_params():
    for c in RAW_CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else []
        for hook in c.hooks:
            yield pytest.param(c, hook, id=f"{c.id}-{hook}", marks=marks)


@pytest.mark.parametrize(("case", "hook"), list(_raw_params()))
def test_raw_frame(dp, case: RawCase, hook: str):
    load(dp, model_tables(), flags_of(case.switches))
    run_one(dp, hook, case.role, case.build(), case.verdict, case.reason)


# ---- truncated frames ---------------------------------------------------------------------


def refused(hook: str, frame: bytes) -> bool:
    """True when BPF_PROG_TEST_RUN refuses ``frame`` (EINVAL) before the program runs:
    shorter than an Ethernet header; for tc also an IPv4 (IPv6) ethertype without a full
    IPv4 (IPv6) header behind it, as the kernel's test_run insists on one."""
    if len(frame) < 14:
        return True
    need = {b"\x08\x00": 14 + 20, b"\x86\xdd": 14 + 40}.get(frame[12:14], 14)
    return hook == "tc" and len(frame) < need


def _l4_end(frame: bytes) -> int:
    """Offset of the end of the TCP header in ``frame``."""
    p = Ether(frame)
    return len(frame) - len(bytes(p[TCP])) + 20


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("mode", ["drop", "reject"])
@pytest.mark.parametrize("encap", ["plain", "qinq+pppoe"])
@pytest.mark.parametrize("family", [4, 6])
def test_truncated(dp, family, encap, mode, hook):
    """An OP25B SYN cut at every length: where the kernel refuses the run (see
    refused()) nothing is counted; up to the end of the TCP header it passes as
    unparsed; from there on the ports are known and the rule applies (the IP header's
    length is believed for the RST)."""
    load(dp, model_tables(), flags_of(REJ if mode == "reject" else OP))
    vlans, pppoe = ENCAPS[encap]
    full = packets.frame(DYN_SMTP4 if family == 4 else DYN_SMTP6, vlans=vlans, pppoe=pppoe)
    l4_end = _l4_end(full)
    for n in range(len(full) + 1):
        dp.maps.clear_counters()
        cut = full[:n]
        if refused(hook, cut):
            with pytest.raises(kernel.KernelError):
                dp.verdict(hook, A, cut)
            assert dp.counters() == {}
            continue
        if n < l4_end:
            run_one(dp, hook, A, cut, "pass", "unparsed")
        else:
            run_one(dp, hook, A, cut, mode, "op25b")


# ---- garbage ------------------------------------------------------------------------------


def _garbage(rng: random.Random) -> bytes:
    """Random bytes, half of them behind a plausible Ethernet/VLAN/PPPoE/IP start so that
    the parser gets further than the ethertype."""
    if rng.random() < 0.5:
        return rng.randbytes(rng.randint(14, 160))
    p = rng.choice([DYN_SMTP4, DYN_SMTP6, udp(C_, RESOLVER4, DYN4, 53),
                    udp(C_, RESOLVER6, DYN6, 53)])
    f = packets.frame(p, vlans=rng.randint(0, 2), pppoe=rng.random() < 0.5)
    keep = rng.randint(14, len(f))
    data = bytearray(f[:keep] + rng.randbytes(rng.randint(0, 80)))
    for _ in range(rng.randint(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


@pytest.mark.parametrize("hook", HOOKS)
def test_garbage(dp, hook):
    """200 random frames: the program never fails, says pass, drop or reject, and counts
    each frame once, under the verdict it returned."""
    t = model_tables()
    t.prefixes[(0, bytes(16))] = Entry(9, schema.TYPES["dynamic"])   # everyone is dynamic
    load(dp, t, flags_of(ALL + ("op25b_reject", "ip53b_tcp")))
    rng = random.Random(20240611 + len(hook))
    seen = set()
    for role in ("access", "core") * 100:
        frame = _garbage(rng)
        before = dp.counters()
        if refused(hook, frame):
            with pytest.raises(kernel.KernelError):
                dp.verdict(hook, role, frame)
            assert dp.counters() == before
            continue
        got, out = dp.verdict(hook, role, frame)
        after = dp.counters()
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        assert got in ("pass", "drop", "reject"), frame.hex()
        assert len(delta) == 1 and sum(delta.values()) == 1, frame.hex()
        (r, verdict, reason), = delta
        assert (r, verdict) == (role, got), frame.hex()
        assert reason in schema.REASONS
        if got == "reject":
            assert len(out) <= len(frame) and Ether(out)[TCP].flags.R
        else:
            assert out == frame
        seen.add(reason)
    assert "unparsed" in seen and len(seen) > 2, seen


def _kallsyms() -> tuple[int, dict[int, str]]:
    """__bpf_call_base and address -> name of the kernel's symbols."""
    base, syms = 0, {}
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, _, name = line.split()[:3]
            syms.setdefault(int(addr, 16), name)
            if name == "__bpf_call_base":
                base = int(addr, 16)
    return base, syms


def helper_calls(fd: int) -> list[tuple[str, str | None]]:
    """(function, map) of each call of a kernel function in the verified program: the map
    is the one the nearest load of a map into r1 before the call names (None: none)."""
    base, syms = _kallsyms()
    raw = kernel.prog_xlated(fd)
    ins = [struct.unpack_from("=BBhi", raw, i) for i in range(0, len(raw), 8)]
    out = []
    for i, (code, regs, _, imm) in enumerate(ins):
        if code != 0x85 or regs >> 4:   # a call of a kernel function, not a BPF subprogram
            continue
        loads = [j for j in range(i - 1, -1, -1)   # r1 = a map (BPF_PSEUDO_MAP_FD / _VALUE)
                 if ins[j][0] == 0x18 and ins[j][1] & 15 == 1 and ins[j][1] >> 4 in (1, 2)]
        name = kernel.map_name_of_id(ins[loads[0]][3]) if loads else None
        out.append((syms.get(base + imm, hex(base + imm)), name))
    return out


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_map_lookups_are_inlined(dp, hook):
    """No lookup goes through the generic helper bpf_map_lookup_elem, an indirect call
    through the map's operations (a retpoline here) that reads the map's header too: a call
    site that sees one map only (XZ_OWN_SITE keeps like calls apart) is written out in place
    by the verifier (arrays) or calls the map type's own function (hashes, tries). Before,
    the state's two arrays and each pair of the CSAM list's generations shared calls."""
    for role in ("access", "core"):
        calls = helper_calls(dp.fds[(hook, role)])
        assert ("__htab_map_lookup_elem", "xz_csam_h0") in calls   # the check reads calls
        assert [c for c in calls if c[0] == "bpf_map_lookup_elem"] == []


def test_prog_run_stats_by_id(dp):
    """The run counters of a loaded program, found by its kernel id (bench_fwd's ns/packet);
    None for an id no program has."""
    stats = kernel.prog_run_stats(kernel.prog_id(dp.fds[("xdp", "access")]))
    assert stats is not None and all(isinstance(v, int) and v >= 0 for v in stats)
    assert kernel.prog_run_stats(0x7FFF_FFFF) is None


def test_a_programs_source_lines_and_its_id_by_name(dp):
    """What bench/jit_lines.py places a profile's samples by: each source line's offset in
    the JITed program, from 0, in order, with its text; and the program found by its name."""
    pid = kernel.prog_id(dp.fds[("xdp", "access")])
    assert pid in kernel.prog_ids_named("xz_xdp_access")
    start, lines = kernel.prog_source_lines(pid)
    assert start and lines[0][0] == 0 and [o for o, _ in lines] == sorted(o for o, _ in lines)
    texts = {t for _, t in lines}
    assert "*proto = eth->h_proto;" in texts   # the frame's first read (parse.h)
    assert any("xz_csam_b4" in t or "*bits >>" in t for t in texts)   # the filter's word
    # the profile's rule: a sample goes to the line of the instruction before it (the one
    # that stalled), and one outside the program to none
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import jit_lines

    k = next(i for i, (_, t) in enumerate(lines) if t == "*proto = eth->h_proto;")
    after = next(o for o, _ in lines[k + 1:] if o > lines[k][0])   # the next line's start
    c, n = jit_lines.by_line([start + after, start + after, start - 8, 0], start, lines)
    assert n == 2 and c == {"*proto = eth->h_proto;": 2}
