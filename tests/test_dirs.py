"""The subscribers' IPv4 /24 directory (dirs.py, struct xz_dir) and the CSAM list's filters
and lines: what each promises holds for every address it answers for, made whole and
changed entry by entry; and the data plane, fed through the real loads (blocklist.load,
sync.apply_subscribers), agrees with plain membership on packets to random addresses in and
around the entries.

Lists live in 198.18.0.0/15 and 203.0.113.0/24; subscribers in 100.64.0.0/16 and
198.51.100.0/24.
"""

from __future__ import annotations

import ipaddress
import random
import sys
from collections.abc import Callable
from unittest import mock

import numpy as np
import packets
import pytest
from bpfcases import flags_of, load, run_one
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdpzoot import model, sync, tables
from xdpzoot.dataplane import blocklist, dirs, kernel, layout
from xdpzoot.dataplane.layout import ClassTable, Entry
from xdpzoot.model import TCP, Packet

V4 = dirs.V4MAPPED
BASES = ("198.18.0.0", "198.19.255.0", "203.0.113.0")


def addr16(ip: str) -> bytes:
    return tables.addr16(ip)


def listed(hosts: set[bytes], prefixes: set[tuple[int, bytes]], a: bytes) -> bool:
    return a in hosts or any(layout.masked(a, p) == n for p, n in prefixes)


def near(rng_or_draw, base: str, i: int) -> bytes:
    return addr16(str(ipaddress.ip_address(base) + i))


@st.composite
def lists(draw) -> tuple[set[bytes], set[tuple[int, bytes]]]:
    """A small IPv4 list: hosts and prefixes of every length around a few bases."""
    hosts, prefixes = set(), set()
    for _ in range(draw(st.integers(0, 6))):
        hosts.add(near(draw, draw(st.sampled_from(BASES)), draw(st.integers(0, 600))))
    for _ in range(draw(st.integers(0, 4))):
        n = draw(st.sampled_from((15, 20, 23, 24, 25, 28, 31)))
        a = near(draw, draw(st.sampled_from(BASES)), draw(st.integers(0, 600)))
        prefixes.add((96 + n, layout.masked(a, 96 + n)))
    return hosts, prefixes


def probes(hosts, prefixes) -> list[bytes]:
    """Addresses worth asking about: each entry, its ends and neighbours, and its /24."""
    out = []
    for a in hosts:
        n = int.from_bytes(a[12:], "big")
        out += [n, n - 1, n + 1, n ^ 0xFF]
    for p, a in prefixes:
        n, size = int.from_bytes(a[12:], "big"), 1 << (128 - p)
        out += [n, n - 1, n + size - 1, n + size, (n | 0xFF) + 1]
    return [V4 + (x & 0xFFFFFFFF).to_bytes(4, "big") for x in out]


def net_answer(t: np.ndarray, a: bytes) -> int:
    """What a table of net lines says of IPv4 address ``a``, as policy.h's xz_csam_in_line
    reads its line: 1 a prefix covers it, 0 none does, -1 ask the trie."""
    h = int.from_bytes(a[12:], "big")
    row = t[dirs.line_of(np.array([h], dtype=np.uint32), len(t), dirs.NET_BY)[0]].tolist()
    hit = any(n and (h ^ n) & -((n & -n) << 1) & 0xFFFF_FFFF == 0
              for n in row[:dirs.LINE_KEYS])
    return 1 if hit else -1 if row[dirs.LINE_KEYS] else 0


def assert_nets_answer(t: np.ndarray, hosts, prefixes, exact: bool) -> None:
    """Every probe address of the list (and its whole /24): a yes is covered by a prefix,
    a no by none (a line that overflowed may leave either to the trie); ``exact``, nothing
    is left to it."""
    for i in {dirs.slash24(a) for a in probes(hosts, prefixes)}:
        for last in range(256):
            a = V4 + ((i << 8) | last).to_bytes(4, "big")
            got = net_answer(t, a)
            assert got in ((1, -1) if listed(set(), prefixes, a) else (0, -1))
            assert got != -1 or not exact


@settings(max_examples=100, deadline=None)
@given(lst=lists(), bits=st.sampled_from([0, 2, 10]))
def test_csam_net_lines_answer_for_every_prefix(lst, bits):
    """A prefix of any length is found in the net line of each /24 it covers or lies in
    (a /15: 512 /24 words); in one line, or in a few that overflow, the rest go to the
    trie. With lines enough, none does."""
    hosts, prefixes = lst
    t = dirs.lines_of(dirs.v4_nets(prefixes), 1 << bits, dirs.NET_BY)
    assert_nets_answer(t, hosts, prefixes, exact=bits == 10)


@settings(max_examples=100, deadline=None)
@given(old=lists(), new=lists(), bits=st.sampled_from([0, 10]))
def test_csam_net_lines_changed_entry_by_entry_tell_the_truth(old, new, bits):
    """Prefixes taken away and added by difference: a /24 that two of them cover keeps its
    word while one of them stays (/15, /20, /23 and /24 around the same bases overlap)."""
    before, after = old[1], new[1]
    t = dirs.lines_of(dirs.v4_nets(before), 1 << bits, dirs.NET_BY)
    dirs.lines_remove(t, dirs.v4_nets(before - after), dirs.NET_BY)
    dirs.lines_add(t, dirs.v4_nets(after - before), dirs.NET_BY)
    assert_nets_answer(t, *new, exact=bits == 10)
    whole = dirs.lines_of(dirs.v4_nets(after), 1 << bits, dirs.NET_BY)
    assert sorted(t[t != 0].tolist()) == sorted(whole[whole != 0].tolist()) or bits == 0


@settings(max_examples=100, deadline=None)
@given(lst=lists(), more=lists())
def test_subscriber_directory_says_absent_only_what_is(lst, more):
    hosts, prefixes = lst
    d = bytearray(dirs.subscribers(hosts, prefixes)[0])
    dirs.subscriber_added(d, *more)
    u = dirs.union(bytes(d), dirs.subscribers(*lst)[0])
    for dd in (bytes(d), u):
        for h, p in (lst, more):
            for a in probes(h, p):
                state = dirs.get(dd, dirs.slash24(a))
                if a in h:
                    assert not state & dirs.NO_HOST
                if any(layout.masked(a, pl) == n for pl, n in p):
                    assert not state & dirs.NO_PREFIX


