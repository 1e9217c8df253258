"""The CSAM step of the pipeline as tables, through BPF_PROG_TEST_RUN.

Every row says what is sent, which generation holds the list, what the control word says,
which switches are on, and the verdict and reason expected. Each row runs on both hooks and
in five encapsulations and must count exactly one packet under (role, verdict, reason), one
CSAM hit (by generation and family) exactly when the reason is csam, and answer a rejected
packet with a well-formed TCP RST or ICMP "administratively prohibited". The reference model
answers the same rows (test_model_agrees).

The subscriber world (pools, hosts, allow-lists) is test_bpf's; the list is below, in
documentation ranges and 198.18.0.0/15.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import packets
import pytest
from bpfcases import (
    C_,
    DNS,
    DYN4,
    DYN6,
    ENCAPS,
    EXEMPT4,
    HOOKS,
    OP,
    REJ,
    RELAY4,
    STATIC4,
    STATIC6,
    STRANGER4,
    STRANGER6,
    SUSP4,
    SUSP6,
    WEB4,
    WEB6,
    A,
    flags_of,
    ids,
    load,
    model_tables,
    ping,
    run_one,
    tcp,
    udp,
)

from xdpzoot import model, tables
from xdpzoot.dataplane import blocklist, dirs, kernel, layout, schema
from xdpzoot.model import ICMP, ICMPV6, TCP_RST, Packet
from xdpzoot.sources import csam

C = schema.C
GEN, HOSTS, PREFIXES = C["XZ_CSAM_GEN"], C["XZ_CSAM_HOSTS"], C["XZ_CSAM_PREFIXES"]
TCP_ACK = 0x10

# ---- the list ------------------------------------------------------------------------------

LISTED4 = "192.0.2.66"              # exact entries
LISTED6 = "2001:db8:ffff:66::66"
PREFIX4 = "198.18.0.0/15"           # prefix entries
PREFIX6 = "2001:db8:bad::/48"
IN_PREFIX4 = "198.19.7.7"
IN_PREFIX6 = "2001:db8:bad:7::7"
LIST = ("192.0.2.66/32", "2001:db8:ffff:66::66/128", PREFIX4, PREFIX6,
        f"{RELAY4}/32")            # the ISP's own relay, listed: OP25B allows, CSAM does not
LIST_HOSTS = {tables.addr16(ipaddress.ip_network(n).network_address) for n in LIST
              if tables.is_host(ipaddress.ip_network(n))}
LIST_PREFIXES = {tables.key_of(ipaddress.ip_network(n)) for n in LIST
                 if not tables.is_host(ipaddress.ip_network(n))}
ALL_BITS = HOSTS | PREFIXES


@dataclass(frozen=True)
class Case:
    id: str
    desc: str
    packet: Packet
    switches: tuple[str, ...]
    verdict: str          # as counted: pass, drop, reject, monitor
    reason: str
    holds: int = 1        # the generation that holds the list (the other one is empty)
    word: int | None = None   # the csam word; None: ``holds`` in force, both kinds on

    @property
    def csam_word(self) -> int:
        return self.holds | ALL_BITS if self.word is None else self.word

CR = ("csam_reject",)
CORE = ("csam_core",)

CASES = [
    # -- what is listed --
    Case("exact-v4", "TCP to a listed address", tcp(A, DYN4, LISTED4, 443), (), "drop", "csam"),
    Case("exact-v6", "IPv6 TCP to a listed address", tcp(A, DYN6, LISTED6, 443), (),
         "drop", "csam"),
    Case("exact-v4-udp", "UDP too", udp(A, DYN4, LISTED4, 4500), (), "drop", "csam"),
    Case("exact-v6-udp", "IPv6 UDP too", udp(A, DYN6, LISTED6, 4500), (), "drop", "csam"),
    Case("exact-v4-ping", "and ping", ping(A, DYN4, LISTED4), (), "drop", "csam"),
    Case("exact-v6-ping", "and IPv6 ping", ping(A, DYN6, LISTED6), (), "drop", "csam"),
    Case("prefix-v4", "an address inside a listed prefix", tcp(A, DYN4, IN_PREFIX4, 80), (),
         "drop", "csam"),
    Case("prefix-v6", "an IPv6 address inside a listed prefix", tcp(A, DYN6, IN_PREFIX6, 80),
         (), "drop", "csam"),
    Case("prefix-v4-first", "the prefix's first address", tcp(A, DYN4, "198.18.0.0", 80), (),
         "drop", "csam"),
    Case("prefix-v4-last", "the prefix's last address", tcp(A, DYN4, "198.19.255.255", 80), (),
         "drop", "csam"),
    Case("prefix-v6-last", "the IPv6 prefix's last address",
         tcp(A, DYN6, "2001:db8:bad:ffff:ffff:ffff:ffff:ffff", 80), (), "drop", "csam"),
    Case("prefix-v4-below", "just below the prefix", tcp(A, DYN4, "198.17.255.255", 80), (),
         "pass", "ok"),
    Case("prefix-v4-above", "just above the prefix", tcp(A, DYN4, "198.20.0.0", 80), (),
         "pass", "ok"),
    Case("prefix-v6-outside", "next to the IPv6 prefix", tcp(A, DYN6, "2001:db8:bae::1", 80),
         (), "pass", "ok"),
    Case("unlisted-v4", "an address not listed", tcp(A, DYN4, WEB4, 80), (), "pass", "ok"),
    Case("unlisted-v6", "an IPv6 address not listed", tcp(A, DYN6, WEB6, 80), (), "pass", "ok"),
    Case("neighbour-of-exact-v4", "the listed address + 1", tcp(A, DYN4, "192.0.2.67", 80), (),
         "pass", "ok"),
    Case("neighbour-of-exact-v6", "the listed IPv6 address + 1",
         tcp(A, DYN6, "2001:db8:ffff:66::67", 80), (), "pass", "ok"),
    # -- who sends --
    Case("static-src", "static subscribers are no exception", tcp(A, STATIC4, LISTED4, 80), (),
         "drop", "csam"),
    Case("static-src-v6", "static IPv6", tcp(A, STATIC6, IN_PREFIX6, 80), (), "drop", "csam"),
    Case("exempt-src", "OP25B-exempt is not CSAM-exempt", tcp(A, EXEMPT4, LISTED4, 25), OP,
         "drop", "csam"),
    Case("unknown-src-v4", "a source that is no subscriber", tcp(A, STRANGER4, LISTED4, 80), (),
         "drop", "csam"),
    Case("unknown-src-v6", "an IPv6 source that is no subscriber",
         tcp(A, STRANGER6, IN_PREFIX6, 80), (), "drop", "csam"),
    Case("relay-listed", "OP25B's allow-list passes the relay, the list does not",
         tcp(A, DYN4, RELAY4, 25), OP, "drop", "csam"),
    # -- earlier verdicts keep their reason --
    Case("suspended-v4", "a suspended subscriber is dropped as suspended",
         tcp(A, SUSP4, LISTED4, 80), (), "drop", "suspended"),
    Case("suspended-v6", "suspended IPv6", tcp(A, SUSP6, LISTED6, 80), CR, "drop", "suspended"),
    Case("op25b-v4", "OP25B drops first", tcp(A, DYN4, LISTED4, 25), OP, "drop", "op25b"),
    Case("op25b-v6", "OP25B drops first, IPv6", tcp(A, DYN6, IN_PREFIX6, 25), OP,
         "drop", "op25b"),
    Case("op25b-reject", "OP25B's RST, not CSAM's", tcp(A, DYN4, LISTED4, 25), REJ + CR,
         "reject", "op25b"),
    Case("monitor", "monitor: decided and counted, but passed", tcp(A, DYN4, LISTED4, 80),
         ("monitor",), "monitor", "csam"),
    Case("monitor-reject", "monitor in reject mode: no answer", tcp(A, DYN6, LISTED6, 80),
         ("monitor",) + CR, "monitor", "csam"),
    Case("bypass", "bypass: not even looked up", tcp(A, DYN4, LISTED4, 80), ("bypass",) + CR,
         "pass", "bypass"),
    # -- generations and the control word --
    Case("gen0-exact", "the list in generation 0", tcp(A, DYN4, LISTED4, 80), (), "drop", "csam",
         holds=0),
    Case("gen0-prefix-v6", "generation 0, IPv6 prefix", tcp(A, DYN6, IN_PREFIX6, 80), (),
         "drop", "csam", holds=0),
    Case("idle-gen1", "the list in generation 1, generation 0 (empty) in force",
         tcp(A, DYN4, LISTED4, 80), (), "pass", "ok", holds=1, word=0 | ALL_BITS),
    Case("idle-gen1-prefix", "the same, for a prefix", tcp(A, DYN6, IN_PREFIX6, 80), (),
         "pass", "ok", holds=1, word=0 | ALL_BITS),
    Case("idle-gen0", "the list in generation 0, generation 1 (empty) in force",
         tcp(A, DYN6, LISTED6, 80), (), "pass", "ok", holds=0, word=1 | ALL_BITS),
    Case("no-hosts-bit-exact", "hosts bit off: exact entries are not looked up",
         tcp(A, DYN4, LISTED4, 80), (), "pass", "ok", word=1 | PREFIXES),
    Case("no-hosts-bit-prefix", "hosts bit off: prefixes still are",
         tcp(A, DYN4, IN_PREFIX4, 80), (), "drop", "csam", word=1 | PREFIXES),
    Case("no-prefixes-bit-prefix", "prefixes bit off: the trie is not looked up",
         tcp(A, DYN6, IN_PREFIX6, 80), (), "pass", "ok", word=1 | HOSTS),
    Case("no-prefixes-bit-exact", "prefixes bit off: exact entries still are",
         tcp(A, DYN6, LISTED6, 80), (), "drop", "csam", word=1 | HOSTS),
    Case("no-bits", "neither bit: nothing is looked up", tcp(A, DYN4, LISTED4, 80), (),
         "pass", "ok", word=1),
    # -- reject mode --
    Case("reject-syn-v4", "SYN answered with RST|ACK", tcp(A, DYN4, LISTED4, 443), CR,
         "reject", "csam"),
    Case("reject-syn-v6", "IPv6 SYN answered with RST|ACK", tcp(A, DYN6, IN_PREFIX6, 443), CR,
         "reject", "csam"),
    Case("reject-ack-v4", "an ACK segment answered with RST",
         tcp(A, DYN4, IN_PREFIX4, 443, tcp_flags=TCP_ACK), CR, "reject", "csam"),
    Case("reject-udp-v4", "UDP answered with ICMP 3/13", udp(A, DYN4, LISTED4, 4500), CR,
         "reject", "csam"),
    Case("reject-udp-v6", "UDP answered with ICMPv6 1/1", udp(A, DYN6, LISTED6, 4500), CR,
         "reject", "csam"),
    Case("reject-udp-v4-prefix", "UDP to a listed prefix", udp(A, STRANGER4, IN_PREFIX4, 53),
         CR, "reject", "csam"),
    Case("reject-ping-v4", "echo request answered with ICMP 3/13", ping(A, DYN4, LISTED4), CR,
         "reject", "csam"),
    Case("reject-ping-v6", "echo request answered with ICMPv6 1/1", ping(A, DYN6, IN_PREFIX6),
         CR, "reject", "csam"),
    Case("reject-icmp-error-v4", "an ICMP error is not answered",
         Packet(A, DYN4, LISTED4, ICMP, icmp_type=3), CR, "drop", "csam"),
    Case("reject-icmp-echo-reply-v4", "nor an echo reply",
         Packet(A, DYN4, LISTED4, ICMP, icmp_type=0), CR, "drop", "csam"),
    Case("reject-icmpv6-error", "an ICMPv6 error is not answered",
         Packet(A, DYN6, LISTED6, ICMPV6, icmp_type=1), CR, "drop", "csam"),
    Case("reject-rst-v4", "a RST is never answered", tcp(A, DYN4, LISTED4, 443,
                                                           tcp_flags=TCP_RST), CR, "drop", "csam"),
    Case("reject-rst-ack-v6", "nor a RST|ACK",
         tcp(A, DYN6, LISTED6, 443, tcp_flags=TCP_RST | TCP_ACK), CR, "drop", "csam"),
    Case("reject-later-fragment-v4", "a later fragment: nothing to answer with",
         tcp(A, DYN4, LISTED4, 443, frag="later"), CR, "drop", "csam"),
    Case("reject-later-fragment-v6", "IPv6 later fragment",
         udp(A, DYN6, LISTED6, 4500, frag="later"), CR, "drop", "csam"),
    Case("reject-later-fragment-unknown", "later fragment from no subscriber",
         udp(A, STRANGER4, IN_PREFIX4, 4500, frag="later"), CR, "drop", "csam"),
    Case("later-fragment-drop", "drop mode, later fragment",
         tcp(A, DYN4, LISTED4, 443, frag="later"), (), "drop", "csam"),
    Case("reject-first-fragment-v4", "IPv4 first fragment with its header: answered",
         udp(A, DYN4, LISTED4, 4500, frag="first"), CR, "reject", "csam"),
    Case("reject-first-fragment-v6", "IPv6 first fragment: an extension header, dropped",
         tcp(A, DYN6, LISTED6, 443, frag="first"), CR, "drop", "csam"),
    Case("reject-ip-options", "IPv4 options: dropped", udp(A, DYN4, LISTED4, 4500,
                                                           ip_extra=True), CR, "drop", "csam"),
    Case("reject-exthdr", "IPv6 extension headers: dropped",
         tcp(A, DYN6, IN_PREFIX6, 443, ip_extra=True), CR, "drop", "csam"),
    Case("reject-unparsed-l4", "8 bytes of TCP: cannot be answered",
         tcp(A, DYN4, LISTED4, 443, l4_len=8), CR, "drop", "csam"),
    # -- the core side --
    Case("core-from-listed-off", "from a listed address: not looked up by default",
         tcp(C_, LISTED4, DYN4, 40000, sport=443), (), "pass", "ok"),
    Case("core-from-listed-off-v6", "IPv6, by default",
         tcp(C_, IN_PREFIX6, DYN6, 40000, sport=443), CR, "pass", "ok"),
    Case("core-from-listed-on", "csam_core: dropped", tcp(C_, LISTED4, DYN4, 40000, sport=443),
         CORE, "drop", "csam"),
    Case("core-from-prefix-on-v6", "csam_core, IPv6 prefix",
         tcp(C_, IN_PREFIX6, DYN6, 40000, sport=443), CORE, "drop", "csam"),
    Case("core-reject-is-drop", "no answers on the core side",
         udp(C_, LISTED6, DYN6, 40000, sport=4500), CORE + CR, "drop", "csam"),
    Case("core-to-unknown", "csam_core, destination no subscriber",
         tcp(C_, LISTED4, STRANGER4, 40000, sport=443), CORE, "drop", "csam"),
    Case("core-to-listed", "the destination is not what counts on the core side",
         tcp(C_, WEB4, DYN4, 40000, sport=443), CORE, "pass", "ok"),
    Case("core-suspended", "suspended keeps its reason", tcp(C_, LISTED4, SUSP4, 40000,
                                                             sport=80), CORE, "drop", "suspended"),
    Case("core-ip53b", "IP53B keeps its reason", udp(C_, LISTED6, DYN6, 53),
         CORE + DNS, "drop", "ip53b"),
    Case("core-on-access-unchanged", "csam_core changes nothing on the access side",
         tcp(A, DYN4, LISTED4, 80), CORE, "drop", "csam"),
]


# ---- the maps --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cmaps(dataplane) -> Iterator[kernel.Maps]:
    """The CSAM maps of the session's data plane, emptied before and after this module."""
    with kernel.Maps(dataplane.pin_dir) as m:
        wipe(m)
        try:
            yield m
        finally:
            wipe(m)


