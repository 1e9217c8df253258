"""List loading benchmark: the CSAM list and the subscriber file at 1M entries, loaded
by the real CLI, next to `ipset restore` and `nft -f` of the same entries, in one run.

Figures (each tool timed as a whole process, wall clock, run in a network namespace of
our own, one after another on the same machine):

* full load of a 1,000,000-entry CSAM list (seeded: ~90% /32 and /128 hosts, ~10%
  prefixes, ~15% IPv6; no duplicates and no overlaps, so that the very same entries go
  to all three tools): ``xdpzoot blocklist load`` into fresh maps, against
  ``ipset -exist restore`` into two ``hash:net`` sets and ``nft -f`` of a table with two
  interval sets; goal: xdpzoot / ipset <= 1.0;
* the same for a 1,000,000-row subscriber file (``xdpzoot subscribers load``);
* a 1,000-entry change to the loaded list (the whole CLI command): loads A, A', A'', A'''
  each differing from the previous by 1,000 replaced entries; a load brings both
  generations to its list (the idle one, then, after the switch, the other), so from the
  second load (A') on a load writes the difference to the list in force (found from its
  text, kept in the kernel); goal: the second load and the last one under 0.5 s;
* per packet, BPF_PROG_TEST_RUN of the upstream pipeline (a static subscriber's TCP :443)
  with 1k and with 1M list entries in force: destination not listed, one just outside a
  listed prefix, a listed host (drop), an address in a listed prefix (drop); both lists
  are held in the two generations of one compiled instance and the control word switches
  between them, so both sizes are timed round-robin in the same runs; goal: 1M within
  1.5x of 1k;
* kernel memory (fdinfo memlock) of the CSAM maps at 1M (with the text of both
  generations' lists), and of the subscriber maps;
* parsing the 1,000,000-row subscriber file (``sources.read_columns``, where `subscribers
  load` and the RADIUS listener's user table begin), each run timed in a fresh process,
  round-robin: as it is, and with a ``user`` column (a user on every row but the pools',
  which may have none); goal: with users within 1.5x of without. ``--tree PATH`` times
  another checkout's parser in the same rounds (before a change); ``--only parse``
  runs this part alone, without root.

Where the time goes: the full loads and a further change are run again step by step in
this process (parse, tables, map reads, writes, each timed), and one more change as the
CLI under ``python -m cProfile``.

Usage: bench_lists.py [--json] [--entries N] [--rows N] [--seed N] [--runs N]
                      [--repeat N] [--cold N] [--no-profile] [--only PART]
                      [--parse-runs N] [--tree PATH]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ipaddress
import json
import os
import platform
import pstats
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # packets.py: frames from model.Packet
sys.path.insert(0, str(ROOT / "src"))

from xdpzoot import sync, tables  # noqa: E402
from xdpzoot.config import csam_net_bits  # noqa: E402
from xdpzoot.dataplane import blocklist, kernel, schema  # noqa: E402
from xdpzoot.dataplane.instance import Instance  # noqa: E402
from xdpzoot.dataplane.layout import Entry  # noqa: E402
from xdpzoot.model import TCP, Packet  # noqa: E402
from xdpzoot.sources import csam  # noqa: E402
from xdpzoot.sources.files import paused_gc  # noqa: E402
from xdpzoot.sources.subscribers import read_columns  # noqa: E402

ENTRIES = 1_000_000
ROWS = 1_000_000
CHANGE = 1_000
CHANGE_PREFIXES = 100           # of the 1,000 replaced entries, this many are prefixes
CHANGE_STEPS = 3                # A', A'', A''': the last one is the figure
SMALL = 1_000                   # the small list of the per-packet comparison
LIMITS = {"hosts": 1_100_000, "prefixes": 200_000, "csam_hosts": 1_100_000,
          "csam_prefixes": 200_000}
DP_DEFINES = ["-DXZ_MAX_HOSTS=65536", "-DXZ_MAX_PREFIXES=1024",
              f"-DXZ_MAX_CSAM_HOSTS={LIMITS['csam_hosts']}",
              f"-DXZ_MAX_CSAM_PREFIXES={LIMITS['csam_prefixes']}",
              f"-DXZ_CSAM_NET_BITS={csam_net_bits(LIMITS['csam_prefixes'])}"]
GOAL_RATIO, GOAL_CHANGE_S, GOAL_PER_PACKET, GOAL_USERS = 1.0, 0.5, 1.5, 1.5
GOAL_PATHS = ("unlisted", "host", "prefix")   # the issue's: not listed (pass), listed (drop)
C = schema.C
FLAGS_ON = (C["XZ_C_LOADED"] | C["XZ_C_OP25B"] | C["XZ_C_OP25B_V6"] | C["XZ_C_IP53B"]
            | C["XZ_C_IP53B_V6"])
XDP_RET = {1: "drop", 2: "pass", 3: "reject"}
CSAM_MAPS = ("xz_csam_h0", "xz_csam_h1", "xz_csam_p0", "xz_csam_p1", "xz_csam_meta",
             "xz_csam_hits", "xz_csam_t0", "xz_csam_t1", "xz_csam_l",
             "xz_csam_n", "xz_csam_f", "xz_csam_f4", "xz_csam_b4")
SUB_MAPS = ("xz_hosts", "xz_prefixes", "xz_sub_dir", "xz_sub_idx", "xz_uniform",
            "xz_sub_hosted")

# ---- the address plan ---------------------------------------------------------------------
# CSAM hosts and prefixes come from disjoint regions (no prefix may contain a listed host:
# nft interval sets refuse overlaps); the subscriber file and the per-packet test
# addresses from others again.
V4_HOSTS = (int(ipaddress.IPv4Address("11.0.0.0")), int(ipaddress.IPv4Address("96.0.0.0")))
V4_PREFIXES = (int(ipaddress.IPv4Address("128.0.0.0")),
               int(ipaddress.IPv4Address("160.0.0.0")))
V6_HOSTS = int(ipaddress.IPv6Address("2400::")), 112        # base, random low bits
V6_PREFIXES = int(ipaddress.IPv6Address("2a00::")), 16      # base, its prefix length
# Prefix lengths and their weights: most prefixes are small blocks.
V4_PLENS = {16: 1, 17: 1, 18: 1, 19: 1, 20: 3, 21: 3, 22: 3, 23: 3, 24: 20, 25: 6, 26: 6,
            27: 6, 28: 6, 29: 6, 30: 6, 31: 6}
V6_PLENS = {32: 1, 36: 1, 40: 2, 44: 2, 48: 10, 52: 3, 56: 6, 60: 3, 64: 8, 96: 1, 112: 1,
            120: 1, 127: 1}
STATIC_V4 = "10.0.0.1"          # the static subscriber of the per-packet figures
UNLISTED_V4 = "203.0.113.7"     # in no list, far from every entry

V4MAPPED = bytes(10) + b"\xff\xff"


def log(msg: str, end: str = "\n") -> None:
    """Progress to stderr."""
    print(msg, end=end, file=sys.stderr, flush=True)


def size_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return f"{n:,}"


# ---- generated lists ----------------------------------------------------------------------


def _weighted(rng: random.Random, weights: dict[int, int], n: int) -> list[int]:
    return rng.choices(list(weights), list(weights.values()), k=n)


def non_overlapping(rng: random.Random, lo: int, hi: int, width: int, plens: dict[int, int],
                    n: int) -> list[tuple[int, int]]:
    """``n`` prefixes (network, length) inside [lo, hi) of which none overlaps another:
    random candidates, swept in address order keeping each that starts after the end of
    the last one kept (a covering prefix sorts first and wins), until there are enough;
    then a random ``n`` of them (a subset of a disjoint set is disjoint)."""
    kept: list[tuple[int, int]] = []
    want = n
    while True:
        cands = []
        for plen in _weighted(rng, plens, int(want * 1.3) + 100):
            size = 1 << (width - plen)
            net = rng.randrange(lo, hi - size + 1) & ~(size - 1)
            cands.append((net, plen))
        out, end = [], -1
        for net, plen in sorted(set(kept + cands), key=lambda x: (x[0], x[1])):
            if net > end:
                out.append((net, plen))
                end = net + (1 << (width - plen)) - 1
        kept = out
        if len(kept) >= n:
            return rng.sample(kept, n)
        want = n - len(kept)


def ntoa4(n: int) -> str:
    return socket.inet_ntoa(n.to_bytes(4, "big"))


def ntoa6(n: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big"))


@dataclass
class CsamSet:
    """The generated list: entries as text ("a.b.c.d", "a.b.c.d/len", IPv6 likewise), in
    file order, and spares for the change sequence."""

    hosts4: list[str]
    hosts6: list[str]
    prefixes4: list[str]
    prefixes6: list[str]
    spare_prefixes4: list[str]
    listed_host: str = ""       # per-packet test addresses, all IPv4
    listed_in_prefix: str = ""
    near_miss: str = ""         # just past the end of a listed prefix, itself unlisted

    @property
    def entries(self) -> list[str]:
        return self.hosts4 + self.hosts6 + self.prefixes4 + self.prefixes6


def gen_csam(n: int, rng: random.Random) -> CsamSet:
    """``n`` entries: ~85% IPv4, ~15% IPv6, ~90% hosts; no duplicates, no overlaps."""
    n6 = n * 15 // 100
    n4 = n - n6
    p4, p6 = n4 // 10, n6 // 10
    h4, h6 = n4 - p4, n6 - p6
    hosts4 = [ntoa4(V4_HOSTS[0] + x) for x in rng.sample(range(V4_HOSTS[1] - V4_HOSTS[0]), h4)]
    base6, bits6 = V6_HOSTS
    hosts6_int: set[int] = set()
    while len(hosts6_int) < h6:
        hosts6_int.add(base6 + rng.getrandbits(bits6))
    hosts6 = [ntoa6(x) for x in sorted(hosts6_int)]
    rng.shuffle(hosts6)
    spare = 2 * CHANGE_PREFIXES * (CHANGE_STEPS + 1)
    pf4 = non_overlapping(rng, *V4_PREFIXES, 32, V4_PLENS, p4 + spare)
    base, plen0 = V6_PREFIXES
    pf6 = non_overlapping(rng, base, base + (1 << (128 - plen0)), 128, V6_PLENS, p6)
    prefixes4 = [f"{ntoa4(a)}/{p}" for a, p in pf4[:p4]]
    spare4 = [f"{ntoa4(a)}/{p}" for a, p in pf4[p4:]]
    prefixes6 = [f"{ntoa6(a)}/{p}" for a, p in pf6]
    s = CsamSet(hosts4, hosts6, prefixes4, prefixes6, spare4)
    # Test addresses: a listed host, an address inside a listed /24, the address right
    # after a listed prefix (sharing a long common prefix with it: a deep trie walk).
    s.listed_host = hosts4[0]
    listed = pf4[:p4]
    starts = sorted(listed)
    for a, p in listed:
        if p == 24 and not s.listed_in_prefix:
            s.listed_in_prefix = ntoa4(a + 77)
        nxt = a + (1 << (32 - p))
        if not s.near_miss and p >= 24 and _uncovered(nxt, starts):
            s.near_miss = ntoa4(nxt)
        if s.listed_in_prefix and s.near_miss:
            break
    return s


def _uncovered(addr: int, starts: list[tuple[int, int]]) -> bool:
    """True when none of the sorted, disjoint IPv4 prefixes contains ``addr``."""
    i = bisect.bisect_right(starts, (addr, 99)) - 1
    return i < 0 or not starts[i][0] <= addr < starts[i][0] + (1 << (32 - starts[i][1]))


def write_private(path: Path, text: str) -> None:
    """A file only root may read (the list is confidential)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def list_text(entries: list[str]) -> str:
    return "# generated CSAM list (benchmark)\n" + "\n".join(entries) + "\n"