@settings(max_examples=50, deadline=None)
@given(lst=lists(), more=lists())
def test_class_index_answers_only_for_whole_uniform_slash24s(lst, more):
    """A lane that names a prefix promises, for every address of its /24 but those it
    marks as host entries (exactly the host entries there): that prefix as the longest
    match; whole /24s only."""
    hosts, prefixes = lst
    prefixes = sorted(prefixes | more[1])
    every = hosts | more[0]
    d = bytearray(dirs.subscribers(hosts, prefixes)[0])
    dirs.subscriber_added(d, more[0], [])   # hosts added since: the directory opened
    slash, lanes, owners, bits = dirs.uniform(prefixes, d, 1 << 14, lambda: every, 1 << 15)
    assert len(set(lanes.tolist())) == len(owners) and (lanes > 0).all()
    assert set(bits) <= set(slash.tolist()) and all(bits.values())
    for i, v in zip(slash.tolist(), lanes.tolist(), strict=True):
        plen, net = prefixes[owners[v - 1]]
        assert 96 + dirs.UNIFORM_MIN <= plen <= 96 + 24
        for last in [*range(0, 256, 17), *(a[15] for a in every if dirs.slash24(a) == i)]:
            a = V4 + ((i << 8) | last).to_bytes(4, "big")
            assert (a in every) == bool(bits.get(i, 0) >> last & 1)
            matches = [pl for pl, n in prefixes if layout.masked(a, pl) == n]
            assert max(matches) == plen and layout.masked(a, plen) == net
        assert not any(dirs.slash24(n) == i and pl > 96 + 24 for pl, n in prefixes)
    # every /24 a /24-or-shorter prefix covers alone (nothing longer in it) has one
    alone = {i for pl, n in prefixes if 96 + dirs.UNIFORM_MIN <= pl <= 96 + 24
             for i in range(dirs.slash24(n), dirs.slash24(n) + (1 << (120 - pl)))
             if not any(dirs.slash24(m) == i and q > 120 for q, m in prefixes)}
    assert alone == set(slash.tolist())
    # the same indexes for the same prefixes in another order (the trie's, the file's)
    again = dirs.uniform(prefixes[::-1], d, 1 << 14, lambda: every, 1 << 15)
    assert again[0].tolist() == slash.tolist() and again[1].tolist() == lanes.tolist()
    assert [prefixes[::-1][o] for o in again[2]] == [prefixes[o] for o in owners]
    # and no more indexes or /24s with hosts than asked for: the rest look up
    _, lanes1, owners1, _ = dirs.uniform(prefixes, d, 2, lambda: every, 1 << 15)
    assert len(owners1) <= 1 and set(lanes1.tolist()) <= {1}
    slash2, _, _, bits2 = dirs.uniform(prefixes, d, 1 << 14, lambda: every, 2)
    assert len(bits2) <= 1 and bits2.items() <= bits.items()
    assert set(slash2.tolist()) == set(slash.tolist()) - (set(bits) - set(bits2))


# ---- in the kernel, fed by the real loads -----------------------------------------------------


@pytest.fixture(scope="module")
def cmaps(dataplane):
    with kernel.Maps(dataplane.pin_dir) as m:
        yield m


def text_of(hosts, prefixes) -> bytes:
    lines = [str(tables.ip_of(a)) for a in hosts]
    lines += [str(tables.net_of(k)) for k in prefixes]
    random.Random(len(lines)).shuffle(lines)
    return ("\n".join(lines) + "\n").encode()


def check(dp, p: Packet, verdict: str, reason: str) -> None:
    dp.maps.clear_counters()
    run_one(dp, "xdp", p.role, packets.frame(p), verdict, reason)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(lists(), min_size=2, max_size=4))
def test_data_plane_agrees_through_full_and_changed_loads(dp, cmaps, steps):
    """Loads in a row (the first two whole, later ones by difference from the idle
    generation's text): packets to every probe address are dropped exactly when listed."""
    agree_through_loads(dp, cmaps, steps, probes, "100.64.0.5")


def agree_through_loads(dp, cmaps, steps, probe: Callable, source: str) -> None:
    """Load the lists of ``steps`` in a row, from nothing trusted (the first loads are whole
    ones); after each, packets from ``source`` to every ``probe`` address of it are dropped
    exactly when listed, and the generation in force has its IPv6 filter on."""
    dp.reset()
    for g in (0, 1):
        cmaps.meta.update(g.to_bytes(4, "little"), bytes(layout.META.size))
        for t in (cmaps.csam_hosts[g], cmaps.csam_prefixes[g]):
            t.delete_many(t.keys())
    cmaps.set_word(0)
    for hosts, prefixes in steps:
        blocklist.load(cmaps, text_of(hosts, prefixes) + b"# " + str(len(steps)).encode())
        _, word = cmaps.word()
        f = bytes(cmaps.read_csam_v6(word & dirs.C["XZ_CSAM_GEN"]))
        assert dirs.FILTER_HEAD.unpack_from(f)[0] == 1   # on: the lookups it spares are spared
        f4 = bytes(cmaps.read_csam_v4(word & dirs.C["XZ_CSAM_GEN"]))
        assert dirs.FILTER_HEAD.unpack_from(f4)[0] == 1   # so is the IPv4 /24 filter
        for a in probe(hosts, prefixes):
            p = Packet("access", source, str(tables.ip_of(a)), TCP, 40000, 443)
            check(dp, p, *(("drop", "csam") if listed(hosts, prefixes, a)
                           else ("pass", "unknown")))


def crowd(n: int, nlines: int) -> list[str]:
    """``n`` addresses of 100.64.0.0/10 (shared space) that share one line of a table of
    ``nlines`` (the one most of them share)."""
    first = int(ipaddress.ip_address("100.64.0.0"))
    ips = np.arange(first, first + (1 << 22), dtype=np.uint32)
    words = ips.astype(">u4").view(np.uint32) if sys.byteorder == "little" else ips
    li = dirs.line_of(words, nlines)
    return [str(ipaddress.ip_address(int(a))) for a in ips[li == np.bincount(li).argmax()][:n]]


def test_a_full_line_leaves_the_rest_to_the_hash(dp, cmaps):
    """Twenty listed addresses that share one line: fifteen fill its slots, the others are
    counted in its ``more`` and found in the hash; unlisted addresses of the line pass.
    0.0.0.0, which a free slot would match, is always the hash's. Through a whole load, a
    load by difference (some out of the slots, some out of ``more``, some new), and back."""
    dp.reset()
    cmaps.set_word(0)
    for g in (0, 1):   # nothing trusted: the first load is a whole one
        cmaps.meta.update(g.to_bytes(4, "little"), bytes(layout.META.size))
    # the lines a list of 17..21 IPv4 addresses uses (both lists below: 4)
    nlines = len(blocklist.used_lines(cmaps, 0, {"hosts4": 21, "nets4": 0})[0])
    assert nlines == len(blocklist.used_lines(cmaps, 0, {"hosts4": 17, "nets4": 0})[0])
    addrs = crowd(26, nlines)
    first, second = addrs[:20] + ["0.0.0.0"], addrs[3:17] + addrs[20:23]
    line = dirs.line_of(dirs.v4_words([tables.addr16(addrs[0])]), nlines)[0]
    zero_line = dirs.line_of(np.zeros(1, dtype=np.uint32), nlines)[0]
    for on in (first, second, first):
        blocklist.load(cmaps, ("\n".join(on) + "\n").encode())
        _, word = cmaps.word()
        assert word & dirs.C["XZ_CSAM_LINED"]
        t, _ = blocklist.word_lines(cmaps, word)
        assert len(t) == nlines
        used = int((t[line, :dirs.LINE_KEYS] != 0).sum())
        n = len(on) - ("0.0.0.0" in on and line != zero_line)   # (its line's more counts it)
        assert used + t[line, dirs.LINE_KEYS] == n and used >= min(n, dirs.LINE_KEYS) - 6
        for a in [*addrs, "0.0.0.0", "0.0.0.1"]:
            p = Packet("access", "100.64.0.5", a, TCP, 40000, 443)
            check(dp, p, *(("drop", "csam") if a in on else ("pass", "unknown")))


