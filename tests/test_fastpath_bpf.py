"""The fast path through BPF_PROG_TEST_RUN, at both hooks: frame in, return code, frame out
and the fast path's counters, as a table.

The route lookup answers from the network namespace of the thread that runs the program,
so the runs happen inside a small namespace of the module's own (entered with setns for
the run only): an interface ``fa`` (its veth peer ``fb``) holding 10.9.0.1/24 and
fd00:9::1/64, one static neighbour on each, a blackhole route, forwarding on. The
program's ingress interface is that namespace's loopback (what test_run gives an XDP
program; a TC program is told so in its context, struct __sk_buff), given the router's MAC
address in the fast path's MAC table (as attach gives each interface its own). A veth
``fv`` stands for a VRRP macvlan: what the kernel routes as from it follows a
policy rule of its own (`iif fv`: table 77, which prohibits 10.9.0.0/24 and fd00:9::/64,
routes 10.7.0.0/24 out of it and 10.6.0.0/24 by the neighbour on ``fa``). The subscriber's
/24 (SRC4) is routed out of ``fv`` (what reverse path filtering asks).
"""

from __future__ import annotations

import json
import secrets
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from bpfcases import flags_of, load, model_tables
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from xdpzoot.dataplane import schema
from xdpzoot.lab import in_netns

RETVAL = {"xdp": {"pass": 2, "drop": 1, "redirect": 4},         # XDP_PASS, XDP_DROP, ...
          "tc": {"pass": 0, "drop": 2, "redirect": 7}}          # TC_ACT_OK, _SHOT, _REDIRECT
LO = 1   # the loopback's ifindex, in every namespace
NEIGH4, NEIGH6 = "10.9.0.2", "fd00:9::2"
NEIGH_MAC = "02:00:00:00:09:02"
MAC_IN, MAC_ROUTER = "02:00:00:00:00:01", "02:00:00:00:00:02"
OTHER_MAC = "02:00:00:00:00:03"   # a host beside the router on the access link
VMAC, OTHER_VMAC = "00:00:5e:00:01:07", "00:00:5e:00:02:07"   # VRRP virtual MACs (v4, v6)
SRC4, SRC6 = "100.64.0.12", "2001:db8:100:8::12"   # a dynamic subscriber of test_bpf's table
MTU = 1280


@dataclass(frozen=True)
class Net:
    name: str
    fa: int        # ifindex of the egress interface
    fa_mac: str
    fv: int        # ifindex of the stand-in for a VRRP macvlan


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    name = "xzfp" + secrets.token_hex(3)

    def ip(*args: str) -> str:
        return subprocess.run(["ip", "-n", name, *args], check=True, capture_output=True,
                              text=True, timeout=10).stdout

    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
                        "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                        "net.ipv6.conf.default.accept_dad=0"], check=True, timeout=10)
        ip("link", "set", "lo", "up")
        ip("link", "add", "fa", "mtu", str(MTU), "type", "veth", "peer", "name", "fb")
        ip("link", "set", "fa", "up")
        ip("link", "set", "fb", "up")
        ip("addr", "add", "10.9.0.1/24", "dev", "fa")
        ip("-6", "addr", "add", "fd00:9::1/64", "dev", "fa", "nodad")
        for a in (NEIGH4, NEIGH6):
            ip("neigh", "replace", a, "lladdr", NEIGH_MAC, "dev", "fa", "nud", "permanent")
        ip("route", "add", "blackhole", "10.8.0.0/24")
        ip("-6", "route", "add", "blackhole", "fd00:8::/64")
        ip("link", "add", "fv", "type", "veth", "peer", "name", "fw")
        ip("link", "set", "fv", "up")
        ip("link", "set", "fw", "up")
        for family in ("-4", "-6"):
            ip(family, "rule", "add", "iif", "fv", "table", "77", "pref", "100")
        ip("route", "add", "prohibit", "10.9.0.0/24", "table", "77")
        ip("-6", "route", "add", "prohibit", "fd00:9::/64", "table", "77")
        ip("route", "add", "10.7.0.0/24", "dev", "fv", "table", "77")
        ip("route", "add", "10.6.0.0/24", "via", NEIGH4, "dev", "fa", "table", "77")
        ip("route", "add", "100.64.0.0/24", "dev", "fv")
        ip("neigh", "replace", "10.7.0.2", "lladdr", NEIGH_MAC, "dev", "fv", "nud", "permanent")
        link = json.loads(ip("-j", "link", "show", "dev", "fa"))[0]
        fv = json.loads(ip("-j", "link", "show", "dev", "fv"))[0]["ifindex"]
        yield Net(name, link["ifindex"], link["address"], fv)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