def wipe(m: kernel.Maps) -> None:
    for t in (*m.csam_hosts, *m.csam_prefixes):
        t.delete_many(t.keys())
    for g in (0, 1):
        m.meta.update(struct.pack("=I", g), bytes(layout.META.size))
        m.write_csam_v4(g, bytes(dirs.FILTER4_BYTES))
        m.write_csam_v6(g, bytes(dirs.FILTER_BYTES))
    m.set_word(0)


def put(m: kernel.Maps, gen: int, present: bool = True) -> None:
    """Write the list into generation ``gen`` (or take it out)."""
    hosts, prefixes = m.csam_hosts[gen], m.csam_prefixes[gen]
    pkeys = [layout.LPM_KEY.pack(*k) for k in LIST_PREFIXES]
    if present:
        hosts.update_many(list(LIST_HOSTS), csam.LISTED)
        prefixes.update_many(pkeys, csam.LISTED)
        v4, v6 = dirs.csam(LIST_HOSTS, LIST_PREFIXES)   # as a load writes them
        m.write_csam_v4(gen, v4)
        m.write_csam_v6(gen, v6)
    else:
        hosts.delete_many([a for a in LIST_HOSTS if hosts.lookup(a) is not None])
        prefixes.delete_many([k for k in pkeys if _has(prefixes, k)])
        m.write_csam_v4(gen, bytes(dirs.FILTER4_BYTES))
        m.write_csam_v6(gen, bytes(dirs.FILTER_BYTES))


