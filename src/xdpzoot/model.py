"""Reference model of the policy pipeline, in plain Python.

It answers ``xdpzoot explain`` (with lookups against the live maps) and is the
oracle the BPF programs are tested against (with :class:`tables.Tables`). It
mirrors bpf/policy.h step by step; a change to one is a change to both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol

from xdpzoot.dataplane import schema
from xdpzoot.dataplane.layout import Entry
from xdpzoot.tables import addr16

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
PROTOS = {"tcp": TCP, "udp": UDP, "icmp": ICMP, "icmpv6": ICMPV6}
L4_NEED = {TCP: 20, UDP: 8, ICMP: 8, ICMPV6: 8}
TCP_RST, TCP_SYN = 0x04, 0x02


class Lookup(Protocol):
    """What the policy asks of the maps."""

    def classify(self, a: bytes) -> Entry | None: ...
    def allowed(self, a: bytes) -> int: ...
    def csam(self, a: bytes) -> bool: ...


@dataclass(frozen=True)
class Packet:
    """What the parser would learn from a frame.

    ``l4_len`` is the upper-layer length the IP header declares (None: a full
    header); ``frag`` is none, first or later; ``ip_extra`` means IPv4 options or
    IPv6 extension headers; ``parsed`` False means L2/L3 could not be parsed.
    """

    role: str
    src: str
    dst: str
    proto: int
    sport: int = 0
    dport: int = 0
    frag: str = "none"
    l4_len: int | None = None
    tcp_flags: int = TCP_SYN
    icmp_type: int = 8
    ip_extra: bool = False
    parsed: bool = True

    @property
    def family(self) -> int:
        return 6 if ":" in self.src else 4

    @property
    def l4ok(self) -> bool:
        need = L4_NEED.get(self.proto, 0)
        length = need if self.l4_len is None else self.l4_len
        return self.frag != "later" and need > 0 and length >= need

    @property
    def short(self) -> bool:
        """A first fragment too short to hold the fixed header (and so the ports)."""
        need = L4_NEED.get(self.proto, 0)
        length = need if self.l4_len is None else self.l4_len
        return self.frag == "first" and length < need


@dataclass(frozen=True)
class Decision:
    verdict: str
    reason: str
    subscriber: Entry | None = None


def _port_rule(p: Packet, cls: Entry, port: int, exempt: int, relay: bytes | None,
               look: Lookup, reason: str) -> tuple[str, bool]:
    """bpf/policy.h xz_port_rule: (reason, hit)."""
    if not p.short:
        if not p.l4ok:
            return "unparsed", False
        if p.dport != port:
            return "ok", False
    if cls.flags & exempt:
        return "exempt", False
    if relay is not None and look.allowed(relay) & schema.C["XZ_ALLOW_OP25B"]:
        return "allowlist", False
    return ("frag_short" if p.short else reason), True


def can_reply(p: Packet) -> bool:
    """bpf/reply.h xz_can_reply: RST for TCP, ICMP prohibited for the rest, never an answer
    to a RST or an ICMP error, nor to packets with IP options or extension headers."""
    if p.ip_extra or not p.l4ok or (p.family == 6 and p.frag != "none"):
        return False   # (an IPv6 fragment header is an extension header too)
    if p.proto == TCP:
        return not p.tcp_flags & TCP_RST
    if p.proto == ICMP:
        return p.icmp_type == 8
    if p.proto == ICMPV6:
        return p.icmp_type == 128
    return True


def decide(p: Packet, flags: int, look: Lookup) -> Decision:
    """Verdict and reason for one packet, as the data plane would count it."""
    c = schema.C
    verdict, reason, cls = "pass", "ok", None
    if flags & c["XZ_C_BYPASS"]:
        reason = "bypass"
    elif not p.parsed:
        reason = "unparsed"
    else:
        verdict, reason, cls = _pipeline(p, flags, look)
        src, dst = addr16(p.src), addr16(p.dst)
        if verdict == "pass" and (p.role == "access" or flags & c["XZ_C_CSAM_CORE"]) and \
                look.csam(dst if p.role == "access" else src):
            reason = "csam"
            reject = p.role == "access" and flags & c["XZ_C_CSAM_REJECT"] and \
                can_reply(p) and p.frag != "later"
            verdict = "reject" if reject else "drop"
    if verdict != "pass" and flags & c["XZ_C_MONITOR"]:
        verdict = "monitor"
    return Decision(verdict, reason, cls)


def _pipeline(p: Packet, flags: int, look: Lookup) -> tuple[str, str, Entry | None]:
    c = schema.C
    src, dst = addr16(p.src), addr16(p.dst)
    me, peer = (src, dst) if p.role == "access" else (dst, src)
    cls = look.classify(me)
    if cls is None:
        return "pass", "unknown", None
    if p.family == 6 and p.proto == ICMPV6 and p.l4ok and 133 <= p.icmp_type <= 137:
        return "pass", "ok", cls
    if cls.flags & c["XZ_F_SUSPENDED"]:
        if look.allowed(peer) & c["XZ_ALLOW_SUSPEND"]:
            return "pass", "allowlist", cls
        return "drop", "suspended", cls
    if p.frag == "later":
        return "pass", "fragment", cls
    if cls.type != c["XZ_TYPE_DYNAMIC"]:
        return "pass", "ok", cls
    v6 = p.family == 6
    if p.role == "access":
        if not flags & c["XZ_C_OP25B"] or (v6 and not flags & c["XZ_C_OP25B_V6"]) \
                or p.proto != TCP:
            return "pass", "ok", cls
        reason, hit = _port_rule(p, cls, 25, c["XZ_F_OP25B_EXEMPT"], peer, look, "op25b")
        if not hit:
            return "pass", reason, cls
        reject = flags & c["XZ_C_OP25B_REJECT"] and reason == "op25b" and can_reply(p)
        return ("reject" if reject else "drop"), reason, cls
    if not flags & c["XZ_C_IP53B"] or (v6 and not flags & c["XZ_C_IP53B_V6"]) \
            or not (p.proto == UDP or (p.proto == TCP and flags & c["XZ_C_IP53B_TCP"])):
        return "pass", "ok", cls
    reason, hit = _port_rule(p, cls, 53, c["XZ_F_IP53B_EXEMPT"], None, look, "ip53b")
    return ("drop" if hit else "pass"), reason, cls


# --- the scan sketch (bpf/scan.h) -----------------------------------------------------------

_M64 = (1 << 64) - 1
SCAN_REGS, SCAN_RMAX = schema.C["XZ_SCAN_REGS"], schema.C["XZ_SCAN_RMAX"]
SCAN_FRAC = schema.C["XZ_SCAN_FRAC"]


def _mix64(x: int) -> int:
    """bpf/scan.h xz_mix64 (murmur3's finaliser)."""
    x ^= x >> 33
    x = x * 0xFF51AFD7ED558CCD & _M64
    x ^= x >> 33
    x = x * 0xC4CEB9FE1A85EC53 & _M64
    return x ^ x >> 33


def scan_opens(p: Packet) -> bool:
    """bpf/scan.h xz_scan_opens: a TCP SYN without ACK (or RST), any UDP datagram, an
    ICMP / ICMPv6 echo request."""
    if not p.l4ok:
        return False
    if p.proto == TCP:
        return p.tcp_flags & (TCP_SYN | 0x10 | TCP_RST) == TCP_SYN
    return p.proto == UDP or (p.proto, p.icmp_type) in ((ICMP, 8), (ICMPV6, 128))


class ScanSketch:
    """bpf/scan.h in Python, register for register and sixteenth for sixteenth: the tests
    check the kernel's count against it, and the benchmark measures the sketch's error
    over many sets of destinations with it."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch   # the window, which salts the hash
        self.reg = [0] * SCAN_REGS
        self.count = 0   # the estimate, in 1/2^SCAN_FRAC destinations

    def add(self, dst: bytes, dport: int, proto: int) -> None:
        """A conversation opened to the 16-byte address ``dst``, port, protocol."""
        a = int.from_bytes(dst[:8], sys.byteorder)
        b = int.from_bytes(dst[8:], sys.byteorder)
        h = _mix64(((a ^ self.epoch) * 0x9E3779B97F4A7C15 & _M64) ^ b ^ (dport << 8 | proto))
        i, low = (h >> 32) * SCAN_REGS >> 32, h & 0xFFFF_FFFF
        rank = min(33 - low.bit_length(), SCAN_RMAX)
        if rank <= self.reg[i]:
            return
        q = sum(1 << (SCAN_RMAX - r) for r in self.reg if r < SCAN_RMAX)
        self.reg[i] = rank
        self.count += ((SCAN_REGS << (SCAN_RMAX + SCAN_FRAC)) + q // 2) // q

    @property
    def estimate(self) -> float:
        return self.count / (1 << SCAN_FRAC)