def pfx(text: str) -> tuple[int, bytes]:
    n = ipaddress.ip_network(text)
    return 96 + n.prefixlen, addr16(str(n.network_address))


def test_a_list_uses_lines_by_its_size(dp, cmaps):
    """A generation uses as many lines as its list's size asks for (one per 8 IPv4 addresses,
    a power of two), the control word says how many, and the programs look there: a list that
    grows or shrinks past a power of two has its lines made anew (the load is a whole one),
    one that stays within goes by difference. Each list's addresses drop, their neighbours
    pass."""
    dp.reset()
    cmaps.set_word(0)
    for g in (0, 1):
        cmaps.meta.update(g.to_bytes(4, "little"), bytes(layout.META.size))
    base = int(ipaddress.ip_address("100.64.0.0"))
    rng = random.Random(7)
    pool = [str(ipaddress.ip_address(base + 2 * i)) for i in rng.sample(range(1 << 20), 3100)]
    steps = [(pool[:10], 2, True), (pool[:3000], 512, True), (pool[10:3010], 512, False),
             (pool[3000:3010], 2, True), (pool[3001:3011], 2, False)]
    for on, nlines, whole in steps:
        with mock.patch.object(blocklist.csam, "parse_csam_bytes",
                               wraps=blocklist.csam.parse_csam_bytes) as parse:
            blocklist.load(cmaps, ("\n".join(on) + "\n").encode())
        assert parse.called == whole
        _, word = cmaps.word()
        lines, _ = blocklist.word_lines(cmaps, word)
        assert len(lines) == nlines
        for a in rng.sample(on, 10):
            check(dp, Packet("access", "100.64.0.5", a, TCP, 40000, 443), "drop", "csam")
            b = str(ipaddress.ip_address(a) + 1)   # an odd address: never listed
            check(dp, Packet("access", "100.64.0.5", b, TCP, 40000, 443), "pass", "unknown")


def test_prefixes_are_answered_by_their_net_line(dp, cmaps):
    """IPv4 prefixes of every length are found in their /24's net line (/25../31 as they
    are, a /23 as its two /24s): with the trie's entries taken away behind the load's back
    they still drop (and their neighbours pass); a line whose ``more`` counts prefixes that
    did not fit sends the lookups it cannot answer to the trie."""
    dp.reset()
    cmaps.set_word(0)
    for g in (0, 1):
        cmaps.meta.update(g.to_bytes(4, "little"), bytes(layout.META.size))
    nets = {pfx("198.18.7.32/27"), pfx("198.18.7.200/31"), pfx("203.0.113.128/25"),
            pfx("198.18.8.0/23")}
    blocklist.load(cmaps, text_of({addr16("198.18.7.5")}, nets))
    _, word = cmaps.word()
    gen = word & dirs.C["XZ_CSAM_GEN"]
    assert word & dirs.C["XZ_CSAM_NETS"]
    inside = ("198.18.7.32", "198.18.7.63", "198.18.7.200", "198.18.7.201", "203.0.113.255",
              "198.18.8.0", "198.18.9.255")
    outside = ("198.18.7.31", "198.18.7.64", "198.18.7.202", "203.0.113.127", "198.18.7.6",
               "198.18.10.0")
    trie = cmaps.csam_prefixes[gen]
    keys = list(trie.keys())
    trie.delete_many(keys)
    try:
        for a in (*inside, "198.18.7.5"):
            check(dp, Packet("access", "100.64.0.5", a, TCP, 40000, 443), "drop", "csam")
        for a in outside:
            check(dp, Packet("access", "100.64.0.5", a, TCP, 40000, 443), "pass", "unknown")
        # A /24 behind the load's back, in the trie only: the net line says "no" and
        # the trie is not asked, until the line is marked.
        t = cmaps.csam_lines(gen, "n")
        extra = [layout.LPM_KEY.pack(*pfx("198.18.7.0/24"))]
        trie.update_many(extra, blocklist.LISTED)
        check(dp, Packet("access", "100.64.0.5", "198.18.7.64", TCP, 40000, 443), "pass",
              "unknown")
        t[:, dirs.LINE_KEYS] += 1
        for a in ("198.18.7.64", "198.18.7.32", "198.18.9.1"):
            check(dp, Packet("access", "100.64.0.5", a, TCP, 40000, 443), "drop", "csam")
        t[:, dirs.LINE_KEYS] -= 1
        trie.delete_many(extra)
    finally:
        trie.update_many(keys, blocklist.LISTED)


def test_a_covering_prefix_taken_away_leaves_the_wider_one(dp, cmaps):
    """A /20 inside a listed /15, a /27 inside the /20: the /20's /24s have a word from
    each. A load by difference takes the /20 away: its words go, the /15's stay, and every
    address of the /20 stays listed. (A list of 2 prefixes gets 2 net lines: the /15's 512
    words mostly do not fit, and are counted in ``more``: those lookups go to the trie.)"""
    wide, mid, small = pfx("198.18.0.0/15"), pfx("198.18.16.0/20"), pfx("198.18.17.32/27")
    probe = lambda h, p: [addr16(a) for a in (  # noqa: E731
        "198.18.16.0", "198.18.17.31", "198.18.17.32", "198.18.17.64", "198.18.31.255",
        "198.20.0.0", "198.17.255.255")]
    steps = [(set(), {wide, mid, small})] * 2 + [(set(), {wide, small})] * 2
    agree_through_loads(dp, cmaps, steps, probe, "100.64.0.5")
    _, word = cmaps.word()
    _, t = blocklist.word_lines(cmaps, word)
    assert (t[:, :dirs.LINE_KEYS] != 0).sum() + t[:, dirs.LINE_KEYS].sum() == 512 + 1