def _has(trie, key: bytes) -> bool:
    return key in trie.keys()


@pytest.fixture
def cdp(dp, cmaps):
    """The data plane, emptied, with the CSAM maps and their hit counters emptied too."""
    for g in (0, 1):
        put(cmaps, g, present=False)
    cmaps.set_word(0)
    dp.maps.clear_hits()
    return dp


def hits(dp) -> dict[int, int]:
    """Non-zero CSAM hit counters, summed over CPUs."""
    out = {}
    for i in range(C["XZ_NR_CSAM_HITS"]):
        raw = dp.maps.hits.lookup(struct.pack("=I", i))
        n = sum(struct.unpack(f"={len(raw) // 8}Q", raw))
        if n:
            out[i] = n
    return out


def hit_slot(gen: int, family: int) -> int:
    return gen * 2 + (family == 6)


def setup(dp, m: kernel.Maps, case: Case) -> None:
    load(dp, model_tables(), flags_of(case.switches))
    put(m, case.holds)
    m.set_word(case.csam_word)


def model_view(case: Case) -> tables.Tables:
    """What the data plane can see of the list: the generation in force, the kinds on."""
    t = model_tables()
    word = case.csam_word
    if word & GEN == case.holds:
        t.csam_hosts = set(LIST_HOSTS) if word & HOSTS else set()
        t.csam_prefixes = set(LIST_PREFIXES) if word & PREFIXES else set()
    return t