def ipset_text(name: str, v4: list[str], v6: list[str]) -> str:
    """An `ipset restore` file: two hash:net sets, sized up front."""
    def hs(n: int) -> int:
        return 1 << max(10, (max(n, 1) - 1).bit_length())
    out = [f"create {name}4 hash:net family inet hashsize {hs(len(v4))} "
           f"maxelem {max(2 * len(v4), 65536)}",
           f"create {name}6 hash:net family inet6 hashsize {hs(len(v6))} "
           f"maxelem {max(2 * len(v6), 65536)}"]
    out += [f"add {name}4 {e}" for e in v4]
    out += [f"add {name}6 {e}" for e in v6]
    return "\n".join(out) + "\n"


def nft_text(name: str, v4: list[str], v6: list[str]) -> str:
    """An `nft -f` file: one table, two interval sets with every element."""
    def elems(xs: list[str]) -> str:
        if not xs:
            return ""
        lines = [", ".join(xs[i:i + 64]) for i in range(0, len(xs), 64)]
        return "elements = {\n" + ",\n".join(lines) + "\n}"
    return (f"table inet {name} {{\n"
            f"  set s4 {{ type ipv4_addr; flags interval; {elems(v4)} }}\n"
            f"  set s6 {{ type ipv6_addr; flags interval; {elems(v6)} }}\n"
            "}\n")


@dataclass
class SubscriberSet:
    rows: list[str]
    v4: list[str]
    v6: list[str]
    kinds: dict[str, int]