def v4(dst: str, ttl: int = 64, size: int = 0, options: bool = False, vlan: bool = False,
       l2dst: str = MAC_ROUTER, dport: int = 80, src: str = SRC4) -> bytes:
    ip = IP(src=src, dst=dst, ttl=ttl, flags="DF")
    if options:
        ip.options = [b"\x01\x01\x01\x00"]
    pkt = ip / TCP(sport=40000, dport=dport, flags="S") / Raw(b"x" * size)
    return bytes(Ether(src=MAC_IN, dst=l2dst) / (Dot1Q(vlan=7) / pkt if vlan else pkt))


def v6(dst: str, hlim: int = 64, size: int = 0, hbh: bool = False, src: str = SRC6,
       l2dst: str = MAC_ROUTER) -> bytes:
    ip = IPv6(src=src, dst=dst, hlim=hlim)
    if hbh:
        ip = ip / IPv6ExtHdrHopByHop()
    return bytes(Ether(src=MAC_IN, dst=l2dst) / ip / TCP(sport=40000, dport=80, flags="S")
                 / Raw(b"x" * size))


@dataclass(frozen=True)
class Case:
    id: str
    frame: Callable[[], bytes]
    verdict: str                # pass (to the kernel), redirect (forwarded), drop
    reason: str | None          # fast path counter that grows; None: none
    egress: bool = True         # fa in the devmap
    ingress_mac: str | None = MAC_ROUTER   # the ingress interface's MAC in the table; None: none
    vmacs: tuple[str, ...] = ()   # its VRRP virtual MACs in the table, after it
    via: bool = False             # ... routed as from fv (else from the ingress)
    rpf: int = 0                  # the rp_filter of that interface (XZ_RPF_*)
    switches: tuple[str, ...] = ("fast_path", "op25b", "op25b_v6")
    tc: tuple[str, str | None] | None = None   # (verdict, reason) at TC, where they differ
    gro: tuple[int, int] = (0, 0)   # TC: a GRO aggregate (__sk_buff.gso_segs, .gso_size)
    hooks: tuple[str, ...] = ("xdp", "tc")