def run_case(dp, hook: str, role: str, frame: bytes, verdict: str, reason: str,
             pkt: Packet, gen: int) -> bytes:
    """run_one, and one CSAM hit for (generation, family) exactly when the reason is csam."""
    out = run_one(dp, hook, role, frame, verdict, reason)
    assert hits(dp) == ({hit_slot(gen, pkt.family): 1} if reason == "csam" else {})
    return out


# ---- the table through the kernel ---------------------------------------------------------


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("encap", list(ENCAPS))
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_case(cdp, cmaps, case: Case, encap: str, hook: str):
    setup(cdp, cmaps, case)
    vlans, pppoe = ENCAPS[encap]
    frame = packets.frame(case.packet, vlans=vlans, pppoe=pppoe)
    run_case(cdp, hook, case.packet.role, frame, case.verdict, case.reason, case.packet,
             case.csam_word & GEN)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_model_agrees(case: Case):
    """The reference model, given what the data plane can see of the list, agrees."""
    d = model.decide(case.packet, flags_of(case.switches), model_view(case))
    assert (d.verdict, d.reason) == (case.verdict, case.reason)


# ---- the switch -------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", [4, 6])
def test_switch_takes_effect(cdp, cmaps, family, hook):
    """The list written into generation 1 while generation 0 is in force changes nothing;
    one write of the word puts it in force, another takes it out again."""
    load(cdp, model_tables(), flags_of(()))
    src, dst = (DYN4, LISTED4) if family == 4 else (DYN6, IN_PREFIX6)
    frame = packets.frame(tcp(A, src, dst, 443), vlans=1)
    cmaps.set_word(0 | ALL_BITS)
    put(cmaps, 1)
    for word, verdict, reason in [(0 | ALL_BITS, "pass", "ok"), (1 | ALL_BITS, "drop", "csam"),
                                  (0 | ALL_BITS, "pass", "ok")]:
        cmaps.set_word(word)
        cdp.maps.clear_counters()
        cdp.maps.clear_hits()
        run_case(cdp, hook, A, frame, verdict, reason, tcp(A, src, dst, 443), word & GEN)


