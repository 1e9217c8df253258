"""Frames for the BPF tests: a model.Packet rendered with scapy, in any encapsulation."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    ICMPv6Unknown,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE
from scapy.packet import Raw

from xdpzoot.model import ICMP as P_ICMP
from xdpzoot.model import ICMPV6, TCP_SYN, Packet
from xdpzoot.model import TCP as P_TCP
from xdpzoot.model import UDP as P_UDP

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


def l4(p: Packet):
    """The upper-layer header (and a little payload) of a packet description."""
    if p.proto == P_TCP:
        return TCP(sport=p.sport, dport=p.dport, flags=p.tcp_flags, seq=1000) / Raw(b"x" * 4)
    if p.proto == P_UDP:
        return UDP(sport=p.sport, dport=p.dport) / Raw(b"q" * 12)
    if p.proto == P_ICMP:
        return ICMP(type=p.icmp_type) / Raw(b"ping")
    if p.proto == ICMPV6:
        if p.icmp_type == 135:
            return ICMPv6ND_NS(tgt=p.dst)
        if p.icmp_type in _ND:
            return _ND[p.icmp_type]()
        if p.icmp_type in (8, 128):   # 8: the Packet default, an echo request either way
            return ICMPv6EchoRequest()
        return ICMPv6Unknown(type=p.icmp_type, msgbody=b"\x00" * 4)
    return Raw(b"\x00" * 16)


_ND = {133: ICMPv6ND_RS, 134: ICMPv6ND_RA, 136: ICMPv6ND_NA, 137: ICMPv6ND_Redirect}


def frame(p: Packet, vlans: int = 0, pppoe: bool = False, extra: bool | None = None,
          ttl: int = 64) -> bytes:
    """Ethernet frame for ``p``: 0-2 VLAN tags (802.1ad outer when 2), optional PPPoE
    session, IPv4 options / IPv6 extension headers when ``p.ip_extra``, fragments as
    ``p.frag`` and ``p.l4_len`` say."""
    extra = p.ip_extra if extra is None else extra
    upper = l4(p)
    raw = bytes(upper)
    if p.family == 4:
        ip = IP(src=p.src, dst=p.dst, proto=p.proto, ttl=ttl)
        if extra:
            ip.options = [IPOption(b"\x01\x01\x01\x00")]   # NOP NOP NOP EOL
        if p.frag == "first":
            ip.flags = "MF"
        elif p.frag == "later":
            ip.frag = 4
        l3 = ip
    else:
        l3 = IPv6(src=p.src, dst=p.dst, hlim=ttl)
        if extra:
            l3 = l3 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
        if p.frag != "none":
            l3 = l3 / IPv6ExtHdrFragment(nh=p.proto, m=1 if p.frag == "first" else 0,
                                         offset=0 if p.frag == "first" else 4, id=7)
    if p.frag == "later":
        payload = Raw(b"\x00" * 24)
    elif p.l4_len is not None:
        payload = Raw(raw[: p.l4_len])
    else:
        payload = upper
    if p.family == 4:
        l3.proto = p.proto
    elif p.frag == "none":
        _last(l3).nh = p.proto
    pkt = l3 / payload
    if pppoe:
        pkt = PPPoE(sessionid=0x1234) / PPP(proto=0x0021 if p.family == 4 else 0x0057) / pkt
    if vlans == 2:
        pkt = Dot1AD(vlan=100) / Dot1Q(vlan=200) / pkt
    elif vlans == 1:
        pkt = Dot1Q(vlan=200) / pkt
    return bytes(Ether(src=MAC_A, dst=MAC_B) / pkt)


def _last(layer):
    while layer.payload and not isinstance(layer.payload, Raw | type(None)):
        if not hasattr(layer.payload, "nh"):
            break
        layer = layer.payload
    return layer


__all__ = ["frame", "l4", "TCP_SYN"]