def gen_subscribers(n: int, rng: random.Random) -> SubscriberSet:
    """``n`` rows: ~90% dynamic /32 hosts (100.64.0.0/10), ~9.9% static /29 blocks
    (10.128.0.0/9), 16 dynamic /20 pools (172.16.0.0/12) and ~0.1% static IPv6 /56s; no
    row inside another (the same entries then go to nft's interval sets)."""
    pools = 16
    v6 = max(1, n // 1000)
    static = n * 99 // 1000
    dyn = n - pools - v6 - static
    cgn = int(ipaddress.IPv4Address("100.64.0.0"))
    blk = int(ipaddress.IPv4Address("10.128.0.0"))
    pool0 = int(ipaddress.IPv4Address("172.16.0.0"))
    v6base = int(ipaddress.IPv6Address("2001:db8::"))
    hosts = [ntoa4(cgn + x) for x in rng.sample(range(1 << 22), dyn)]
    blocks = [f"{ntoa4(blk + (x << 3))}/29" for x in rng.sample(range(1 << 20), static)]
    pool = [f"{ntoa4(pool0 + (x << 12))}/20" for x in rng.sample(range(1 << 8), pools)]
    six = [f"{ntoa6(v6base + (x << 72))}/56" for x in rng.sample(range(1 << 24), v6)]
    rows = ["subscriber,address,type"]
    rows += [f"{1 + i},{a},dynamic" for i, a in enumerate(hosts)]
    rows += [f"{2_000_001 + i},{a},static" for i, a in enumerate(blocks)]
    rows += [f"{3_000_001 + i},{a},dynamic" for i, a in enumerate(pool)]
    rows += [f"{2_000_001 + i},{a},static" for i, a in enumerate(six)]
    return SubscriberSet(rows, hosts + blocks + pool, six,
                         {"dynamic /32": dyn, "static /29": static, "pool /20": pools,
                          "static IPv6 /56": v6})


def with_users(rows: list[str]) -> list[str]:
    """gen_subscribers' rows with a ``user`` column: each subscriber's RADIUS User-Name on
    its rows, but on the pools' (a pool has no user)."""
    out = [rows[0] + ",user"]
    for row in rows[1:]:
        sub_id, address, kind = row.split(",")
        pool = kind == "dynamic" and "/" in address
        out.append(f"{row},{'' if pool else f'u{sub_id}@zoot.example'}")
    return out


def changed(cur: list[str], rng: random.Random, spare_prefixes: list[str],
            host_pool: Callable[[], str]) -> list[str]:
    """``cur`` with CHANGE entries replaced: CHANGE - CHANGE_PREFIXES hosts by new hosts,
    CHANGE_PREFIXES prefixes by spare ones (still no overlaps); order kept."""
    present = set(cur)
    hosts_i = [i for i in rng.sample(range(len(cur)), CHANGE * 4)
               if "/" not in cur[i]][:CHANGE - CHANGE_PREFIXES]
    pfx_i = rng.sample([i for i, e in enumerate(cur) if "/" in e and ":" not in e],
                       CHANGE_PREFIXES)
    out = list(cur)
    for i in hosts_i:
        while True:
            h = host_pool()
            if h not in present:
                break
        present.add(h)
        out[i] = h
    for i in pfx_i:
        out[i] = spare_prefixes.pop()
    return out


# ---- running things -----------------------------------------------------------------------


class Runner:
    """Commands inside our namespace, timed as whole processes."""

    def __init__(self, ns: str, env: dict[str, str]):
        self.ns, self.env = ns, env

    def run(self, argv: list[str], stdin: Path | None = None, timeout: float = 900,
            check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
        full = ["ip", "netns", "exec", self.ns, *argv]
        f = open(stdin, "rb") if stdin else subprocess.DEVNULL  # noqa: SIM115
        try:
            t0 = time.perf_counter()
            r = subprocess.run(full, stdin=f, capture_output=True, env=self.env,
                               timeout=timeout)
            dt = time.perf_counter() - t0
        finally:
            if stdin:
                f.close()
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:6])} ...: exit {r.returncode}: "
                               f"{r.stderr.decode(errors='replace')[-2000:]}")
        return dt, r

    def steps(self, kind: str, cfg: Path, pin: str, path: Path) -> dict:
        """This file's --steps mode: one command's steps, each timed, in a process as
        fresh as the CLI's (timed in the benchmark's own process, the steps would pay for
        the garbage collector walking its millions of objects)."""
        _, r = self.run([sys.executable, __file__, "--steps", kind, "--config", str(cfg),
                         "--pin-dir", pin, str(path)])
        return json.loads(r.stdout)


def xdpzoot_argv(cfg: Path, pin: str, *args: str, profile: Path | None = None) -> list[str]:
    pre = [sys.executable]
    if profile:
        pre += ["-m", "cProfile", "-o", str(profile)]
    return [*pre, "-m", "xdpzoot", "--config", str(cfg), "--pin-dir", pin, *args]


def memlock(pin_dir: str, names: tuple[str, ...]) -> dict[str, dict]:
    out = {}
    for n in names:
        with kernel.PinnedMap(os.path.join(pin_dir, n)) as m:
            out[n] = {"memlock": m.memlock, "max_entries": m.max_entries}
    return out


def ipset_memory(run: Runner, name: str) -> int | None:
    """ipset's own "Size in memory" of the two sets (header only listing)."""
    total = 0
    for fam in ("4", "6"):
        _, r = run.run(["ipset", "list", "-t", name + fam])
        for line in r.stdout.decode().splitlines():
            if line.startswith("Size in memory:"):
                total += int(line.split(":")[1])
    return total or None


PHASES = {
    "blocklist": [
        ("read the file", "csam.py:read_list"),
        ("open the pinned maps", "csam.py:__init__"),
        ("load: diff and write, in all", "csam.py:load"),
        ("  read the idle generation's text, check its digest", "csam.py:held"),
        ("  compare the texts, parse the lines that differ", "csam.py:text_delta"),
        ("  write the entries that change", "csam.py:_write_delta"),
        ("  or: parse and validate the whole file", "csam.py:parse_csam_bytes"),
        ("  or: read the idle generation's keys", "kernel.py:keys"),
        ("  or: write the difference with them", "csam.py:_write_list"),
        ("  keep the new text (pin_blob)", "kernel.py:pin_blob"),
    ],
}


def profile_phases(path: Path, kind: str) -> dict:
    """Where a CLI command's time went, from its cProfile dump: start-up and imports (all
    that is not the click command), then the phases of PHASES[kind] (cumulative seconds,
    with the profiler's overhead), and the five functions with the most own time."""
    st = pstats.Stats(str(path))
    cum: dict[str, float] = {}
    own: list[tuple[float, str]] = []
    for (file, _line, fn), (_, _, tt, ct, _) in st.stats.items():  # type: ignore
        name = f"{Path(file).name}:{fn}"
        cum[name] = max(cum.get(name, 0.0), ct)
        where = "/".join(Path(file).parts[-2:])
        own.append((tt, f"{where}:{fn}" if file != "~" else fn))
    total = st.total_tt  # type: ignore
    command = cum.get("cli.py:_run", 0.0)
    phases = [("whole command (under the profiler)", total),
              ("start-up, imports, click, output", max(total - command, 0.0))]
    phases += [(label, cum[key]) for label, key in PHASES[kind] if key in cum]
    own.sort(reverse=True)
    return {"phases": phases, "own": [(n, t) for t, n in own[:5]]}