@pytest.mark.parametrize("hook", HOOKS)
def test_loaded_lists_take_effect(cdp, cmaps, hook):
    """blocklist.load, as the CLI calls it: list A in force, then B, then A again."""
    load(cdp, model_tables(), flags_of(CR))
    wipe(cmaps)
    list_a = b"# A\n192.0.2.66\n198.18.0.0/15\n"
    list_b = b"# B\n2001:db8:bad::/48\n192.0.2.67\n"
    to_exact, to_prefix = tcp(A, DYN4, LISTED4, 443), udp(A, DYN4, IN_PREFIX4, 53)
    to_b6, to_b4 = ping(A, DYN6, IN_PREFIX6), tcp(A, STRANGER4, "192.0.2.67", 80)
    steps = [(list_a, {to_exact: "reject", to_prefix: "reject", to_b6: "pass", to_b4: "pass"}),
             (list_b, {to_exact: "pass", to_prefix: "pass", to_b6: "reject", to_b4: "reject"}),
             (list_a, {to_exact: "reject", to_prefix: "reject", to_b6: "pass", to_b4: "pass"})]
    for lst, expect in steps:
        res = blocklist.load(cmaps, lst)
        assert res.switched
        for pkt, verdict in expect.items():
            cdp.maps.clear_counters()
            cdp.maps.clear_hits()
            frame = packets.frame(pkt, pppoe=True)
            reason = "csam" if verdict == "reject" else ("unknown" if pkt is to_b4 else "ok")
            run_case(cdp, hook, A, frame, verdict, reason, pkt, res.generation)
    wipe(cmaps)