CASES = [
    Case("v4 forwarded", lambda: v4(NEIGH4), "redirect", "forwarded"),
    Case("v6 forwarded", lambda: v6(NEIGH6), "redirect", "forwarded"),
    Case("v4 TTL 2 forwarded", lambda: v4(NEIGH4, ttl=2), "redirect", "forwarded"),
    Case("v4 TTL 1", lambda: v4(NEIGH4, ttl=1), "pass", "ttl"),
    Case("v6 hop limit 1", lambda: v6(NEIGH6, hlim=1), "pass", "ttl"),
    Case("v4 TTL 0", lambda: v4(NEIGH4, ttl=0), "pass", "ttl"),
    Case("v4 unresolved neighbour", lambda: v4("10.9.0.3"), "pass", "no_neigh"),
    Case("v6 unresolved neighbour", lambda: v6("fd00:9::3"), "pass", "no_neigh"),
    Case("v4 over the MTU", lambda: v4(NEIGH4, size=MTU), "pass", "mtu"),
    Case("v6 over the MTU", lambda: v6(NEIGH6, size=MTU), "pass", "mtu"),
    Case("v4 exactly the MTU", lambda: v4(NEIGH4, size=MTU - 40), "redirect", "forwarded"),
    Case("v4 for the router", lambda: v4("10.9.0.1"), "pass", "local"),
    Case("v6 for the router", lambda: v6("fd00:9::1"), "pass", "local"),
    Case("v4 blackhole route", lambda: v4("10.8.0.1"), "pass", "unroutable"),
    Case("v6 blackhole route", lambda: v6("fd00:8::1"), "pass", "unroutable"),
    Case("v4 multicast", lambda: v4("224.0.0.5"), "pass", "local"),
    Case("v4 broadcast frame", lambda: v4(NEIGH4, l2dst="ff:ff:ff:ff:ff:ff"), "pass", "local"),
    # Another host's frame (seen in promiscuous mode): the kernel drops it, never forwards it.
    Case("v4 for another host's MAC", lambda: v4(NEIGH4, l2dst=OTHER_MAC), "pass", "other_host"),
    Case("v6 for another host's MAC", lambda: v6(NEIGH6, l2dst=OTHER_MAC), "pass", "other_host"),
    Case("ingress MAC not known", lambda: v4(NEIGH4), "pass", "other_host", ingress_mac=None),
    # A VRRP virtual MAC of the ingress ([interfaces] vmacs), the third of its table's four.
    Case("v4 to a VRRP virtual MAC", lambda: v4(NEIGH4, l2dst=VMAC), "redirect", "forwarded",
         vmacs=(OTHER_VMAC, VMAC)),
    Case("v6 to a VRRP virtual MAC", lambda: v6(NEIGH6, l2dst=VMAC), "redirect", "forwarded",
         vmacs=(VMAC,)),
    Case("v4 to a VRRP MAC not in the table", lambda: v4(NEIGH4, l2dst=VMAC), "pass",
         "other_host", vmacs=(OTHER_VMAC,)),
    # ... whose frames the kernel routes as the macvlan's (its `iif` rule): so does the lookup.
    Case("v4 to a VRRP MAC, its macvlan's rule", lambda: v4(NEIGH4, l2dst=VMAC), "pass",
         "unroutable", vmacs=(OTHER_VMAC, VMAC), via=True),
    Case("v6 to a VRRP MAC, its macvlan's rule", lambda: v6(NEIGH6, l2dst=VMAC), "pass",
         "unroutable", vmacs=(VMAC,), via=True),
    Case("v4 to a VRRP MAC, routed back out of it", lambda: v4("10.7.0.2", l2dst=VMAC), "pass",
         "egress", vmacs=(VMAC,), via=True),
    # Reverse path filtering, as the kernel's (IPv4): the source routed back by the interface
    # the frame came in by (strict), at all (loose); else, or where the kernel must judge
    # (a VRF's member), to the kernel. The subscriber's /24 is routed out of fv.
    Case("v4 strict rp_filter, source routed back by it",
         lambda: v4("10.6.0.5", l2dst=VMAC), "redirect", "forwarded", vmacs=(VMAC,), via=True,
         rpf=1),
    Case("v4 strict rp_filter, source routed back by another", lambda: v4(NEIGH4), "pass",
         "rp_filter", rpf=1),
    Case("v4 loose rp_filter, source routed back", lambda: v4(NEIGH4), "redirect", "forwarded",
         rpf=2),
    Case("v4 loose rp_filter, source not routed", lambda: v4(NEIGH4, src="100.65.0.1"), "pass",
         "rp_filter", rpf=2),
    Case("v4 strict rp_filter, source a blackhole", lambda: v4(NEIGH4, src="10.8.0.9"), "pass",
         "rp_filter", rpf=1),
    Case("v4 rp_filter left to the kernel", lambda: v4("10.6.0.5", l2dst=VMAC), "pass",
         "rp_filter", vmacs=(VMAC,), via=True, rpf=3),
    Case("v6 rp_filter: IPv4's only", lambda: v6(NEIGH6), "redirect", "forwarded", rpf=1),
    Case("v6 link-local source", lambda: v6(NEIGH6, src="fe80::1"), "pass", "local"),
    Case("v6 multicast", lambda: v6("ff02::1"), "pass", "local"),
    Case("v4 options", lambda: v4(NEIGH4, options=True), "pass", "frame"),
    Case("v6 hop-by-hop", lambda: v6(NEIGH6, hbh=True), "pass", "frame"),
    Case("VLAN tagged", lambda: v4(NEIGH4, vlan=True), "pass", "frame"),
    # XDP redirects only into the devmap; TC to any interface (the neighbour output writes
    # the link header a VLAN device or a tunnel needs).
    Case("egress not in the devmap", lambda: v4(NEIGH4), "pass", "egress", egress=False,
         tc=("redirect", "forwarded")),
    # A GRO aggregate's segments (its headers and gso_size) against the MTU: 20 + 20 + 1240 is
    # the MTU; one more byte is not. Without its gso_size the kernel gets it.
    Case("GRO aggregate", lambda: v4(NEIGH4, size=200), "redirect", "forwarded",
         gro=(2, MTU - 40), hooks=("tc",)),
    Case("GRO aggregate over the MTU", lambda: v4(NEIGH4, size=200), "pass", "mtu",
         gro=(2, MTU - 39), hooks=("tc",)),
    Case("GRO aggregate, no gso_size", lambda: v4(NEIGH4, size=200), "pass", "frame",
         gro=(2, 0), hooks=("tc",)),
    Case("fast path off", lambda: v4(NEIGH4), "pass", None, switches=("op25b",)),
    Case("bypass", lambda: v4(NEIGH4), "pass", None, switches=("fast_path", "bypass")),
    Case("OP25B still drops", lambda: v4(NEIGH4, dport=25), "drop", None),
    Case("monitor: forwarded", lambda: v4(NEIGH4, dport=25), "redirect", "forwarded",
         switches=("fast_path", "op25b", "monitor")),
]
HOOK_CASES = [(h, c) for c in CASES for h in c.hooks]