class Steps:
    """Steps of a command run in this process, each timed (perf_counter)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def __call__(self, label: str, fn: Callable, *args):
        t0 = time.perf_counter()
        r = fn(*args)
        self.times.append((label, time.perf_counter() - t0))
        return r


def csam_steps(pin: str, path: Path) -> tuple[list[tuple[str, float]], blocklist.LoadResult]:
    """What `xdpzoot blocklist load` does (cli.load_csam), step by step in this process,
    the whole of blocklist.load being one step; its parts are also timed alone first (in
    parentheses: not counted in the sum)."""
    st = Steps()
    data, _ = st("read the file", csam.read_list, str(path))
    inst = st("open the instance (its maps are opened from the pins when used)", Instance, pin)
    maps = inst.maps
    try:
        idle = 1 - (maps.word()[1] & C["XZ_CSAM_GEN"])
        old = st("(read the idle generation's text, check its digest)", blocklist.held, maps,
                 idle)
        if old:
            st("(compare the texts, parse the lines that differ)", csam.text_delta,
               old.text, data)
        else:
            st("(parse and validate the whole file)", csam.parse_csam_bytes, data, str(path))
            st("(read the idle generation's keys)",
               lambda: (maps.csam_hosts[idle].keys(), maps.csam_prefixes[idle].keys()))
        res = st("Instance.load_csam: all of it (lock, diff, write, keep the text, switch)",
                 inst.load_csam, data, str(path))
    finally:
        inst.close()
    return st.times, blocklist.LoadResult(res["added"], res["removed"], res["generation"],
                                          res["switched"])


def subscriber_steps(cfg: Path, pin: str, path: Path) -> tuple[list[tuple[str, float]],
                                                               sync.Change]:
    """What `xdpzoot subscribers load` does, step by step in this process (the cyclic GC
    paused, as there); the plan is also made alone first, to show that part of
    sync.apply_subscribers."""
    st = Steps()
    with paused_gc():
        hosts, prefixes, _ = st("read, parse and validate", read_columns, str(path))
        hosts, prefixes = st("build the tables", tables.class_tables, hosts, prefixes)
        inst = st("open the instance (maps from their pins, no compile)", Instance, pin)
        with inst:
            st("(plan alone: read the maps, diff)", inst.plan_subscribers, hosts, prefixes)
            change = st("Instance.load_subscribers: lock, plan, write", inst.load_subscribers,
                        hosts, prefixes)
    return st.times, change


# ---- parsing the subscriber file --------------------------------------------------------

# Run by each tree's Python path in a process of its own: CPU and wall seconds, rows,
# users. The CPU time is the figure: on a shared machine it moves less than the wall's.
# It counts the child process that parses a part of a large file (files.both).
PARSE_TIMER = """
import os, sys, time
from xdpzoot.sources.subscribers import read_columns
def cpu_s():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
t0, c0 = time.perf_counter(), cpu_s()
hosts, prefixes, contracts = read_columns(sys.argv[1])
cpu, wall = cpu_s() - c0, time.perf_counter() - t0
users = len(contracts) if isinstance(contracts, dict) else len(set(contracts.keys))
print(cpu, wall, len(hosts.keys) + len(prefixes.keys), users)
"""


def parse_part(args: argparse.Namespace, doc: Doc, tmp: Path) -> None:
    """The subscriber file parsed without and with a user column, in this checkout and
    each --tree, round-robin, each run in a fresh process (no heap of an earlier run);
    every tree must read the same rows and users."""
    log(f"parse: generating a {size_label(args.rows)}-row subscriber file, "
        "without and with users ...")
    sub = gen_subscribers(args.rows, random.Random(args.seed))
    files = {"plain": tmp / "parse-plain.csv", "user": tmp / "parse-user.csv"}
    files["plain"].write_text("\n".join(sub.rows) + "\n")
    files["user"].write_text("\n".join(with_users(sub.rows)) + "\n")
    del sub
    trees = [str(ROOT), *args.tree]
    runs: dict[str, dict[str, list[float]]] = {
        t: {k + wall: [] for k in files for wall in ("", "_wall")} for t in trees}
    read: dict[str, list[str]] = {}
    for i in range(args.parse_runs):
        log(f"  round {i + 1}/{args.parse_runs}")
        for tree in trees:
            for kind, path in files.items():
                r = subprocess.run([sys.executable, "-c", PARSE_TIMER, str(path)],
                                   capture_output=True, text=True,
                                   env=dict(os.environ, PYTHONPATH=str(Path(tree) / "src")))
                if r.returncode != 0:
                    raise RuntimeError(f"parse ({tree}, {kind}): {r.stderr[-2000:]}")
                cpu, wall, *what = r.stdout.split()
                if read.setdefault(kind, what) != what:
                    raise RuntimeError(f"{tree} read {what} (rows, users) of the {kind} "
                                       f"file, another tree {read[kind]}")
                runs[tree][kind].append(float(cpu))
                runs[tree][kind + "_wall"].append(float(wall))
    doc.figures["parse"] = {"runs": runs, "rows": int(read["user"][0]),
                            "users": int(read["user"][1])}


def parse_lines(parse: dict) -> list[tuple[str, str, str, bool | None]]:
    """The report's rows of parse_part: (label, value, goal, met); medians of CPU time."""
    out: list[tuple[str, str, str, bool | None]] = []
    for i, (tree, t) in enumerate(parse["runs"].items()):
        plain, user = med(t["plain"]), med(t["user"])
        name = "" if i == 0 else f" ({tree})"
        out.append((f"parse {size_label(parse['rows'])} subscriber rows{name}, CPU (wall "
                    f"{med(t['plain_wall']):.2f} s)", f"{plain:.2f} s", "", None))
        out.append((f"  with a user column ({parse['users']:,} users; wall "
                    f"{med(t['user_wall']):.2f} s)", f"{user:.2f} s", "", None))
        out.append((f"  with users / without (runs {min(t['user']):.2f}..{max(t['user']):.2f}"
                    f" / {min(t['plain']):.2f}..{max(t['plain']):.2f} s)", f"{user / plain:.2f}",
                    f"<= {GOAL_USERS}" if i == 0 else "",
                    user / plain <= GOAL_USERS if i == 0 else None))
    return out


# ---- per packet ---------------------------------------------------------------------------


@dataclass
class PathCase:
    key: str
    label: str
    dst: str
    expect: tuple[str, str]