def test_hits_by_generation_and_family(cdp, cmaps):
    """Hits add up per generation and family, and nothing else is kept."""
    load(cdp, model_tables(), flags_of(()))
    put(cmaps, 0)
    put(cmaps, 1)
    sent = {0: [(DYN4, LISTED4), (DYN6, LISTED6), (DYN6, IN_PREFIX6)],
            1: [(DYN4, LISTED4), (STRANGER4, IN_PREFIX4), (DYN4, IN_PREFIX4), (DYN6, LISTED6)]}
    for gen, pairs in sent.items():
        cmaps.set_word(gen | ALL_BITS)
        for src, dst in pairs:
            for hook in HOOKS:
                cdp.verdict(hook, A, packets.frame(tcp(A, src, dst, 443)))
        cdp.verdict("xdp", A, packets.frame(tcp(A, DYN4, WEB4, 443)))   # not listed
    assert hits(cdp) == {0: 2, 1: 4, 2: 6, 3: 2}
    assert cdp.counters()[(A, "drop", "csam")] == 14




@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a second CPU")
def test_status_hits_count_every_cpu(cdp, cmaps):
    load(cdp, model_tables(), flags_of(()))
    put(cmaps, 1)
    cmaps.set_word(1 | ALL_BITS)
    frame = packets.frame(tcp(A, DYN4, LISTED4, 443))
    cpus = sorted(os.sched_getaffinity(0))
    try:
        for cpu in cpus[:2]:   # one hit on each of two CPUs
            os.sched_setaffinity(0, {cpu})
            assert cdp.verdict("xdp", A, frame)[0] == "drop"
    finally:
        os.sched_setaffinity(0, cpus)
    assert hits(cdp) == {2: 2}
    assert blocklist.status(cmaps)["hits"] == {"gen0_ipv4": 0, "gen0_ipv6": 0, "gen1_ipv4": 2,
                                          "gen1_ipv6": 0}