def skb_ctx(gro: tuple[int, int] = (0, 0)) -> bytes:
    """The start of a struct __sk_buff for test_run: ingress_ifindex and ifindex the
    loopback (offsets 36, 40), and for a GRO aggregate gso_segs (offset 164) and gso_size
    (176)."""
    ctx = bytearray(184 if gro[0] else 44)
    struct.pack_into("=II", ctx, 36, LO, LO)
    if gro[0]:
        struct.pack_into("=I", ctx, 164, gro[0])
        struct.pack_into("=I", ctx, 176, gro[1])
    return bytes(ctx)


@pytest.mark.parametrize("hook,case", HOOK_CASES, ids=[f"{h} {c.id}" for h, c in HOOK_CASES])
def test_fast_path(dp, net: Net, hook: str, case: Case):
    load(dp, model_tables(), flags_of(case.switches))
    dp.maps.clear_fast_counters()
    frame = case.frame()
    verdict, reason = case.tc if hook == "tc" and case.tc else (case.verdict, case.reason)
    # The devmap is written inside the namespace too: the kernel resolves an ifindex in the
    # writer's namespace (as attach does, run in the router's). Written from the root
    # namespace, `fa`'s ifindex named another interface there, or none: EINVAL on 6.1 in a
    # VM, where the root namespace has only lo.
    with in_netns(net.name):
        try:
            ingress = [(mac(case.ingress_mac), 0, case.rpf)] + [
                (mac(m), net.fv if case.via else 0, case.rpf) for m in case.vmacs] \
                if case.ingress_mac else None
            dp.maps.set_fast_ifs(({LO: ingress} if ingress else {}) |
                                 ({net.fa: [(mac(net.fa_mac), 0, 0)]} if case.egress else {}))
            r = dp.run(hook, "access", frame, ctx=skb_ctx(case.gro) if hook == "tc" else b"")
        finally:
            dp.maps.set_fast_ifs({})
    assert r.retval == RETVAL[hook][verdict]
    grew = {k: v for k, v in dp.maps.fast_counters().items() if v != (0, 0)}
    assert grew == ({reason: (1, len(frame))} if reason else {})
    if verdict != "redirect":
        assert r.data == frame, "a packet handed to the kernel must be untouched"
        return
    out, sent = r.data, frame
    if hook == "xdp":   # the MACs of the route's neighbour; from TC the kernel writes them
        assert (Ether(out).src, Ether(out).dst) == (net.fa_mac, NEIGH_MAC)
        assert out[12:] != sent[12:]
    else:
        assert out[:12] == sent[:12]
    if IP in Ether(sent):
        ttl = 14 + 8   # TTL, then protocol and checksum: the only bytes that change
        assert out[ttl] == sent[ttl] - 1
        assert out[12:ttl] == sent[12:ttl] and out[ttl + 4:] == sent[ttl + 4:]
        assert out[ttl + 1] == sent[ttl + 1]
        assert _csum(out[14:34]) == 0, "IPv4 header checksum wrong"
    else:
        hlim = 14 + 7
        assert out[hlim] == sent[hlim] - 1
        assert out[12:hlim] == sent[12:hlim] and out[hlim + 1:] == sent[hlim + 1:]


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _csum(header: bytes) -> int:
    """The Internet checksum over ``header``: 0 when its checksum field is right."""
    s = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while s > 0xffff:
        s = (s & 0xffff) + (s >> 16)
    return 0xffff - s


def test_reasons_are_the_header_list():
    assert schema.FAST_REASONS == ("forwarded", "frame", "ttl", "local", "unroutable",
                                   "no_neigh", "mtu", "egress", "redirect", "other",
                                   "other_host", "rp_filter")