def per_packet(root: str, small: csam.CsamList, big: csam.CsamList, s: CsamSet, runs: int,
               repeat: int, cold_n: int, texts: dict[str, bytes]) -> dict:
    """Both lists in the two generations of one instance; every path timed round-robin
    with the control word switched between them."""
    import packets  # scapy: imported only here (the --steps processes stay lean)

    log("per packet: compiling the data plane with 1.1M-entry list maps ...")
    pin = os.path.join(root, "dp")
    t0 = time.monotonic()
    bpf = kernel.compile_bpf(pin, DP_DEFINES)
    fd = kernel.load_program(bpf, "xdp", "access")
    floor = kernel.load_named(bpf, "xz_xdp_empty")
    maps = kernel.Maps(pin)
    compile_s = time.monotonic() - t0
    maps.set_host(tables.addr16(STATIC_V4), Entry(1, C["XZ_TYPE_STATIC"], 0, 0, 0))
    maps.set_control_flags(FLAGS_ON)
    words = {}
    with kernel.Maps(pin) as cm:
        # A load brings both generations to its list: the big one goes into the idle
        # generation alone (a load's first half), so that each generation holds one list.
        for label, lst in (("small", small), ("big", big)):
            log(f"  loading the {label} list ({lst.n_hosts + len(lst.prefixes):,} entries) "
                "...")
            t0 = time.monotonic()
            if label == "small":
                blocklist.load(cm, texts[label], lst=lst)
                words[label] = cm.word()[1]
            else:
                words[label] = blocklist.stage(cm, texts[label], label, lst)
            log(f"    {time.monotonic() - t0:.1f} s")
        paths = [
            PathCase("unlisted", "pass, destination not listed", UNLISTED_V4, ("pass", "ok")),
            PathCase("near_miss", "pass, just outside a listed prefix", s.near_miss,
                  ("pass", "ok")),
            PathCase("host", "drop, listed host (hash hit)", s.listed_host, ("drop", "csam")),
            PathCase("prefix", "drop, in a listed prefix (hash miss, LPM hit)",
                  s.listed_in_prefix, ("drop", "csam")),
        ]
        frames = {p.key: packets.frame(Packet("access", STATIC_V4, p.dst, TCP, 40_000, 443))
                  for p in paths}

        def counted() -> dict:
            per_role = len(schema.VERDICTS) * schema.REASON_SLOTS
            out = {}
            for slot, (pk, _) in maps.counters_sum().items():
                role, rest = divmod(slot, per_role)
                v, r = divmod(rest, schema.REASON_SLOTS)
                out[(schema.ROLES[role], schema.VERDICTS[v], schema.REASONS[r])] = pk
            return out

        for label, w in words.items():
            cm.set_word(w)
            for p in paths:
                before = counted()
                r = kernel.test_run(fd, frames[p.key], 1)
                after = counted()
                moved = [k for k in after if after[k] != before.get(k, 0)]
                got = XDP_RET.get(r.retval, str(r.retval))
                if moved != [("access", *p.expect)] or got != p.expect[0]:
                    raise RuntimeError(f"{label} {p.key}: expected {p.expect}, got {got} "
                                       f"{moved}")
        log(f"  timing {len(paths)} paths x 2 lists + floor, {runs} x {repeat:,} "
            f"(pinned to one CPU) ...")
        res: dict[str, list[int]] = {"floor": []}
        for label in words:
            for p in paths:
                res[f"{p.key}@{label}"] = []
        for _ in range(runs):
            res["floor"].append(kernel.test_run(floor, frames["unlisted"], repeat).duration_ns)
            for p in paths:
                for label, w in words.items():
                    cm.set_word(w)
                    res[f"{p.key}@{label}"].append(
                        kernel.test_run(fd, frames[p.key], repeat).duration_ns)
        # Cold: a different unlisted destination per call (repeat=1), so that hash bucket
        # and trie nodes are not all in cache; both lists interleaved.
        rng = random.Random(7)
        log(f"  cold sweep: {cold_n} destinations x 2 lists ...")
        cold_frames = []
        cm.set_word(words["big"])   # the big list holds the small one
        for _ in range(cold_n):
            while True:   # random IPv4 in the listed regions, not itself listed
                lo, hi = (V4_HOSTS, V4_PREFIXES)[rng.random() < 0.5]
                a = ntoa4(rng.randrange(lo, hi))
                if blocklist.check(cm, tables.addr16(a)) is None:
                    break
            cold_frames.append(packets.frame(Packet("access", STATIC_V4, a, TCP, 40_000,
                                                    443)))
        cold: dict[str, list[int]] = {"small": [], "big": []}
        for f in cold_frames:
            for label, w in words.items():
                cm.set_word(w)
                cold[label].append(kernel.test_run(fd, f, 1).duration_ns)
    cold_sum = {k: {"median": med(v), "p90": float(statistics.quantiles(v, n=10)[-1]),
                    "n": len(v)} for k, v in cold.items()}
    return {"runs": res, "labels": {p.key: p.label for p in paths}, "cold": cold_sum,
            "sizes": {"small": small.n_hosts + len(small.prefixes),
                      "big": big.n_hosts + len(big.prefixes)},
            "compile_s": compile_s, "repeat": repeat, "n_runs": runs}


# ---- the run ------------------------------------------------------------------------------


@dataclass
class Doc:
    config: dict
    figures: dict = field(default_factory=dict)
    goals: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    per_packet: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