def test_net_words_say_their_length_and_line():
    """A prefix's word is its network in host order with the bit under it set (a /24 and
    shorter: a /24's word for each /24 it covers); its line is its /24's, hashed as the
    programs hash it (policy.h, xz_csam_in_line). Addresses and IPv6 have none."""
    w = dirs.v4_nets([pfx("192.0.2.128/25"), pfx("192.0.2.6/31"), pfx("192.0.2.0/24"),
                      (128, addr16("192.0.2.9")), (96 + 27, bytes(16)),
                      pfx("198.51.100.0/23")])
    base, other = (int(ipaddress.ip_address(a)) for a in ("192.0.2.0", "198.51.100.0"))
    assert w.tolist() == [base | 0x80 | 0x40, base | 6 | 1, base | 0x80, other | 0x80,
                          other + 256 | 0x80]
    li = dirs.line_of(w[:3], 1 << 15, dirs.NET_BY).tolist()
    assert li == [((base >> 8) * 2654435761 % (1 << 32)) >> 17] * 3


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_data_plane_classifies_through_a_subscriber_load(dp, seed):
    """Hosts and pools loaded as `subscribers load` does: the verdict for addresses in and
    around them is the model's (OP25B on, so dynamic and static differ)."""
    rng = random.Random(seed)
    hosts, prefixes = ClassTable(), ClassTable()
    t = tables.Tables()
    for i in range(rng.randint(0, 5)):
        a = addr16(f"100.64.{rng.choice((0, 1, 7))}.{rng.randint(0, 255)}")
        e = Entry(1000 + i, rng.choice((1, 2)))
        t.hosts[a] = e
    for i in range(rng.randint(0, 4)):
        n = rng.choice((16, 22, 24, 28, 30))
        a = addr16(f"100.64.{rng.choice((0, 1, 7))}.{rng.randint(0, 255)}")
        t.prefixes[(96 + n, layout.masked(a, 96 + n))] = Entry(2000 + i, rng.choice((1, 2)))
    for a, e in t.hosts.items():
        hosts.append(a, e)
    for k, e in t.prefixes.items():
        prefixes.append(layout.LPM_KEY.pack(*k), e)
    dp.reset()
    load(dp, tables.Tables(), flags_of(("op25b",)))   # switches only
    sync.apply_subscribers(dp.maps, hosts, prefixes)
    # the class index the load set from its plan is the one the maps read back give
    m = dp.maps
    index = (bytes(m.lanes), m.uniform_map.values(), m.hosted_map.values())
    m.sync_uniform()
    assert (bytes(m.lanes), m.uniform_map.values(), m.hosted_map.values()) == index
    t = tables.Tables(hosts=dict(dp.maps.host_items()),
                      prefixes=dict(dp.maps.prefix_items()))
    for a in probes(set(t.hosts), set(t.prefixes)):
        p = Packet("access", str(tables.ip_of(a)), "203.0.113.9", TCP, 40000, 25)
        want = model.decide(p, flags_of(("op25b",)), t)
        check(dp, p, want.verdict, want.reason)


def test_host_entries_keep_their_slash24_on_the_index(dp):
    """A host entry in a pool's /24 (a static host, a session) marks its own address only:
    the /24 keeps the pool's class for the others, through one entry that a sync keeps
    and, once the host is gone, gives up; the verdicts are the host's and the pool's
    throughout."""
    pool, host = addr16("100.64.4.0"), addr16("100.64.5.7")
    dp.reset()
    load(dp, tables.Tables(), flags_of(("op25b",)))
    prefixes = ClassTable()
    prefixes.append(layout.LPM_KEY.pack(96 + 22, pool), Entry(1, 1))   # a dynamic /22
    sync.apply_subscribers(dp.maps, ClassTable(), prefixes)
    m, lane_at = dp.maps, (100 << 16 | 64 << 8 | 5)

    def lane() -> int:
        row = m.idx_map.lookup(layout.U32.pack(lane_at // dirs.LANES))
        return layout.IDX_LANE.unpack_from(row, lane_at % dirs.LANES * 2)[0]

    def verdicts(static_host: bool) -> None:
        for ip, static in (("100.64.5.7", static_host), ("100.64.5.8", False),
                           ("100.64.5.6", False), ("100.64.4.7", False)):
            p = Packet("access", ip, "203.0.113.9", TCP, 40000, 25)
            check(dp, p, "pass" if static else "drop", "ok" if static else "op25b")

    assert 0 < lane() < kernel.HOSTED_LANE
    verdicts(False)
    m.set_host(host, Entry(7, 2))   # static: may send to :25
    n = lane() & ~kernel.HOSTED_LANE
    assert lane() & kernel.HOSTED_LANE and m.hosted_in_use() == n == 1
    verdicts(True)
    m.sync_uniform()
    assert lane() == kernel.HOSTED_LANE | n
    verdicts(True)
    m.del_host(host)   # the mark stays (looked up: the pool's class) until a sync
    assert kernel._unhosted(m.hosted_map.lookup(layout.U32.pack(n)))[0] == 1 << 7
    verdicts(False)
    m.sync_uniform()   # no host left: the plain lane again
    assert 0 < lane() < kernel.HOSTED_LANE
    verdicts(False)


def test_ipv6_host_entries_go_through_the_filter(dp):
    """An IPv6 host entry in a pool (a session's address): its /64's bit is set before it is
    written, so it answers at once, and the pool's other /64s skip the host hash; a whole
    load makes the filter exact (a deleted entry's bit cleared). An entry written behind the
    filter's back is not seen while the filter is on (it is what answers), and is with it
    off."""
    host_ip, other_ip = "2001:db8:4:0:1::7", "2001:db8:4:9::7"
    host, m = addr16(host_ip), dp.maps
    dp.reset()
    load(dp, tables.Tables(), flags_of(("op25b", "op25b_v6")))
    prefixes = ClassTable()
    prefixes.append(layout.LPM_KEY.pack(56, addr16("2001:db8:4::")), Entry(1, 1))
    sync.apply_subscribers(m, ClassTable(), prefixes)   # a dynamic /56, then a sync

    def verdict(ip: str, static: bool) -> None:
        p = Packet("access", ip, "2001:db8:ffff::9", TCP, 40000, 25)
        check(dp, p, "pass" if static else "drop", "ok" if static else "op25b")

    def bit() -> int:
        h = dirs.sub_v6_bit(host)
        return m.sub_v6_words[dirs.FILTER_HEAD_WORDS + (h >> 6)] >> (h & 63) & 1

    def on() -> int:
        return dirs.FILTER_HEAD.unpack_from(m.sub_v6_map.lookup_into(layout.ZERO_KEY))[0]

    assert on() == 1 and not bit()
    verdict(host_ip, False)
    m.set_host(host, Entry(7, 2))   # static: may send to :25
    assert bit()
    verdict(host_ip, True)
    verdict(other_ip, False)
    m.del_host(host)
    m.sync_uniform()
    assert bit()   # until a whole load
    sync.apply_subscribers(m, ClassTable(), prefixes)
    assert on() == 1 and not bit()
    m.host_map.update(host, layout.pack_class(Entry(7, 2)))   # behind the filter's back
    verdict(host_ip, False)
    m.sub_v6_words[0] = 0   # on (and plen) 0: off, every address looked up
    verdict(host_ip, True)
    dp.reset()


def _flip(e: Entry) -> Entry:
    """The other type: OP25B then stops or starts applying."""
    return e._replace(type=3 - e.type)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_class_index_follows_changes_entry_by_entry(dp, seed):
    """After a subscriber load has set the class index, entries written one at a time
    (hosts into a pool's /24, longer and shorter prefixes, a prefix's new class, deletes,
    as suspend, sessions and rates write them) are seen at once, and a sync restores the
    index: the verdict for addresses in and around them is always the model's."""
    rng = random.Random(seed)
    nets = ("100.64.0", "100.64.1", "100.64.3", "100.64.7")
    hosts, prefixes = ClassTable(), ClassTable()
    for i, n in enumerate(rng.sample((16, 22, 22, 24, 24), rng.randint(1, 4))):
        a = addr16(f"{rng.choice(nets)}.{rng.randint(0, 255)}")
        prefixes.append(layout.LPM_KEY.pack(96 + n, layout.masked(a, 96 + n)),
                        Entry(2000 + i, rng.choice((1, 2))))
    dp.reset()
    load(dp, tables.Tables(), flags_of(("op25b",)))   # switches only
    sync.apply_subscribers(dp.maps, hosts, prefixes)
    m = dp.maps
    assert any(r for r in map(m.idx_map.lookup, map(layout.U32.pack, range(
        (100 << 13) + (64 << 5), (100 << 13) + (65 << 5)))) if r != bytes(16))
    for step in range(5):
        t = tables.Tables(hosts=dict(m.host_items()), prefixes=dict(m.prefix_items()))
        op = rng.choice(("host", "host", "prefix", "retype", "del_prefix", "del_host", "sync"))
        a = addr16(f"{rng.choice(nets)}.{rng.randint(0, 255)}")
        if op == "host":
            m.set_host(a, Entry(3000 + step, rng.choice((1, 2))))
        elif op == "prefix":
            n = rng.choice((20, 23, 24, 26, 30))
            m.set_prefix((96 + n, layout.masked(a, 96 + n)), Entry(4000 + step, 1))
        elif op == "retype" and t.prefixes:
            k, e = rng.choice(sorted(t.prefixes.items()))
            m.put_class(m.prefix_map, layout.LPM_KEY.pack(*k), _flip(e))
        elif op == "del_prefix" and t.prefixes:
            m.del_prefix(rng.choice(sorted(t.prefixes)))
        elif op == "del_host" and t.hosts:
            m.del_host(rng.choice(sorted(t.hosts)))
        elif op == "sync":
            m.sync_uniform()
        t = tables.Tables(hosts=dict(m.host_items()), prefixes=dict(m.prefix_items()))
        for p_ in probes(set(t.hosts), set(t.prefixes)):
            p = Packet("access", str(tables.ip_of(p_)), "203.0.113.9", TCP, 40000, 25)
            want = model.decide(p, flags_of(("op25b",)), t)
            check(dp, p, want.verdict, want.reason)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_ipv6_prefixes_are_looked_up_by_length(dp, seed):
    """IPv6 prefixes are answered from their hash, a probe per length present, longest
    first: after a load and after entries written one at a time (prefixes of new lengths,
    more lengths than the program probes, a prefix's new class, deletes, sessions' adds
    and removes, syncs), the verdict for addresses in and around them is the model's."""
    rng = random.Random(seed)
    base = int.from_bytes(addr16("2001:db8:4::"), "big")

    def prefix(n: int) -> tuple[int, bytes]:
        a = (base + (rng.randrange(4) << 72) + (rng.randrange(4) << 64)
             + rng.getrandbits(64)).to_bytes(16, "big")
        return n, layout.masked(a, n)

    lengths = (36, 44, 48, 52, 56, 60, 62, 64, 80, 96, 112, 127)
    prefixes = ClassTable()
    for i, n in enumerate(rng.sample(lengths[:8], rng.randint(1, 4))):
        prefixes.append(layout.LPM_KEY.pack(*prefix(n)), Entry(2000 + i, rng.choice((1, 2))))
    dp.reset()
    load(dp, tables.Tables(), flags_of(("op25b", "op25b_v6")))
    m = dp.maps
    sync.apply_subscribers(m, ClassTable(), prefixes)
    assert m.v6_lens_map.lookup(layout.ZERO_KEY)[0] != 0   # the hash answers
    for step in range(6):
        t = tables.Tables(hosts=dict(m.host_items()), prefixes=dict(m.prefix_items()))
        op = rng.choice(("prefix", "prefix", "session", "retype", "del_prefix", "unsession",
                         "sync"))
        if op == "prefix":
            m.set_prefix(prefix(rng.choice(lengths)), Entry(4000 + step, rng.choice((1, 2))))
        elif op == "session":
            m.add_new(m.prefix_map, layout.LPM_KEY.pack(*prefix(rng.choice(lengths))),
                      Entry(5000 + step, 2))
        elif op == "retype" and t.prefixes:
            k, e = rng.choice(sorted(t.prefixes.items()))
            m.put_class(m.prefix_map, layout.LPM_KEY.pack(*k), _flip(e))
        elif op == "del_prefix" and t.prefixes:
            m.del_prefix(rng.choice(sorted(t.prefixes)))
        elif op == "unsession" and t.prefixes:
            m.delete_if_there(m.prefix_map, layout.LPM_KEY.pack(*rng.choice(sorted(t.prefixes))))
        elif op == "sync":
            m.sync_uniform()
        t = tables.Tables(hosts=dict(m.host_items()), prefixes=dict(m.prefix_items()))
        six = {k: m.get_class(m.prefix_map, layout.LPM_KEY.pack(*k)) for k in t.prefixes}
        assert {layout.LPM_KEY.unpack(k): layout.CLASS.unpack(v)
                for k, v in zip(*_items(m.prefix6_map), strict=True)} == {
            k: layout.CLASS.unpack(layout.pack_class(e)) for k, e in six.items()}
        for a in probes6(set(), set(t.prefixes)):
            p = Packet("access", str(ipaddress.ip_address(a)), "2001:db8:ffff::9", TCP,
                       40000, 25)
            want = model.decide(p, flags_of(("op25b", "op25b_v6")), t)
            check(dp, p, want.verdict, want.reason)
    dp.reset()


def test_ipv6_prefix_keys_are_masked_alike_one_by_one_and_at_once():
    """A load's keys (numpy) and a session's (one by one) give xz_prefixes6 the same keys:
    the IPv6 ones, each address masked to its length; IPv4 keys left out."""
    rng = random.Random(7)
    keys = [layout.LPM_KEY.pack(n, rng.getrandbits(128).to_bytes(16, "big"))
            for n in (0, 1, 7, 8, 56, 63, 64, 65, 127, 128) * 20]
    keys += [layout.LPM_KEY.pack(96 + n, dirs.V4MAPPED + rng.getrandbits(32).to_bytes(4, "big"))
             for n in (0, 8, 24, 32)]
    rng.shuffle(keys)
    at_once = dirs.v6_prefix_keys(keys)
    assert len(keys) > 64 and len(at_once) == 200
    assert at_once == [(i, k) for j in range(0, len(keys), 50)
                       for i, k in ((j + i, k) for i, k in dirs.v6_prefix_keys(keys[j:j + 50]))]
    for i, k in at_once:
        n, a = layout.LPM_KEY.unpack(keys[i])
        assert k == layout.LPM_KEY.pack(n, layout.masked(a, n))


def _items(m) -> tuple[list[bytes], list[bytes]]:
    keys, values = m.items()
    n = m.value_size
    return keys, [values[i * n:(i + 1) * n] for i in range(len(keys))]


def test_ipv6_prefix_hash_is_what_answers(dp):
    """With lengths in xz_sub_v6_lens the hash answers for IPv6 (a prefix written to the
    trie alone is not seen), more lengths than it holds switch it off (the trie answers,
    and a sync keeps it off), and a sync with fewer switches it on again. An IPv4-mapped
    address in an IPv6 header is classed by the IPv4 entries."""
    m = dp.maps
    dp.reset()
    load(dp, tables.Tables(), flags_of(("op25b", "op25b_v6")))
    pool = (56, addr16("2001:db8:4::"))
    m.set_prefix(pool, Entry(1, 1))   # dynamic: OP25B applies

    def verdict(want: str) -> None:
        p = Packet("access", "2001:db8:4:0:1::7", "2001:db8:ffff::9", TCP, 40000, 25)
        check(dp, p, want, "op25b" if want == "drop" else "ok")

    def lens() -> bytes:
        return m.v6_lens_map.lookup(layout.ZERO_KEY)

    assert lens() == bytes([56]) + bytes(dirs.V6_LENS - 1)
    verdict("drop")
    m.prefix_map.update(layout.LPM_KEY.pack(*pool), layout.pack_class(Entry(1, 2)))
    verdict("drop")   # the hash's class, not the trie's
    m.sync_uniform()
    verdict("pass")   # the hash made exact from the trie
    for i in range(dirs.V6_LENS):   # one length more than it holds
        n = 64 + i
        m.set_prefix((n, layout.masked(addr16(f"2001:db8:5:{i}::"), n)), Entry(10 + i, 1))
    assert lens() == dirs.LENS_FULL
    m.sync_uniform()
    assert lens() == dirs.LENS_FULL
    verdict("pass")   # the trie answers
    m.prefix_map.update(layout.LPM_KEY.pack(*pool), layout.pack_class(Entry(1, 1)))
    verdict("drop")   # ... it does
    for i in range(2):
        n = 64 + i
        m.del_prefix((n, layout.masked(addr16(f"2001:db8:5:{i}::"), n)))
    m.sync_uniform()
    assert lens() == dirs.lens_word([56, *range(66, 64 + dirs.V6_LENS)])
    verdict("drop")
    # an IPv4-mapped address in an IPv6 header: its IPv4 entries, as the model has it
    m.set_prefix((96 + 24, addr16("100.64.9.0")), Entry(2, 1))
    t = tables.Tables(hosts={}, prefixes=dict(m.prefix_items()))
    p = Packet("access", "::ffff:100.64.9.7", "2001:db8:ffff::9", TCP, 40000, 25)
    want = model.decide(p, flags_of(("op25b", "op25b_v6")), t)
    assert (want.verdict, want.reason) == ("drop", "op25b")
    check(dp, p, want.verdict, want.reason)
    dp.reset()


# ---- the CSAM list's IPv4 addresses in lines ------------------------------------------------


def line_holds(t: np.ndarray, words: set[int]) -> None:
    """``t`` holds exactly ``words``: each in a slot of its line or counted in its ``more``,
    nothing else in a slot, and each line's ``more`` the count of the others."""
    want = np.zeros(len(t), dtype=np.int64)
    for w in words:
        want[dirs.line_of(np.array([w], dtype=np.uint32), len(t))[0]] += 1
    slots = t[:, :dirs.LINE_KEYS]
    held = {int(w) for w in slots[slots != 0]}
    assert held <= words and 0 not in held
    assert len(held) == int((slots != 0).sum())   # no address twice
    for w in held:
        assert w in slots[dirs.line_of(np.array([w], dtype=np.uint32), len(t))[0]]
    assert ((slots != 0).sum(axis=1) + t[:, dirs.LINE_KEYS] == want).all()


# A few lines (4 or 8) and words that crowd them, 0 (0.0.0.0) among them.
@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([2, 3]),
       steps=st.lists(st.tuples(st.booleans(), st.sets(st.integers(0, 200), max_size=40)),
                      max_size=6))
def test_lines_hold_the_list_and_keep_what_stays(bits, steps):
    """Any run of additions and removals leaves every address in its line or counted in
    its ``more``, and never moves an address that stays (a program reading the line while
    it is written finds it)."""
    t = np.zeros((1 << bits, dirs.LINE_WORDS), dtype=np.uint32)
    have: set[int] = set()
    for add, ws in steps:
        ws = {w * 0x01010101 % (1 << 32) for w in ws}   # spread over the bytes, 0 kept
        before = t.copy()
        if add:
            dirs.lines_add(t, np.array(sorted(ws - have), dtype=np.uint32))
            have |= ws
        else:
            dirs.lines_remove(t, np.array(sorted(ws & have), dtype=np.uint32))
            have -= ws
        line_holds(t, have)
        kept = (before[:, :dirs.LINE_KEYS] != 0) & np.isin(before[:, :dirs.LINE_KEYS],
                                                          np.array(sorted(have), np.uint32))
        assert (t[:, :dirs.LINE_KEYS][kept] == before[:, :dirs.LINE_KEYS][kept]).all()
    line_holds(dirs.lines_of(np.array(sorted(have), dtype=np.uint32), len(t)), have)


def test_line_of_is_the_programs_hash():
    """The line is the top bits of the word times XZ_CSAM_HASH mod 2^32, as policy.h has it;
    the word is the address's four bytes as the CPU loads them."""
    words = dirs.v4_words([V4 + bytes([192, 0, 2, 66]), bytes(15) + b"\x01"])
    assert words.tolist() == [int.from_bytes(bytes([192, 0, 2, 66]), sys.byteorder)]
    w = int(words[0])
    assert dirs.line_of(words, 1 << 17).tolist() == [(w * 2654435761 % (1 << 32)) >> 15]


# ---- the CSAM list's IPv4 /24 filter (struct xz_filter) ------------------------------------


def v4_filter_passes(f: bytes, i: int) -> bool:
    """Whether the IPv4 filter lets /24 number ``i`` be looked up in the lines."""
    on = dirs.FILTER_HEAD.unpack_from(f)[0]
    h = dirs.filter4_bit(f, i)
    o = dirs.FILTER_HEAD.size + 8 * (h >> 6)
    word = int.from_bytes(f[o:o + 8], sys.byteorder)   # f[o:][:8] copied the rest of f a call
    return not on or bool(word >> (h & 63) & 1)


def touched(hosts, prefixes) -> set[int]:
    """The /24s an IPv4 list's entries lie in or cover."""
    out = {dirs.slash24(a) for a in hosts} - {None}
    for p, a in prefixes:
        s = dirs.span(p, a)
        out |= set(range(s[0], s[0] + s[1])) if s else set()
    return out


@settings(max_examples=100, deadline=None)
@given(lst=lists(), more=lists())
def test_csam_v4_filter_passes_every_slash24_an_entry_touches(lst, more):
    """Made whole, and with entries added (csam_v4_add, a load by difference): a bit for
    every /24 an entry lies in or covers, and a clear bit for most others."""
    hosts, prefixes = lst
    f, _ = dirs.csam(hosts, prefixes)
    assert len(f) == dirs.FILTER4_BYTES
    assert dirs.FILTER_HEAD.unpack_from(f) == (1, *dirs.HASHED)
    for a in probes(hosts, prefixes):
        if listed(hosts, prefixes, a):
            assert v4_filter_passes(f, dirs.slash24(a))
    assert all(v4_filter_passes(f, i) for i in touched(hosts, prefixes))
    nothing = set(range(0, 1 << 24, 4099)) - touched(hosts, prefixes)
    assert sum(v4_filter_passes(f, i) for i in nothing) <= len(nothing) // 4
    f = bytearray(f)
    assert dirs.csam_v4_add(f, [(128, a) for a in more[0]] + sorted(more[1]))
    added = bytes(f)   # once, not a copy of the 2 MiB for each /24
    assert all(v4_filter_passes(added, i) for i in touched(hosts | more[0], prefixes | more[1]))


def test_csam_v4_filter_is_exact_where_hashed_it_would_spare_little():
    """Exact (a bit per /24) for a list that touches more /24s than the hash has bits (a
    /3 covers 2^21), made whole; hashed below. A hashed one that additions would take
    past that says so and stays as it was (the load makes it anew); an exact one takes
    them; one that is off stays off. An IPv6 list sets no bit of it."""
    exact = dirs.csam(set(), {pfx("32.0.0.0/3")})[0]
    assert dirs.FILTER_HEAD.unpack_from(exact) == (1, *dirs.EXACT)
    slash = dirs.slash24(addr16("32.0.0.0"))
    assert all(v4_filter_passes(exact, i) for i in (slash, slash + (1 << 21) - 1))
    assert not any(v4_filter_passes(exact, i) for i in (slash - 1, slash + (1 << 21)))
    assert dirs.filter_fill(exact) == 1 / 8 and dirs.filter_bits(exact) == 2**24
    f = bytearray(dirs.csam(set(), {pfx("32.0.0.0/5")})[0])   # 2^19 /24s: hashed
    assert dirs.FILTER_HEAD.unpack_from(f)[1:] == dirs.HASHED and dirs.filter_bits(f) == 2**20
    before = bytes(f)
    assert not dirs.csam_v4_add(f, [pfx("64.0.0.0/3")])   # 2^21 /24s by difference
    assert not dirs.csam_v4_add(f, [pfx("64.0.0.0/5"), pfx("96.0.0.0/6")])   # too full
    assert f == before
    assert dirs.csam_v4_add(exact := bytearray(exact), [pfx("192.0.2.0/24")])
    assert v4_filter_passes(exact, dirs.slash24(addr16("192.0.2.0")))
    assert not v4_filter_passes(exact, dirs.slash24(addr16("192.0.3.0")))
    assert dirs.csam_v4_add(off := bytearray(dirs.FILTER4_BYTES), [pfx("192.0.2.0/24")])
    assert off == bytes(dirs.FILTER4_BYTES)   # off stays off
    assert dirs.filter_bits(off) is None and dirs.filter_fill(off) is None
    f6 = dirs.csam({bytes(15) + b"\1"}, {(48, bytes(16))})[0]
    assert dirs.filter_fill(f6) == 0


def test_a_load_by_difference_makes_the_ipv4_filter_exact_when_it_must(dp, cmaps,
                                                                       monkeypatch):
    """A hashed filter that a load by difference would fill is made anew from what the
    generation holds: exact, with the bits of every entry, old and new."""
    dp.reset()
    cmaps.set_word(0)
    text = b"192.0.2.7\n32.0.0.0/5\n40.0.0.0/6\n"   # net words enough for all net lines
    for n in (1, 2):   # both generations hold it: the next load is by difference
        blocklist.load(cmaps, text + b"# %d\n" % n)
    added = []
    monkeypatch.setattr(dirs, "csam_v4_add", lambda f, new, add=dirs.csam_v4_add:
                        added.append(add(f, new)) or added[-1])
    blocklist.load(cmaps, text + b"64.0.0.0/3\n")
    assert added and not any(added)   # by difference, and the filter could not follow
    _, word = cmaps.word()
    f = bytes(cmaps.read_csam_v4(word & dirs.C["XZ_CSAM_GEN"]))
    assert dirs.FILTER_HEAD.unpack_from(f) == (1, *dirs.EXACT)
    for a in ("192.0.2.7", "32.0.0.0", "43.255.255.0", "64.0.0.0", "95.255.255.0"):
        assert v4_filter_passes(f, dirs.slash24(addr16(a)))
    for a in ("192.0.3.7", "31.255.255.0", "44.0.0.0", "96.0.0.0"):
        assert not v4_filter_passes(f, dirs.slash24(addr16(a)))
    dp.reset()


@pytest.mark.parametrize("kind", ["hashed", "exact"])
def test_the_ipv4_filter_answers_before_the_lines(dp, cmaps, kind):
    """An address in the hash but not in the filter (written behind the load's back)
    passes: the filter answered. With its bit set, as a load sets it, the address is found;
    so it is with the filter off. Hashed (a small list's) and exact (a large one's)."""
    dp.reset()
    cmaps.set_word(0)
    blocklist.load(cmaps, b"203.0.113.7\n")
    _, word = cmaps.word()
    gen = word & dirs.C["XZ_CSAM_GEN"]
    other = addr16("198.51.100.99")
    i = dirs.slash24(other)
    if kind == "exact":
        mine = dirs.slash24(addr16("203.0.113.7"))
        cmaps.write_csam_v4(gen, dirs.filter4(np.array([mine]), dirs.EXACT))
        check(dp, Packet("access", "100.64.0.5", "203.0.113.7", TCP, 40000, 443),
              "drop", "csam")
    f = cmaps.read_csam_v4(gen)
    assert dirs.FILTER_HEAD.unpack_from(f)[1:] == (dirs.EXACT if kind == "exact" else dirs.HASHED)
    assert v4_filter_passes(bytes(f), dirs.slash24(addr16("203.0.113.7")))
    assert not v4_filter_passes(bytes(f), i)
    cmaps.csam_hosts[gen].update(other, b"\x01")
    cmaps.set_word(word & ~dirs.C["XZ_CSAM_LINED"])   # the hash, not the lines, holds it
    p = Packet("access", "100.64.0.5", "198.51.100.99", TCP, 40000, 443)
    check(dp, p, "pass", "unknown")
    dirs.csam_v4_add(f, [(128, other)])
    cmaps.write_csam_v4(gen, f)
    assert v4_filter_passes(bytes(cmaps.read_csam_v4(gen)), i)
    check(dp, p, "drop", "csam")
    cmaps.write_csam_v4(gen, bytes(dirs.FILTER4_BYTES))
    check(dp, p, "drop", "csam")
    dp.reset()


# ---- the CSAM list's IPv6 filter (struct xz_filter) -------------------------------------

BASES6 = ("2001:db8::", "2001:db8:ff00::", "2001:db8:1:2::")
SOURCE6 = "2001:db8:eeee::5"   # the packets' source: no subscriber


def near6(base: str, i: int) -> bytes:
    return addr16(str(ipaddress.ip_address(base) + i))


@st.composite
def lists6(draw) -> tuple[set[bytes], set[tuple[int, bytes]]]:
    """A small IPv6 list: hosts and prefixes from /32 to /127 around a few bases."""
    hosts, prefixes = set(), set()
    for _ in range(draw(st.integers(0, 5))):
        hosts.add(near6(draw(st.sampled_from(BASES6)), draw(st.integers(0, 1 << 72))))
    for _ in range(draw(st.integers(0, 3))):
        n = draw(st.sampled_from((32, 40, 48, 56, 63, 64, 65, 96, 127)))
        a = near6(draw(st.sampled_from(BASES6)), draw(st.integers(0, 1 << 72)))
        prefixes.add((n, layout.masked(a, n)))
    return hosts, prefixes


def probes6(hosts, prefixes) -> list[bytes]:
    """Each entry, its ends and neighbours, another host of its /64, the next /64."""
    out = []
    for a in hosts:
        n = int.from_bytes(a, "big")
        out += [n, n - 1, n + 1, n ^ 0xFFFF, n + (1 << 64)]
    for p, a in prefixes:
        n, size = int.from_bytes(a, "big"), 1 << (128 - p)
        out += [n, n - 1, n + size - 1, n + size, n + (1 << 64)]
    return [(x % (1 << 128)).to_bytes(16, "big") for x in out]


def filter_passes(f: bytes, a: bytes) -> bool:
    """Whether the filter lets the lookups of ``a`` happen (a set bit, or off)."""
    on, _, mask = dirs.FILTER_HEAD.unpack_from(f)
    h = dirs.v6_bit(a, mask)
    o = dirs.FILTER_HEAD.size + 8 * (h >> 6)
    word = int.from_bytes(f[o:o + 8], sys.byteorder)   # f[o:][:8] copied the rest of f a call
    return not on or bool(word >> (h & 63) & 1)


@settings(max_examples=100, deadline=None)
@given(lst=lists6(), v4=lists())
def test_csam_v6_filter_passes_every_listed_address(lst, v4):
    hosts, prefixes = lst
    _, f = dirs.csam(hosts | v4[0], prefixes | v4[1])   # IPv4 entries play no part
    assert len(f) == dirs.FILTER_BYTES
    on, plen, _ = dirs.FILTER_HEAD.unpack_from(f)
    assert (on, plen) == (1, min([64, *(p for p, _ in prefixes)]))
    assert f == dirs.csam(hosts, prefixes)[1]
    for a in probes6(hosts, prefixes):
        if listed(hosts, prefixes, a):
            assert filter_passes(f, a)
    # a filter of zeros is off: everything is looked up
    assert filter_passes(bytes(dirs.FILTER_BYTES), near6(BASES6[0], 1))


@settings(max_examples=100, deadline=None)
@given(old=lists6(), new=lists6())
def test_csam_v6_filter_follows_additions_or_says_it_cannot(old, new):
    f = bytearray(dirs.csam(*old)[1])
    before = bytes(f)
    added = {(128, a) for a in new[0]} | new[1]
    shortest = min([64, *(p for p, _ in new[1])])
    holds = old[0] or old[1]
    if dirs.csam_v6_add(f, added):
        assert not (holds and shortest < dirs.FILTER_HEAD.unpack_from(before)[1])
        hosts, prefixes = old[0] | new[0], old[1] | new[1]
        for a in probes6(hosts, prefixes):
            if listed(hosts, prefixes, a):
                assert filter_passes(bytes(f), a)
    else:
        assert holds and bytes(f) == before
    assert not dirs.csam_v6_add(bytearray(dirs.FILTER_BYTES), added)   # off stays off


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(lists6(), min_size=2, max_size=4))
def test_data_plane_agrees_through_full_and_changed_ipv6_loads(dp, cmaps, steps):
    """The IPv6 filter through loads in a row (whole, then by difference, where an entry
    shorter than all before makes it anew): a packet is dropped exactly when listed."""
    agree_through_loads(dp, cmaps, steps, probes6, SOURCE6)


def test_the_ipv6_filter_answers_for_what_it_does_not_hold(dp, cmaps):
    """An address the hash holds but the filter does not (written behind the load's back)
    passes: the filter answered, no lookup was made. With the filter off, it is found."""
    dp.reset()
    cmaps.set_word(0)
    listed6, other = addr16("2001:db8:ff00::66"), addr16("2001:db8:1:2::99")
    blocklist.load(cmaps, b"2001:db8:ff00::66\n")
    _, word = cmaps.word()
    gen = word & dirs.C["XZ_CSAM_GEN"]
    f = bytes(cmaps.read_csam_v6(gen))
    assert filter_passes(f, listed6) and not filter_passes(f, other)
    cmaps.csam_hosts[gen].update(other, b"\x01")
    p = Packet("access", SOURCE6, "2001:db8:1:2::99", TCP, 40000, 443)
    check(dp, p, "pass", "unknown")
    cmaps.write_csam_v6(gen, bytes(dirs.FILTER_BYTES))
    check(dp, p, "drop", "csam")
    dp.reset()