def bench(args: argparse.Namespace) -> Doc:
    t_start = time.monotonic()
    with_all_cpus()
    rng = random.Random(args.seed)
    doc = Doc({"kernel": platform.release(), "cpus": os.cpu_count(), "entries": args.entries,
               "rows": args.rows, "seed": args.seed, "limits": LIMITS,
               "ipset": _version(["ipset", "--version"]),
               "nft": _version(["nft", "--version"])})
    ns = "xzb" + secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix="xdpzoot-bench-lists-"))
    os.chmod(tmp, 0o700)
    bpffs = contextlib.ExitStack()
    root = bpffs.enter_context(kernel.scratch_bpffs("xdpzoot-bench-lists-"))
    netns = False
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        netns = True
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"]
                                                 if env.get("PYTHONPATH") else "")
        # The CLI with its bytecode cached (in tmp), as an installed package has it: a
        # shell's PYTHONDONTWRITEBYTECODE (this machine's sets it) would have every timed
        # command compile its ~35 modules again (0.06-0.1 s). The untimed first command
        # caches them.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        run = Runner(ns, env)
        pin = os.path.join(root, "cli")
        cfg = tmp / "xdpzoot.toml"
        cfg.write_text("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in LIMITS.items()))

        # -- the CSAM list ---------------------------------------------------------------
        log(f"generating a {size_label(args.entries)}-entry CSAM list (seed {args.seed}) ...")
        t0 = time.monotonic()
        s = gen_csam(args.entries, rng)
        entries = s.entries
        rng.shuffle(entries)
        lst_a = tmp / "csam-A.txt"
        write_private(lst_a, list_text(entries))
        v4 = [e for e in entries if ":" not in e]
        v6 = [e for e in entries if ":" in e]
        (tmp / "csam.ipset").write_text(ipset_text("xzcsam", v4, v6))
        (tmp / "csam.nft").write_text(nft_text("xzcsam", v4, v6))
        doc.counts["csam"] = {"hosts4": len(s.hosts4), "hosts6": len(s.hosts6),
                              "prefixes4": len(s.prefixes4), "prefixes6": len(s.prefixes6)}
        log(f"  {doc.counts['csam']} in {time.monotonic() - t0:.1f} s")

        log("creating the maps (subscribers load of a 1-row file; compiles, not timed) ...")
        tiny = tmp / "tiny.csv"
        tiny.write_text("subscriber,address,type\n1,198.18.0.1,static\n")
        run.run(xdpzoot_argv(cfg, pin, "subscribers", "load", str(tiny)))

        want = (lambda part: args.only in (None, part))  # noqa: E731
        if want("csam"):
            csam_part(args, doc, run, cfg, pin, tmp, s, entries, lst_a)
        if want("subscribers"):
            subscribers_part(args, doc, run, cfg, pin, tmp, rng, tiny, lst_a)
        if want("packets"):
            packets_part(args, doc, root, pin, s, entries)
        if want("parse"):
            parse_part(args, doc, tmp)
    finally:
        if netns:
            subprocess.run(["ip", "netns", "delete", ns], check=False)
        bpffs.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.only:
        doc.goals = goals(doc)
    doc.elapsed_s = time.monotonic() - t_start
    return doc


def csam_part(args, doc, run, cfg, pin, tmp, s, entries, lst_a) -> None:
    """The CSAM list: full load next to ipset and nft, then 1k changes."""
    log("CSAM list, full load:")
    dt, r = run.run(xdpzoot_argv(cfg, pin, "blocklist", "load", str(lst_a), "--json"))
    out = json.loads(r.stdout)
    if out["added"] != args.entries:
        raise RuntimeError(f"xdpzoot loaded {out['added']} entries, not {args.entries}")
    doc.figures["csam_xdpzoot_s"] = dt
    log(f"  xdpzoot blocklist load  {dt:7.2f} s")
    dt, _ = run.run(["ipset", "-exist", "restore"], stdin=tmp / "csam.ipset")
    doc.figures["csam_ipset_s"] = dt
    log(f"  ipset -exist restore    {dt:7.2f} s")
    doc.memory["csam_ipset_bytes"] = ipset_memory(run, "xzcsam")
    dt, _ = run.run(["nft", "-f", str(tmp / "csam.nft")])
    doc.figures["csam_nft_s"] = dt
    log(f"  nft -f                  {dt:7.2f} s")
    run.run(["nft", "delete", "table", "inet", "xzcsam"])
    run.run(["ipset", "destroy", "xzcsam4"])
    run.run(["ipset", "destroy", "xzcsam6"])

    # -- 1k changes ------------------------------------------------------------------
    log(f"CSAM list, {CHANGE:,}-entry changes (A', A'', A'''):")
    hrng = random.Random(args.seed + 1)

    def new_host() -> str:
        if hrng.random() < 0.85:
            return ntoa4(hrng.randrange(*V4_HOSTS))
        return ntoa6(V6_HOSTS[0] + hrng.getrandbits(V6_HOSTS[1]))

    cur = entries
    steps = []
    for i in range(1, CHANGE_STEPS + 1):
        cur = changed(cur, hrng, s.spare_prefixes4, new_host)
        p = tmp / f"csam-A{i}.txt"
        write_private(p, list_text(cur))
        dt, r = run.run(xdpzoot_argv(cfg, pin, "blocklist", "load", str(p), "--json"))
        o = json.loads(r.stdout)
        steps.append({"seconds": dt, "added": o["added"], "removed": o["removed"],
                      "generation": o["generation"]})
        log(f"  A{chr(39) * i:<4} {dt:6.2f} s  (+{o['added']:,} -{o['removed']:,}, "
            f"generation {o['generation']})")
    doc.figures["change_steps"] = steps
    doc.figures["second_load_s"] = steps[0]["seconds"]
    doc.figures["change_s"] = steps[-1]["seconds"]
    dt, r = run.run(xdpzoot_argv(cfg, pin, "blocklist", "load", str(p), "--json"))
    doc.figures["same_again_s"] = dt
    log(f"  the same file again {dt:.2f} s (in force: nothing written)")
    dt, _ = run.run([sys.executable, "-c", "import xdpzoot.cli"])
    doc.figures["cli_import_s"] = dt
    log("  one more change, step by step in a fresh process ...")
    cur = changed(cur, hrng, s.spare_prefixes4, new_host)
    p = tmp / "csam-A-steps.txt"
    write_private(p, list_text(cur))
    doc.steps["1k change"] = run.steps("csam", cfg, pin, p)
    if not args.no_profile:
        log("  and one more under cProfile ...")
        cur = changed(cur, hrng, s.spare_prefixes4, new_host)
        p = tmp / "csam-A-profiled.txt"
        write_private(p, list_text(cur))
        prof = tmp / "change.prof"
        dt, _ = run.run(xdpzoot_argv(cfg, pin, "blocklist", "load", str(p),
                                     profile=prof))
        doc.profiles["1k change"] = {"wall_s": dt, **profile_phases(prof, "blocklist")}
    doc.memory["csam"] = memlock(pin, CSAM_MAPS)


def subscribers_part(args, doc, run, cfg, pin, tmp, rng, tiny, lst_a) -> None:
    """The subscriber file: full load next to ipset and nft, and the steps of both loads."""
    log(f"generating a {size_label(args.rows)}-row subscriber file ...")
    sub = gen_subscribers(args.rows, rng)
    subs = tmp / "subscribers.csv"
    subs.write_text("\n".join(sub.rows) + "\n")
    (tmp / "subs.ipset").write_text(ipset_text("xzsub", sub.v4, sub.v6))
    (tmp / "subs.nft").write_text(nft_text("xzsub", sub.v4, sub.v6))
    doc.counts["subscribers"] = sub.kinds
    del sub
    log("subscriber file, full load:")
    dt, r = run.run(xdpzoot_argv(cfg, pin, "subscribers", "load", str(subs), "--json"))
    o = json.loads(r.stdout)
    if o["rows"] != args.rows:
        raise RuntimeError(f"xdpzoot read {o['rows']} rows, not {args.rows}")
    doc.figures["subs_xdpzoot_s"] = dt
    log(f"  xdpzoot subscribers load {dt:7.2f} s  ({o['added']:,} added, "
        f"{o['removed']:,} removed)")
    dt, _ = run.run(["ipset", "-exist", "restore"], stdin=tmp / "subs.ipset")
    doc.figures["subs_ipset_s"] = dt
    log(f"  ipset -exist restore     {dt:7.2f} s")
    doc.memory["subs_ipset_bytes"] = ipset_memory(run, "xzsub")
    dt, _ = run.run(["nft", "-f", str(tmp / "subs.nft")])
    doc.figures["subs_nft_s"] = dt
    log(f"  nft -f                   {dt:7.2f} s")
    run.run(["nft", "delete", "table", "inet", "xzsub"])
    run.run(["ipset", "destroy", "xzsub4"])
    run.run(["ipset", "destroy", "xzsub6"])
    doc.memory["subs"] = memlock(pin, SUB_MAPS)
    # The two full loads again, step by step in a fresh process each, into the fresh
    # maps of a second instance: where the time of the first figures goes.
    log("full loads step by step (fresh processes, fresh maps) ...")
    pin2 = os.path.join(os.path.dirname(pin), "cli2")
    run.run(xdpzoot_argv(cfg, pin2, "subscribers", "load", str(tiny)))
    doc.steps["full CSAM list load"] = run.steps("csam", cfg, pin2, lst_a)
    doc.steps["full subscriber load"] = run.steps("subscribers", cfg, pin2, subs)
    kernel.unpin_all(pin2)


def packets_part(args, doc, root, pin, s, entries) -> None:
    """Per packet, 1k against 1M list entries in force (BPF_PROG_TEST_RUN)."""
    kernel.unpin_all(pin)   # the CLI's maps: their memory is measured, free it
    small_entries = [s.listed_host, f"{ntoa4(_net24(s.listed_in_prefix))}/24"]
    # The rest of the small list: the first entries of the big one, as it is in
    # force (hosts and prefixes in the big list's proportions).
    for e in entries:
        if len(small_entries) >= SMALL:
            break
        if e not in small_entries:
            small_entries.append(e)
    texts = {"small": list_text(small_entries).encode(), "big": list_text(entries).encode()}
    small, big = (csam.parse_csam_bytes(texts[k]) for k in ("small", "big"))
    if (96 + 24, tables.addr16(ntoa4(_net24(s.listed_in_prefix)))) not in big.prefixes:
        raise RuntimeError("the listed-prefix test address is not in a listed /24")
    cpu = max(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        doc.per_packet = per_packet(root, small, big, s, args.runs, args.repeat,
                                    args.cold, texts)
    finally:
        os.sched_setaffinity(0, allowed)
    doc.per_packet["cpu"] = cpu


def with_all_cpus() -> None:
    """Undo a pinning inherited from bench.py: the tools compared run as they would."""
    try:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    except OSError:
        pass


def _net24(a: str) -> int:
    return int(ipaddress.IPv4Address(a)) & ~0xFF


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "absent"


def med(xs: list[int]) -> float:
    return float(statistics.median(xs))


def goals(doc: Doc) -> dict:
    f, pp = doc.figures, doc.per_packet
    g = {
        "csam_vs_ipset": f["csam_xdpzoot_s"] / f["csam_ipset_s"],
        "subs_vs_ipset": f["subs_xdpzoot_s"] / f["subs_ipset_s"],
        "change_s": f["change_s"],
    }
    g["csam_ok"] = g["csam_vs_ipset"] <= GOAL_RATIO
    g["subs_ok"] = g["subs_vs_ipset"] <= GOAL_RATIO
    g["change_ok"] = g["change_s"] < GOAL_CHANGE_S
    g["second_load_ok"] = f["second_load_s"] < GOAL_CHANGE_S
    runs = pp["runs"]
    per = {}
    for key in pp["labels"]:
        big, small = runs[f"{key}@big"], runs[f"{key}@small"]
        paired = [b / s for b, s in zip(big, small, strict=True)]
        per[key] = {"small_ns": med(small), "big_ns": med(big), "ratio": med(big) / med(small),
                    "ratio_runs": [min(paired), max(paired)]}
    g["per_packet"] = per
    g["per_packet_ok"] = all(per[k]["ratio"] <= GOAL_PER_PACKET for k in GOAL_PATHS)
    g["per_packet_all_ok"] = all(v["ratio"] <= GOAL_PER_PACKET for v in per.values())
    c = pp["cold"]
    g["cold_ratio"] = c["big"]["median"] / c["small"]["median"]
    t = f["parse"]["runs"][str(ROOT)]
    g["users_ratio"] = med(t["user"]) / med(t["plain"])
    g["users_ok"] = g["users_ratio"] <= GOAL_USERS
    return g


# ---- report -------------------------------------------------------------------------------


def yn(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(doc: Doc) -> str:
    f, g, m, pp = doc.figures, doc.goals, doc.memory, doc.per_packet
    cfg = doc.config
    n, rows = cfg["entries"], cfg["rows"]
    cc, sc = doc.counts["csam"], doc.counts["subscribers"]
    out = [
        f"xdpzoot list loading benchmark: kernel {cfg['kernel']}, {cfg['cpus']} CPUs; "
        f"{cfg['ipset']}; {cfg['nft']}",
        f"CSAM list {n:,} entries (seed {cfg['seed']}): {cc['hosts4']:,} IPv4 hosts, "
        f"{cc['hosts6']:,} IPv6 hosts, {cc['prefixes4']:,} IPv4 prefixes /16../31, "
        f"{cc['prefixes6']:,} IPv6 prefixes /32../127",
        f"subscriber file {rows:,} rows: " + ", ".join(f"{v:,} {k}" for k, v in sc.items()),
        "wall time of each whole command (process start to exit), run in a network namespace",
        "",
        f"{'figure':<58}{'value':>12}  {'goal':<14}{'met':>4}",
        "-" * 92,
    ]

    def row(label: str, value: str, goal: str = "", ok: bool | None = None) -> None:
        out.append(f"{label:<58}{value:>12}  {goal:<14}{'' if ok is None else yn(ok):>4}")

    row(f"CSAM {size_label(n)}: xdpzoot blocklist load (fresh maps)",
        f"{f['csam_xdpzoot_s']:.2f} s")
    row(f"CSAM {size_label(n)}: ipset -exist restore (2 x hash:net)", f"{f['csam_ipset_s']:.2f} s")
    row(f"CSAM {size_label(n)}: nft -f (2 interval sets)", f"{f['csam_nft_s']:.2f} s")
    row("  ratio xdpzoot / ipset", f"{g['csam_vs_ipset']:.2f}", "<= 1.0", g["csam_ok"])
    row("  ratio xdpzoot / nft", f"{f['csam_xdpzoot_s'] / f['csam_nft_s']:.2f}")
    row(f"subscribers {size_label(rows)}: xdpzoot subscribers load",
        f"{f['subs_xdpzoot_s']:.2f} s")
    row(f"subscribers {size_label(rows)}: ipset -exist restore", f"{f['subs_ipset_s']:.2f} s")
    row(f"subscribers {size_label(rows)}: nft -f", f"{f['subs_nft_s']:.2f} s")
    row("  ratio xdpzoot / ipset", f"{g['subs_vs_ipset']:.2f}", "<= 1.0", g["subs_ok"])
    row("  ratio xdpzoot / nft", f"{f['subs_xdpzoot_s'] / f['subs_nft_s']:.2f}")
    for line in parse_lines(f["parse"]):
        row(*line)
    for i, st in enumerate(f["change_steps"], 1):
        last = i == len(f["change_steps"])
        what = "second load, 1k change" if i == 1 else "diff to the list in force"
        row(f"{CHANGE:,}-entry change A{chr(39) * i} ({what})",
            f"{st['seconds']:.2f} s", "< 0.5 s" if last or i == 1 else "",
            g["change_ok"] if last else g["second_load_ok"] if i == 1 else None)
        out[-1] += f"  +{st['added']:,}/-{st['removed']:,}"
    row("  the same file again (in force: nothing written)", f"{f['same_again_s']:.2f} s")
    row("  python start-up + import xdpzoot.cli alone", f"{f['cli_import_s']:.2f} s")
    labels = pp["labels"]
    sb = f"{size_label(pp['sizes']['big'])} / {size_label(pp['sizes']['small'])}"
    out.append(f"per packet: ns with {size_label(pp['sizes']['small'])} / with "
               f"{size_label(pp['sizes']['big'])} list entries in force")
    for key, label in labels.items():
        v = g["per_packet"][key]
        row(f"per packet, {label}", f"{v['small_ns']:.0f}/{v['big_ns']:.0f} ns")
        row(f"  {sb} (per-run {v['ratio_runs'][0]:.2f}..{v['ratio_runs'][1]:.2f})",
            f"{v['ratio']:.2f}", "<= 1.5", v["ratio"] <= GOAL_PER_PACKET)
    row("per packet, floor (xz_xdp_empty)", f"{med(pp['runs']['floor']):.0f} ns")
    c = pp["cold"]
    row(f"per packet, cold: {c['small']['n']} unlisted destinations, repeat 1",
        f"{c['small']['median']:.0f}/{c['big']['median']:.0f} ns")
    row(f"  {sb} (cold; each figure includes a clock read)", f"{g['cold_ratio']:.2f}")
    row("per-packet goal: not listed (pass), listed (drop)", "", "<= 1.5",
        g["per_packet_ok"])
    row("  and with the near miss too", "", "<= 1.5", g["per_packet_all_ok"])
    cs = m["csam"]
    lists = sum(cs[k]["memlock"] for k in ("xz_csam_h0", "xz_csam_h1", "xz_csam_p0",
                                           "xz_csam_p1"))
    every = sum(v["memlock"] for v in cs.values())
    row(f"CSAM maps memlock, both generations holding ~{size_label(n)}",
        f"{lists / 2**20:.1f} MiB")
    row("  bytes per list entry (both generations)", f"{lists / n:.0f} B")
    row("  bytes per list entry (one generation)", f"{lists / 2 / n:.0f} B")
    for gen in (0, 1):
        h, p = cs[f"xz_csam_h{gen}"], cs[f"xz_csam_p{gen}"]
        row(f"  generation {gen}: hash {h['memlock'] / 2**20:.1f} MiB (prealloc "
            f"{h['max_entries']:,}) + trie", f"{p['memlock'] / 2**20:.1f} MiB")
    text = cs["xz_csam_t0"]["memlock"] + cs["xz_csam_t1"]["memlock"]
    row("  the list files' text, both generations (for quick changes)",
        f"{text / 2**20:.1f} MiB")
    fixed = sum(cs[f"xz_csam_{k}"]["memlock"] for k in "dl")
    row("  the IPv4 directories and lines, both generations (fixed by the limits)",
        f"{fixed / 2**20:.1f} MiB")
    row("  all CSAM maps (with meta, hits, the text, directories and lines)",
        f"{every / 2**20:.1f} MiB")
    if m.get("csam_ipset_bytes"):
        row("  ipset's own size in memory of the same entries",
            f"{m['csam_ipset_bytes'] / 2**20:.1f} MiB")
    sm = m["subs"]
    stot = sum(v["memlock"] for v in sm.values())
    per = sum(v["memlock"] for k, v in sm.items() if k in ("xz_hosts", "xz_prefixes"))
    row(f"subscriber maps memlock at {size_label(rows)} rows", f"{stot / 2**20:.1f} MiB")
    row("  bytes per row (hosts and prefixes; the directory and the class index are fixed)",
        f"{per / rows:.0f} B")
    for k, v in sm.items():
        row(f"  {k} (max {v['max_entries']:,})", f"{v['memlock'] / 2**20:.1f} MiB")
    if m.get("subs_ipset_bytes"):
        row("  ipset's own size in memory of the same entries",
            f"{m['subs_ipset_bytes'] / 2**20:.1f} MiB")
    startup = f["cli_import_s"]
    wall = {"full CSAM list load": f["csam_xdpzoot_s"], "1k change": f["change_s"],
            "full subscriber load": f["subs_xdpzoot_s"]}
    for name, sd in doc.steps.items():
        out += ["", f"where the time goes: {name}, the command's steps timed one by one in "
                f"a process of their own (+{sd['added']:,}/-{sd['removed']:,}); seconds"]
        total = startup
        out.append(f"  {'python start-up + imports (a separate process)':<56}{startup:>8.2f}")
        for label, sec in sd["steps"]:
            out.append(f"  {label:<56}{sec:>8.2f}")
            if not label.startswith("("):
                total += sec
        out.append(f"  {'sum (the CLI command took ' + format(wall[name], '.2f') + ' s)':<56}"
                   f"{total:>8.2f}")
    for name, pr in doc.profiles.items():
        out += ["", f"where the time goes: {name}, python -m cProfile of the CLI command "
                f"(wall {pr['wall_s']:.2f} s with the profiler; seconds, cumulative)"]
        for label, sec in pr["phases"]:
            out.append(f"  {label:<56}{sec:>8.2f}")
        out.append("  most own time: " + ", ".join(f"{n} {t:.2f}" for n, t in pr["own"]))
    out += ["", f"per packet: median of {pp['n_runs']} runs x repeat {pp['repeat']:,}, "
            f"CPU {pp['cpu']}, both lists in one instance (control word switched); "
            f"compile {pp['compile_s']:.1f} s; total bench time {doc.elapsed_s:.0f} s"]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="also print a JSON document")
    p.add_argument("--entries", type=int, default=ENTRIES, help="CSAM list entries")
    p.add_argument("--rows", type=int, default=ROWS, help="subscriber file rows")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=7, help="per-packet calls per figure")
    p.add_argument("--repeat", type=int, default=200_000, help="per-packet iterations")
    p.add_argument("--cold", type=int, default=2_000, help="destinations in the cold sweep")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    p.add_argument("--only", choices=("csam", "subscribers", "packets", "parse"),
                   help="run one part only (csam: full load and changes; parse: no root)")
    p.add_argument("--parse-runs", type=int, default=5, help="rounds of the parse figures")
    p.add_argument("--tree", action="append", default=[],
                   help="another checkout whose parser is timed too (parse figures)")
    p.add_argument("--steps", choices=("csam", "subscribers"), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--pin-dir", help=argparse.SUPPRESS)
    p.add_argument("file", nargs="?", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps:   # internal: one command's steps (see Runner.steps)
        if args.steps == "csam":
            times, res = csam_steps(args.pin_dir, Path(args.file))
        else:
            times, res = subscriber_steps(Path(args.config), args.pin_dir, Path(args.file))
        print(json.dumps({"steps": times, "added": res.added, "removed": res.removed}))
        return 0
    if args.only == "parse":   # the parser alone: no root, no namespace
        doc = Doc({"rows": args.rows, "seed": args.seed})
        with tempfile.TemporaryDirectory(prefix="xdpzoot-bench-parse-") as tmp:
            parse_part(args, doc, Path(tmp))
        for label, value, goal, ok in parse_lines(doc.figures["parse"]):
            print(f"{label:<66}{value:>8}  {goal:<6}{'' if ok is None else yn(ok):>4}")
        if args.json:
            print(json.dumps(doc.figures["parse"], indent=2))
        return 0
    if os.geteuid() != 0:
        log("bench_lists.py needs root (BPF, mount, network namespaces)")
        return 1
    for tool in ("ipset", "nft"):
        if not shutil.which(tool):
            log(f"bench_lists.py needs {tool}")
            return 1
    doc = bench(args)
    if args.only:   # a part alone: its raw figures (the report needs every part)
        print(json.dumps({k: getattr(doc, k) for k in ("figures", "steps", "per_packet",
                                                        "memory")},
                         indent=2, default=str))
        return 0
    print(report(doc))
    if args.json:
        print(json.dumps(doc.__dict__, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
