"""Cold-cache per-packet benchmark: production-shaped state, a different packet per call.

``bench.py`` times one packet repeated: every map entry it touches stays in the CPU's
cache. Here the state is the size of a large ISP's and every packet is different, as on
a real link. Each of two instances of the data plane (own pin directory, same compiled
sizes) is loaded through the CLI itself (``xdpzoot subscribers load`` and ``xdpzoot
blocklist load``, run as processes: the benchmark never writes a subscriber or list map
layout of its own, so it keeps working when the layout changes), and configured with
``loader.configure`` from ``maps/xdpzoot.toml`` (OP25B, IP53B, rates, the scan sketch on):

* 1M scale: 1,024 dynamic IPv4 pools /22 in 100.64.0.0/10 (1,048,576 addresses), 100,000
  static IPv4 hosts in 198.18.0.0/15, 1,000 dynamic IPv6 pools /56 and 10,000 static IPv6
  /64 in 2001:db8::/32; a 1,000,000-entry CSAM list: 4,000 IPv6 entries (half /128, half
  /48../64), of the rest 80% IPv4 hosts and 20% IPv4 prefixes /20../31 weighted to the
  long end, random over public unicast space;
* 10k scale: the same generation scaled by 1/100 (10 pools, 1,000 static hosts, ...,
  a 10,000-entry list).

Per scale, a set of distinct packets (default 65,536): upstream TCP :443 from pool and
static addresses to random unlisted IPv4 destinations (pass), TCP :25 from pool addresses
(OP25B drop), TCP :443 to listed addresses or into listed prefixes (CSAM drop), IPv6
upstream (pass), downstream TCP to subscriber addresses (pass) and UDP to pool addresses'
:53 (IP53B drop). Every packet is first checked: its class's counter moves by exactly its
packets (like bench.py's ``check``), every return code is the expected one.

Timing: BPF_PROG_TEST_RUN with repeat=1, each packet once per round. All programs are
interleaved in blocks of 256 calls, and each program walks its packets from its own offset
(rotated by 1/P of the set), so that two programs never touch the same packet within
about a whole set of other calls: the entries a packet needs are out of the cache, as in
production. Programs timed together: the floor (``xz_xdp_empty``), the data plane at both
scales, the minimal reference program (``bench/ref_cold.c``: two IPv4 LPM lookups) at
both scales, and for the breakdown the probes of ``bench/probes.py`` and the data plane
(at both scales) with switches off (control word written by ``Maps.set_control_flags`` /
``set_control_params`` before each block that needs it). The HOT column: a few packets
per class, each repeated 1,000 times in one call (the kernel's mean).

Usage: bench_cold.py [--quick] [--json] [--packets N] [--rounds N] [--scale F] [--cpu N]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import probes  # noqa: E402

from bench import bpffs, counted, cpu_times, size_label  # noqa: E402  (bench.py's)
from xdpzoot.config import load_config  # noqa: E402
from xdpzoot.dataplane import kernel, loader, schema  # noqa: E402

CONFIG = ROOT / "maps" / "xdpzoot.toml"
REF_C = ROOT / "bench" / "ref_cold.c"
C = schema.C
XDP_ABORTED, XDP_DROP, XDP_PASS = 0, 1, 2
RET = {"pass": XDP_PASS, "drop": XDP_DROP}
BLOCK = 256            # calls per program before the next program's turn
HOT_REPEAT = 1_000
HOT_PACKETS = 8        # per class and program
BIG, SMALL = "big", "small"   # the two scales (labels: by list size, e.g. 1M, 10k)
SMALL_FACTOR = 0.01    # the small scale: the big one's generation scaled by this

# ---- the address plan ---------------------------------------------------------------------
CGN = int(ipaddress.IPv4Address("100.64.0.0"))      # dynamic pools: /22s in 100.64.0.0/10
STATIC4 = int(ipaddress.IPv4Address("198.18.0.0"))  # static hosts in 198.18.0.0/15
V6SUB = int(ipaddress.IPv6Address("2001:db8::"))    # IPv6 subscribers in 2001:db8::/32
V6POOLS_AT, V6STATIC_AT = 0x0000, 0x8000            # /56 pools below, /64 statics above
RELAY = int(ipaddress.IPv4Address("192.0.2.0"))     # op25b.allow lives in 192.0.2.0/24
# Where no generated list entry or destination goes: ours, private, loopback, multicast.
EXCLUDED4 = [(CGN, 10), (STATIC4, 15), (RELAY, 24), (0x0A000000, 8), (0x7F000000, 8),
             (0xAC100000, 12), (0xC0A80000, 16), (0, 8)]
V4_PLENS = {20: 1, 21: 1, 22: 2, 23: 2, 24: 10, 25: 3, 26: 4, 27: 5, 28: 6, 29: 8, 30: 8,
            31: 5}
V6_PLENS = {48: 4, 52: 1, 56: 2, 60: 1, 64: 2}
POOL_RATE, STATIC_RATE = (20_000, 100_000), (100_000, 1_000_000)   # kbit/s up, down

# Path classes: (label, role, expected verdict, expected reason, share of the packets)
CLASSES = {
    "up_pass": ("upstream pass (v4 TCP :443)", "access", "pass", "ok", 0.45),
    "op25b": ("OP25B drop (dyn -> TCP :25)", "access", "drop", "op25b", 0.07),
    "csam": ("CSAM drop (dst listed)", "access", "drop", "csam", 0.08),
    "down_pass": ("downstream pass (core -> sub)", "core", "pass", "ok", 0.22),
    "ip53b": ("IP53B drop (core UDP -> dyn :53)", "core", "drop", "ip53b", 0.08),
    "v6_pass": ("IPv6 upstream pass (TCP :443)", "access", "pass", "ok", 0.10),
}
REF_CLASSES = ("up_pass", "op25b", "csam")   # what the IPv4-only reference program sees


def log(msg: str, end: str = "\n") -> None:
    """Progress to stderr."""
    print(msg, end=end, file=sys.stderr, flush=True)


def ntoa4(n: int) -> str:
    return socket.inet_ntoa(n.to_bytes(4, "big"))


def ntoa6(n: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big"))


# ---- generated state ----------------------------------------------------------------------


@dataclass
class State:
    """One scale's subscribers and list, as numbers (for packets) and as file text."""

    name: str
    pools4: list[int]          # /22 networks
    statics4: list[int]        # hosts
    pools6: list[int]          # /56 networks
    statics6: list[int]        # /64 networks
    hosts4: set[int]           # listed IPv4 hosts
    prefixes4: set[tuple[int, int]]   # listed IPv4 (network, length)
    entries6: list[str]        # listed IPv6 entries, as text
    counts: dict[str, int] = field(default_factory=dict)

    def subscriber_text(self) -> str:
        rows = ["subscriber,address,type,up_kbps,down_kbps,flags"]
        up, down = POOL_RATE
        rows += [f"{1_000 + i},{ntoa4(n)}/22,dynamic,{up},{down}," for i, n in
                 enumerate(self.pools4)]
        rows += [f"{300_000 + i},{ntoa6(n)}/56,dynamic,{up},{down}," for i, n in
                 enumerate(self.pools6)]
        up, down = STATIC_RATE
        rows += [f"{2_000_000 + i},{ntoa4(a)},static,{up},{down}," for i, a in
                 enumerate(self.statics4)]
        rows += [f"{4_000_000 + i},{ntoa6(n)}/64,static,{up},{down}," for i, n in
                 enumerate(self.statics6)]
        return "\n".join(rows) + "\n"

    def csam_text(self) -> str:
        lines = ["# generated CSAM list (bench_cold.py)"]
        lines += [ntoa4(a) for a in self.hosts4]
        lines += [f"{ntoa4(n)}/{p}" for n, p in self.prefixes4]
        lines += self.entries6
        return "\n".join(lines) + "\n"

    def listed4(self, a: int) -> bool:
        """Whether the list holds IPv4 address ``a`` (host or inside a prefix)."""
        if a in self.hosts4:
            return True
        return any((a >> (32 - p) << (32 - p), p) in self.prefixes4 for p in V4_PLENS)


def _excluded4(a: int) -> bool:
    return any(a >> (32 - p) == n >> (32 - p) for n, p in EXCLUDED4) or a >= 0xE0000000


def public4(rng: random.Random) -> int:
    """A random IPv4 unicast address outside the excluded ranges."""
    while True:
        a = rng.getrandbits(32)
        if not _excluded4(a):
            return a


def n_of(factor: float, n: int) -> int:
    return max(1, round(n * factor))


def gen_state(name: str, factor: float, rng: random.Random) -> State:
    """The subscribers and the list of a scale: ``factor`` 1.0 is the 1M scale."""
    pools4 = sorted(CGN + (x << 10) for x in rng.sample(range(4096), n_of(factor, 1024)))
    statics4 = sorted(STATIC4 + x for x in rng.sample(range(1 << 17), n_of(factor, 100_000)))
    pools6 = [V6SUB + ((V6POOLS_AT + (x >> 8)) << 80) + ((x & 0xFF) << 72)
              for x in rng.sample(range(1 << 15), n_of(factor, 1_000))]
    statics6 = [V6SUB + ((V6STATIC_AT + (x >> 16)) << 80) + ((x & 0xFFFF) << 64)
                for x in rng.sample(range(1 << 23), n_of(factor, 10_000))]
    n = n_of(factor, 1_000_000)
    n6 = min(n - 1, n_of(factor, 4_000)) if n > 1 else 0
    p4 = (n - n6) // 5
    h4 = n - n6 - p4
    hosts4: set[int] = set()
    while len(hosts4) < h4:
        hosts4.add(public4(rng))
    prefixes4: set[tuple[int, int]] = set()
    plens, weights = list(V4_PLENS), list(V4_PLENS.values())
    while len(prefixes4) < p4:
        p = rng.choices(plens, weights)[0]
        a = public4(rng) >> (32 - p) << (32 - p)
        if not _excluded4(a + (1 << (32 - p)) - 1):
            prefixes4.add((a, p))
    six: set[str] = set()
    base6 = 0x2A00 << 112      # 2a00::/12: away from our 2001:db8::/32
    while len(six) < n6:
        if len(six) % 2:
            six.add(ntoa6(base6 + rng.getrandbits(112)))
        else:
            p = rng.choices(list(V6_PLENS), list(V6_PLENS.values()))[0]
            six.add(f"{ntoa6((base6 + rng.getrandbits(112)) >> (128 - p) << (128 - p))}/{p}")
    counts = {"pools4 /22": len(pools4), "dynamic v4 addresses": len(pools4) * 1024,
              "static v4 hosts": len(statics4), "pools6 /56": len(pools6),
              "static v6 /64": len(statics6), "csam v4 hosts": len(hosts4),
              "csam v4 prefixes": len(prefixes4), "csam v6": len(six)}
    return State(name, pools4, statics4, pools6, statics6, hosts4, prefixes4, sorted(six),
                 counts)


# ---- packets ------------------------------------------------------------------------------

MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
TCP, UDP = 6, 17


def _csum(b: bytes) -> int:
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _l4(proto: int, sport: int, dport: int) -> bytes:
    if proto == TCP:   # SYN, 20-byte header, 4 bytes of payload (as tests/packets.py)
        return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 8192, 0,
                           0) + b"xxxx"
    return struct.pack("!HHHH", sport, dport, 8 + 12, 0) + b"q" * 12


def frame4(src: int, dst: int, proto: int, sport: int, dport: int) -> bytes:
    """Ethernet + IPv4 + TCP/UDP, built by hand (scapy takes ~1 ms a frame)."""
    l4 = _l4(proto, sport, dport)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0,
                      src.to_bytes(4, "big"), dst.to_bytes(4, "big"))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return MAC_B + MAC_A + b"\x08\x00" + hdr + l4


def frame6(src: int, dst: int, proto: int, sport: int, dport: int) -> bytes:
    l4 = _l4(proto, sport, dport)
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src.to_bytes(16, "big"),
                      dst.to_bytes(16, "big"))
    return MAC_B + MAC_A + b"\x86\xdd" + hdr + l4


@dataclass
class Pkt:
    cls: str
    role: str
    frame: bytes
    src: str = ""    # an upstream pass's source: "pool" address or "static" host


def source_kind(frame: bytes) -> str:
    """An IPv4 frame's source: "static" (198.18.0.0/15) or "pool" (the others)."""
    a = int.from_bytes(frame[26:30], "big")
    return "static" if a >> 17 == STATIC4 >> 17 else "pool"


def gen_packets(st: State, n: int, rng: random.Random) -> list[Pkt]:
    """``n`` distinct packets over the classes' shares, in random order."""
    def pool_addr() -> int:
        return rng.choice(st.pools4) + rng.randrange(1024)

    def sub_addr() -> int:   # pools hold ~10x the addresses; 70/30 pool/static
        return pool_addr() if rng.random() < 0.7 else rng.choice(st.statics4)

    def unlisted() -> int:
        while True:
            a = public4(rng)
            if not st.listed4(a):
                return a

    hosts, pfx = sorted(st.hosts4), sorted(st.prefixes4)

    def listed() -> int:
        if rng.random() < 0.5 or not pfx:
            return rng.choice(hosts)
        net, p = rng.choice(pfx)
        return net + rng.randrange(1 << (32 - p))

    def v6_src() -> int:
        if rng.random() < 0.5:
            return rng.choice(st.pools6) + rng.getrandbits(72)
        return rng.choice(st.statics6) + rng.getrandbits(64)

    def port() -> int:
        return rng.randrange(1024, 65536)

    make: dict[str, Callable[[], bytes]] = {
        "up_pass": lambda: frame4(sub_addr(), unlisted(), TCP, port(), 443),
        "op25b": lambda: frame4(pool_addr(), unlisted(), TCP, port(), 25),
        "csam": lambda: frame4(sub_addr(), listed(), TCP, port(), 443),
        "down_pass": lambda: frame4(unlisted(), sub_addr(), TCP, 443, port()),
        "ip53b": lambda: frame4(unlisted(), pool_addr(), UDP, port(), 53),
        "v6_pass": lambda: frame6(v6_src(), (0x2600 << 112) + rng.getrandbits(112), TCP,
                                  port(), 443),
    }
    out: list[Pkt] = []
    seen: set[bytes] = set()
    for cls, (_, role, _, _, share) in CLASSES.items():
        want = max(1, round(n * share))
        got = 0
        while got < want:
            f = make[cls]()
            if f not in seen:
                seen.add(f)
                out.append(Pkt(cls, role, f, source_kind(f) if cls == "up_pass" else ""))
                got += 1
    rng.shuffle(out)
    return out


# ---- instances ----------------------------------------------------------------------------


def write_private(path: Path, text: str) -> None:
    """A file only root may read (the CSAM list is confidential)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def cli(cfg: Path, pin: str, *args: str) -> dict:
    """The real CLI as a process (this tree's source), --json output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    argv = [sys.executable, "-m", "xdpzoot", "--config", str(cfg), "--pin-dir", pin,
            *args, "--json"]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        raise RuntimeError(f"xdpzoot {' '.join(args)}: exit {r.returncode}: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


@dataclass
class Instance:
    """One data plane (pin directory) with its state, and the reference program."""

    name: str
    pin: str
    bpf: object
    maps: kernel.Maps
    fds: dict[str, int]
    control: dict[str, int]         # the configured flags and csam word
    ref_bpf: object = None
    ref_fd: int = -1
    probes: dict[str, int] = field(default_factory=dict)
    probe_bpf: object = None
    current: tuple[int, int] = (0, 0)
    load_s: dict[str, float] = field(default_factory=dict)

    def set_control(self, flags: int, csam_word: int) -> None:
        """The switches and the CSAM word, through the project's own setters; skipped
        when already in force."""
        if self.current != (flags, csam_word):
            self.maps.set_control_flags(flags)
            self.maps.set_control_params(csam=csam_word)
            self.current = (flags, csam_word)

    def restore(self) -> None:
        self.set_control(self.control["flags"], self.control["csam"])


def build(root: str, tmp: Path, st: State, cfg_path: Path, with_probes: bool) -> Instance:
    """Load the state through the CLI, compile and load the data plane on the same pins,
    configure it from the config; then the reference program with the same pools and
    list."""
    # The example config, with room for the state of every IPv4 pool address (the pools
    # have a rate) and the IPv6 packets' addresses.
    own = tmp / f"xdpzoot-{st.name}.toml"
    own.write_text(re.sub(r"(?m)^pool_addresses = \d+", "pool_addresses = "
                          f"{1024 * len(st.pools4) + 65536}", cfg_path.read_text()))
    cfg_path = own
    cfg = load_config(str(cfg_path))
    pin = os.path.join(root, st.name)
    subs, lst = tmp / f"subscribers-{st.name}.csv", tmp / f"csam-{st.name}.txt"
    subs.write_text(st.subscriber_text())
    write_private(lst, st.csam_text())
    times = {}
    t0 = time.monotonic()
    r = cli(cfg_path, pin, "subscribers", "load", str(subs))
    times["subscribers_load_s"] = time.monotonic() - t0
    want = (len(st.pools4) + len(st.statics4) + len(st.pools6) + len(st.statics6))
    if r["rows"] != want:
        raise RuntimeError(f"{st.name}: the CLI read {r['rows']} subscriber rows, not {want}")
    t0 = time.monotonic()
    r = cli(cfg_path, pin, "blocklist", "load", str(lst))
    times["blocklist_load_s"] = time.monotonic() - t0
    n_list = len(st.hosts4) + len(st.prefixes4) + len(st.entries6)
    if r["added"] != n_list:
        raise RuntimeError(f"{st.name}: the CLI loaded {r['added']} list entries, not {n_list}")
    log(f"  {st.name}: {want:,} subscriber rows in {times['subscribers_load_s']:.1f} s, "
        f"{n_list:,} list entries in {times['blocklist_load_s']:.1f} s (CLI)")
    t0 = time.monotonic()
    bpf = kernel.compile_bpf(pin, cfg.defines())
    fds = {"empty": kernel.load_named(bpf, "xz_xdp_empty"),
           "access": kernel.load_program(bpf, "xdp", "access"),
           "core": kernel.load_program(bpf, "xdp", "core")}
    maps = kernel.Maps(pin)
    loader.configure(maps, cfg)
    ctl = maps.control_params()
    inst = Instance(st.name, pin, bpf, maps, fds, {"flags": ctl["flags"], "csam": ctl["csam"]},
                    current=(ctl["flags"], ctl["csam"]), load_s=times)
    if with_probes:
        inst.probe_bpf = probes.compile_probes(pin, cfg.defines())
        inst.probes = probes.load_probes(inst.probe_bpf)
    inst.ref_bpf, inst.ref_fd = load_ref(st)
    times["compile_s"] = time.monotonic() - t0
    return inst


def load_ref(st: State):
    """bench/ref_cold.c compiled, its two tries filled from the state (its own 8-byte
    layout, batch writes)."""
    from bcc import BPF

    bpf = BPF(src_file=str(REF_C).encode(), cflags=["-Werror", "-Wall"])
    fd = bpf.load_func(b"ref_cold", BPF.XDP).fd
    key = struct.Struct("=I4s")
    one = struct.pack("=I", 1)
    pools = [key.pack(22, n.to_bytes(4, "big")) for n in st.pools4]
    lst = [key.pack(32, a.to_bytes(4, "big")) for a in st.hosts4]
    lst += [key.pack(p, n.to_bytes(4, "big")) for n, p in st.prefixes4]
    for name, keys in ((b"ref_pools", pools), (b"ref_csam", lst)):
        with kernel.PinnedMap(name.decode(), fd=bpf[name].map_fd) as m:
            m.update_items(keys, one * len(keys))
    return bpf, fd


# ---- checks -------------------------------------------------------------------------------


def expected(cls: str) -> tuple[str, str, str]:
    _, role, verdict, reason, _ = CLASSES[cls]
    return role, verdict, reason


def check_instance(inst: Instance, pkts: list[Pkt], flags: int | None = None,
                   csam_word: int | None = None, expect: Callable[[str], tuple] = expected,
                   ) -> None:
    """Run every packet once, class by class: each class must move exactly its own
    counter (role, verdict, reason) by its number of packets, and return its verdict."""
    inst.set_control(inst.control["flags"] if flags is None else flags,
                     inst.control["csam"] if csam_word is None else csam_word)
    try:
        by_cls: dict[str, list[Pkt]] = {}
        for p in pkts:
            by_cls.setdefault(p.cls, []).append(p)
        for cls, ps in by_cls.items():
            want = expect(cls)
            before = counted(inst)
            bad = [r for p in ps
                   if (r := kernel.test_run(inst.fds[p.role], p.frame, 1).retval)
                   != RET[want[1]]]
            after = counted(inst)
            moved = {k: after[k] - before.get(k, 0) for k in after
                     if after[k] != before.get(k, 0)}
            if moved != {want: len(ps)} or bad:
                raise RuntimeError(f"{inst.name} {cls}: expected {want} x {len(ps)}, counters "
                                   f"moved {moved}, {len(bad)} wrong return codes")
    finally:
        inst.restore()


def check_ref(inst: Instance, pkts: list[Pkt]) -> None:
    """The reference program's return code for each of its classes."""
    for p in pkts:
        r = kernel.test_run(inst.ref_fd, p.frame, 1).retval
        if r != RET[CLASSES[p.cls][2]]:
            raise RuntimeError(f"ref {inst.name} {p.cls}: retval {r}")


# ---- timing -------------------------------------------------------------------------------


@dataclass
class Prog:
    """One timed program: what it runs on, and the control word it needs (if any)."""

    key: str
    inst: Instance
    fd_of: Callable[[Pkt], int]
    pkts: list[Pkt]
    control: tuple[int, int] | None = None
    times: list[int] = field(default_factory=list)   # ns, aligned with classes
    classes: list[str] = field(default_factory=list)
    srcs: list[str] = field(default_factory=list)     # Pkt.src, aligned with times
    hot: dict[str, list[int]] = field(default_factory=dict)


def run_cold(progs: list[Prog], rounds: int, seed: int = 1) -> None:
    """Each program runs each of its packets once per round, repeat=1; programs take
    turns of BLOCK calls, each walking its packets from its own offset, in a new random
    order every cycle of turns (so that no program always follows the same one)."""
    rng = random.Random(seed)
    n = len(progs)
    offsets = [len(p.pkts) * i // n for i, p in enumerate(progs)]
    for rnd in range(rounds):
        t0 = time.monotonic()
        pos = [0] * n
        live = list(range(n))
        while live:
            for i in rng.sample(live, len(live)):
                pr = progs[i]
                if pr.control:
                    pr.inst.set_control(*pr.control)
                m = len(pr.pkts)
                stop = min(pos[i] + BLOCK, m)
                for j in range(pos[i], stop):
                    p = pr.pkts[(offsets[i] + j) % m]
                    pr.times.append(kernel.test_run(pr.fd_of(p), p.frame, 1).duration_ns)
                    pr.classes.append(p.cls)
                    pr.srcs.append(p.src)
                pos[i] = stop
                if stop == m:
                    live.remove(i)
        calls = sum(len(p.pkts) for p in progs)
        log(f"  round {rnd + 1}/{rounds}: {calls:,} calls in {time.monotonic() - t0:.1f} s")
    for pr in progs:
        if pr.control:
            pr.inst.restore()


def run_hot(progs: list[Prog], runs: int = 3) -> None:
    """HOT_PACKETS packets per class, each repeated HOT_REPEAT times in one call (the
    kernel's mean per run); programs interleaved packet by packet."""
    picks = {pr.key: {} for pr in progs}
    for pr in progs:
        for p in pr.pkts:
            lst = picks[pr.key].setdefault(p.cls, [])
            if len(lst) < HOT_PACKETS:
                lst.append(p)
    for _ in range(runs):
        for k in range(HOT_PACKETS):
            for pr in progs:
                if pr.control:
                    pr.inst.set_control(*pr.control)
                for cls, lst in picks[pr.key].items():
                    if k < len(lst):
                        p = lst[k]
                        r = kernel.test_run(pr.fd_of(p), p.frame, HOT_REPEAT)
                        pr.hot.setdefault(cls, []).append(r.duration_ns)
    for pr in progs:
        if pr.control:
            pr.inst.restore()


def stats_of(xs: list[int]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)
    return {"n": len(s), "median": float(statistics.median(s)), "mean": statistics.fmean(s),
            "p10": float(s[len(s) // 10]), "p90": float(s[len(s) * 9 // 10]),
            "p99": float(s[len(s) * 99 // 100])}


def summarise(pr: Prog) -> dict:
    """Per class (and "all"; an upstream pass also by source, "up_pass:pool" and
    "up_pass:static"): cold figures, and the hot median."""
    by: dict[str, list[int]] = {}
    for c, src, t in zip(pr.classes, pr.srcs, pr.times, strict=True):
        by.setdefault(c, []).append(t)
        if src:
            by.setdefault(f"{c}:{src}", []).append(t)
    out = {c: {"cold": stats_of(v)} for c, v in by.items()}
    out["all"] = {"cold": stats_of(pr.times)}
    for c, v in pr.hot.items():
        out.setdefault(c, {})["hot"] = float(statistics.median(v))
    allhot = [t for v in pr.hot.values() for t in v]
    if allhot:
        out["all"]["hot"] = float(statistics.median(allhot))
    return out


# ---- the benchmark ------------------------------------------------------------------------


def breakdown_controls(inst: Instance) -> dict[str, tuple[int, int]]:
    """Control words of the pipeline rows of the breakdown, features switched on one at a
    time (the config's other switches, e.g. IPv6 variants, go with their feature)."""
    f, cw = inst.control["flags"], inst.control["csam"]
    rules = (C["XZ_C_OP25B"] | C["XZ_C_OP25B_V6"] | C["XZ_C_OP25B_REJECT"] | C["XZ_C_IP53B"]
             | C["XZ_C_IP53B_V6"] | C["XZ_C_IP53B_TCP"])
    bare = f & ~rules & ~C["XZ_C_RATES"] & ~C.get("XZ_C_SCANS", 0)
    out = {"bd_bypass": (C["XZ_C_LOADED"] | C["XZ_C_BYPASS"], cw),
           "bd_class": (bare, 0),
           "bd_rules": (bare | (f & rules), 0),
           "bd_csam": (bare | (f & rules), cw)}
    # The list's two lookups apart, by the word's own "what the list holds" bits (when
    # the header still has them: the list's layout is being changed).
    if "XZ_CSAM_HOSTS" in C and "XZ_CSAM_PREFIXES" in C:
        out["bd_csam_hash"] = (bare | (f & rules), cw & ~C["XZ_CSAM_PREFIXES"])
        out["bd_csam_trie"] = (bare | (f & rules), cw & ~C["XZ_CSAM_HOSTS"])
    if f & C.get("XZ_C_SCANS", 0):   # the scan sketch last: every packet here is a SYN
        out["bd_rates"] = (f & ~C["XZ_C_SCANS"], cw)
    return out


BREAKDOWN = [   # key, label, what the row adds
    ("floor", "floor: xz_xdp_empty (entry, exit, clock read)", ""),
    ("xzb_parse", "probe: parse Ethernet..TCP", "parse"),
    ("xzb_parse_count", "probe: parse + control + counter", "control lookup + counter"),
    ("bd_class", "pipeline: OP25B/IP53B/rates off, no list", "source class (hash, trie)"),
    ("bd_rules", "pipeline: + OP25B/IP53B switches", "OP25B gate (+allow on :25)"),
    ("bd_csam", "pipeline: + CSAM list in force", "CSAM hash + trie lookups"),
    ("bd_rates", "pipeline: + rates", "rate state + GCRA + volume"),
    ("full_big", "pipeline: + scan sketch (config as is)",
     "the sketch (each a SYN to a new destination)"),
]
# The pipeline rows timed at the small scale too (the probes and asides at the big one only).
SMALL_ROWS = ("bd_class", "bd_rules", "bd_csam", "bd_rates")


def small_key(key: str) -> str:
    """The small scale's program of a breakdown row."""
    return "full_small" if key == "full_big" else f"{key}_small"


BREAKDOWN_ASIDE = [
    ("bd_bypass", "pipeline, bypass on: control + counter, no parse"),
    ("xzb_parse_hash", "probe: parse + host hash lookup of the source"),
    ("xzb_parse_lpm", "probe: parse + subscriber trie lookup of the source"),
    ("xzb_parse_dir", "probe: parse + subscriber directory of the source"),
    ("xzb_parse_class", "probe: parse + source class (directory, then hash or trie)"),
    ("xzb_mem_2m", "probe: parse + a random load, 2 MiB array"),
    ("xzb_mem_128m", "probe: parse + a random load, 128 MiB array"),
    ("bd_csam_hash", "pipeline: + OP25B/IP53B + list's host hash only"),
    ("bd_csam_trie", "pipeline: + OP25B/IP53B + list's prefix trie only"),
]


def bench(args: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    rng = random.Random(args.seed)
    doc: dict = {"config": {"kernel": platform.release(), "cpu": cpu, "packets": args.packets,
                            "rounds": args.rounds, "scale": args.scale, "block": BLOCK,
                            "hot_repeat": HOT_REPEAT, "config_file": str(CONFIG),
                            "quick": args.quick}}
    tmp = Path(tempfile.mkdtemp(prefix="xdpzoot-cold-", dir="/run"))
    try:
        with bpffs() as root:
            states = {BIG: None, SMALL: None}
            insts: dict[str, Instance] = {}
            pkts: dict[str, list[Pkt]] = {}
            for name, factor in ((BIG, args.scale), (SMALL, args.scale * SMALL_FACTOR)):
                log(f"{name} scale (x{factor:g}): generating ...")
                t0 = time.monotonic()
                st = gen_state(name, factor, rng)
                pkts[name] = gen_packets(st, args.packets, rng)
                log(f"  generated in {time.monotonic() - t0:.1f} s: " + ", ".join(
                    f"{v:,} {k}" for k, v in st.counts.items()))
                insts[name] = build(root, tmp, st, CONFIG, with_probes=name == BIG)
                states[name] = st.counts
                doc.setdefault("labels", {})[name] = size_label(
                    len(st.hosts4) + len(st.prefixes4) + len(st.entries6))
                doc.setdefault("load", {})[name] = insts[name].load_s
                del st
            doc["state"] = states
            doc["packet_counts"] = {n: {c: sum(p.cls == c for p in ps) for c in CLASSES}
                                    for n, ps in pkts.items()}
            os.sched_setaffinity(0, {cpu})
            log(f"pinned to CPU {cpu}; checking every packet's path ...")
            for name, inst in insts.items():
                check_instance(inst, pkts[name])
                check_ref(inst, [p for p in pkts[name] if p.cls in REF_CLASSES])
            big = insts[BIG]
            small = insts[SMALL]
            up = [p for p in pkts[BIG] if p.cls == "up_pass"]
            up_small = [p for p in pkts[SMALL] if p.cls == "up_pass"]
            bdc = breakdown_controls(big)
            # the breakdown's rows at the small scale too: what the big one adds, step by step
            bdc_small = {k: v for k, v in breakdown_controls(small).items() if k in SMALL_ROWS}
            for inst, ups, rows in ((big, up, bdc), (small, up_small, bdc_small)):
                for key, (fl, cw) in rows.items():
                    reason = "bypass" if key == "bd_bypass" else "ok"
                    check_instance(inst, ups, fl, cw, lambda c, r=reason: ("access", "pass", r))
            for name, fd in big.probes.items():
                if any(kernel.test_run(fd, p.frame, 1).retval not in (XDP_DROP, XDP_PASS)
                       for p in up[:256]):
                    raise RuntimeError(f"probe {name} aborted")
            log("  all paths as expected")

            def by_role(inst: Instance) -> Callable[[Pkt], int]:
                return lambda p: inst.fds[p.role]

            def fixed(fd: int) -> Callable[[Pkt], int]:
                return lambda p: fd

            progs = [Prog("floor", big, fixed(big.fds["empty"]), pkts[BIG])]
            for name, inst in insts.items():
                progs.append(Prog(f"full_{'big' if name == BIG else 'small'}", inst,
                                  by_role(inst), pkts[name],
                                  (inst.control["flags"], inst.control["csam"])))
                progs.append(Prog(f"ref_{'big' if name == BIG else 'small'}", inst,
                                  fixed(inst.ref_fd),
                                  [p for p in pkts[name] if p.cls in REF_CLASSES]))
            for key, ctl in bdc.items():
                progs.append(Prog(key, big, by_role(big), up, ctl))
            for key, ctl in bdc_small.items():
                progs.append(Prog(small_key(key), small, by_role(small), up_small, ctl))
            for name, fd in big.probes.items():
                progs.append(Prog(name, big, fixed(fd), up))
            total = sum(len(p.pkts) for p in progs)
            log(f"cold: {len(progs)} programs, {total:,} calls a round, 1 warm-up + "
                f"{args.rounds} rounds ...")
            warm = [Prog(p.key, p.inst, p.fd_of, p.pkts, p.control) for p in progs]
            run_cold(warm, 1)   # LRU inserts (pool state), page faults: not timed
            t0, busy0 = time.monotonic(), cpu_times(cpu)
            run_cold(progs, args.rounds)
            busy1 = cpu_times(cpu)
            doc["cold_s"] = time.monotonic() - t0
            doc["other_cpus_busy_pct"] = round(100 * (busy1[0] - busy0[0])
                                               / max(busy1[1] - busy0[1], 1))
            doc["loadavg"] = os.getloadavg()[0]
            doc["per_round"] = per_round(progs, args.rounds)
            log("hot: the same packet repeated ...")
            run_hot(progs)
            doc["progs"] = {p.key: summarise(p) for p in progs}
            # the counters again: nothing took another path while timed
            doc["counters_big"] = {"/".join(k): v for k, v in counted(big).items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc["goals"] = goals(doc)
    doc["elapsed_s"] = time.monotonic() - t_start
    return doc


def per_round(progs: list[Prog], rounds: int) -> dict[str, list[float]]:
    """The goals' ratios round by round (each round's medians, net of its floor): how
    far they move with whatever else the machine is doing."""
    by = {p.key: p for p in progs}

    def med(key: str, r: int, cls: str | None) -> float:
        p = by[key]
        n = len(p.pkts)
        xs = [t for t, c in zip(p.times[r * n:(r + 1) * n], p.classes[r * n:(r + 1) * n],
                                strict=True) if cls is None or c == cls]
        return float(statistics.median(xs))

    out: dict[str, list[float]] = {"scale_ratio": [], "ref_ratio": []}
    for r in range(rounds):
        fl = med("floor", r, None)
        big, small = med("full_big", r, "up_pass") - fl, med("full_small", r, "up_pass") - fl
        out["scale_ratio"].append(big / small)
        out["ref_ratio"].append(big / (med("ref_big", r, "up_pass") - fl))
    return out


def net(doc: dict, key: str, cls: str, what: str = "median") -> float:
    """Cold figure of a program and class minus the floor's (the floor over all its
    packets: its cost does not depend on the packet)."""
    return (doc["progs"][key][cls]["cold"][what]
            - doc["progs"]["floor"]["all"]["cold"][what])


def net_hot(doc: dict, key: str, cls: str) -> float:
    return doc["progs"][key][cls]["hot"] - doc["progs"]["floor"]["all"]["hot"]


def goals(doc: dict) -> dict:
    big, small = net(doc, "full_big", "up_pass"), net(doc, "full_small", "up_pass")
    ref = net(doc, "ref_big", "up_pass")
    return {"scale_ratio": big / small, "scale_ok": big / small <= 1.5,
            "ref_ratio": big / ref, "ref_ok": big / ref <= 2.0,
            "scale_ratio_raw": doc["progs"]["full_big"]["up_pass"]["cold"]["median"]
            / doc["progs"]["full_small"]["up_pass"]["cold"]["median"],
            "ref_ratio_raw": doc["progs"]["full_big"]["up_pass"]["cold"]["median"]
            / doc["progs"]["ref_big"]["up_pass"]["cold"]["median"]}


def report(doc: dict) -> str:
    cfg = doc["config"]
    pr = doc["progs"]
    fl = pr["floor"]["all"]
    out = [
        f"xdpzoot cold-cache benchmark: BPF_PROG_TEST_RUN (XDP), kernel {cfg['kernel']}, "
        f"CPU {cfg['cpu']}; {cfg['rounds']} rounds x every packet once (repeat=1), "
        f"after a warm-up round",
        "state (loaded by the CLI): " + "; ".join(
            f"{doc['labels'][n]}: " + ", ".join(f"{v:,} {k}" for k, v in s.items())
            for n, s in doc["state"].items()),
        f"config {cfg['config_file']} (OP25B, IP53B, rates, scan sketch on; "
        "limits.pool_addresses sized "
        f"to the pools); programs interleaved in blocks of {cfg['block']} calls, rotated "
        "offsets",
        "",
        f"floor, xz_xdp_empty: cold median {fl['cold']['median']:.0f} ns, mean "
        f"{fl['cold']['mean']:.0f} ns (p90 {fl['cold']['p90']:.0f}); hot "
        f"{fl['hot']:.1f} ns (repeat {cfg['hot_repeat']:,}). Figures below: ns per packet "
        "MINUS the floor (cold minus cold floor, hot minus hot floor).",
        "",
    ]
    big, small = doc["labels"]["big"], doc["labels"]["small"]

    def cell(cm: float, mean: float, raw: float, hot: float) -> str:
        return f" |{cm:>8.0f}{mean:>7.0f}{raw:>7.0f}{hot:>7.1f}{cm / max(hot, 1):>5.1f}"

    head = (f"{'path':<34}{'':>6}" + "".join(
        f"{' | ' + s + ' state':<36}" for s in (big, small)))
    sub = (f"{'':<34}{'pkts':>6}" + "".join(
        f" |{'cold med':>8}{'mean':>7}{'raw':>7}{'HOT':>7}{'c/h':>5}" for _ in (0, 1)))
    out += [head, sub, "-" * len(sub)]
    rows = [(c, lbl) for c, (lbl, *_rest) in CLASSES.items()] + [("all", "all packets")]
    for c, label in rows:
        cells = []
        n = ""
        for key in ("full_big", "full_small"):
            s = pr[key].get(c)
            if not s:
                cells.append(f" |{'':>34}")
                continue
            n = s["cold"]["n"]
            cm, cmean = net(doc, key, c), net(doc, key, c, "mean")
            h = net_hot(doc, key, c)
            cells.append(cell(cm, cmean, s["cold"]["median"], h))
        n = (n // cfg["rounds"]) if n else ""
        out.append(f"{label:<34}{n:>6}" + "".join(cells))
        if c == "up_pass":   # by source: what the median is made of
            for src, what in (("pool", "pool addresses"), ("static", "static hosts")):
                k = f"{c}:{src}"
                cells = [cell(net(doc, key, k), net(doc, key, k, "mean"),
                              pr[key][k]["cold"]["median"], net_hot(doc, key, c))
                         for key in ("full_big", "full_small")]
                n = pr["full_big"][k]["cold"]["n"] // cfg["rounds"]
                out.append(f"{'  from ' + what:<34}{n:>6}" + "".join(cells))
    out += ["", "minimal reference program (bench/ref_cold.c: Eth+IPv4, pool trie, :25, "
            "list trie), same packets, same pools and list:"]
    for c in REF_CLASSES:
        lbl = CLASSES[c][0]
        cells = []
        for key in ("ref_big", "ref_small"):
            s = pr[key][c]
            cm = net(doc, key, c)
            cells.append(cell(cm, net(doc, key, c, "mean"), s["cold"]["median"],
                              net_hot(doc, key, c)))
        out.append(f"{'ref: ' + lbl:<34}{'':>6}" + "".join(cells))
    g = doc["goals"]
    out += ["", f"where the cold time goes: {big} state, the upstream pass packets "
            f"({pr['full_big']['up_pass']['cold']['n'] // cfg['rounds']:,}), features on "
            f"one at a time (ns minus floor; step = this row - the row above; {small}: the "
            "same rows at the small scale)",
            f"{'':<52}{'cold med':>9}{'step':>7}{'mean':>7}{'HOT':>7}{'step':>7}"
            f"{small + ' med':>10}{'step':>7}"]
    prev = prev_h = prev_s = 0.0
    for key, label, adds in BREAKDOWN:
        if key not in pr:
            continue
        cls = "all" if key == "floor" else "up_pass"
        if key == "floor":
            out.append(f"{label:<52}{fl['cold']['median']:>9.0f}{'':>7}"
                       f"{fl['cold']['mean']:>7.0f}{fl['hot']:>7.1f}   (raw)")
            continue
        cm, h = net(doc, key, cls), net_hot(doc, key, cls)
        sk = small_key(key)
        cs = net(doc, sk, cls) if sk in pr else None
        small_cells = f"{cs:>10.0f}{cs - prev_s:>+7.0f}" if cs is not None else f"{'':>17}"
        out.append(f"{label:<52}{cm:>9.0f}{cm - prev:>+7.0f}{net(doc, key, cls, 'mean'):>7.0f}"
                   f"{h:>7.1f}{h - prev_h:>+7.1f}{small_cells}  {adds}")
        prev, prev_h, prev_s = cm, h, cs if cs is not None else prev_s
    out.append("  aside:")
    for key, label in BREAKDOWN_ASIDE:
        if key not in pr:
            continue
        out.append(f"  {label:<50}{net(doc, key, 'up_pass'):>9.0f}{'':>7}"
                   f"{net(doc, key, 'up_pass', 'mean'):>7.0f}{net_hot(doc, key, 'up_pass'):>7.1f}")

    def ratio(c: str) -> float:
        return net(doc, "full_big", c) / net(doc, "full_small", c)

    parse = net(doc, "xzb_parse", "up_pass")
    mem_small, mem_big = (net(doc, k, "up_pass") - parse for k in ("xzb_mem_2m", "xzb_mem_128m"))

    def pm(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    def rng_of(xs: list[float]) -> str:
        return f"{min(xs):.2f}..{max(xs):.2f}"

    out += ["",
            f"goal: cold pass path {big} / {small} <= 1.5x: {g['scale_ratio']:.2f}  "
            f"{pm(g['scale_ok'])}  (net of floor; raw {g['scale_ratio_raw']:.2f}; rounds "
            f"{rng_of(doc['per_round']['scale_ratio'])})",
            f"goal: cold pass path xdpzoot / minimal program <= 2x ({big}): "
            f"{g['ref_ratio']:.2f}  {pm(g['ref_ok'])}  (net of floor; raw "
            f"{g['ref_ratio_raw']:.2f}; rounds {rng_of(doc['per_round']['ref_ratio'])})",
            f"  minimal program alone, {big} / {small}: "
            f"{net(doc, 'ref_big', 'up_pass') / net(doc, 'ref_small', 'up_pass'):.2f}",
            f"  by source, {big} / {small}: pool addresses {ratio('up_pass:pool'):.2f}, "
            f"static hosts {ratio('up_pass:static'):.2f}",
            f"  this machine's memory: a random load costs {mem_small:.0f} ns in a 2 MiB "
            f"array, {mem_big:.0f} in a 128 MiB one ({mem_big / mem_small:.2f}x; net of parse "
            "and floor); the rate state an upstream pass reads lies in 128 MiB at 1M, in "
            "~1 MiB at 10k",
            f"other CPUs busy during the timed rounds: {doc['other_cpus_busy_pct']}% "
            f"(load average {doc['loadavg']:.1f}; a shared machine moves cold figures by "
            "~20% between runs, the ratios less)",
            "",
            "load (CLI processes): " + "; ".join(
                f"{doc['labels'][n]}: subscribers {v['subscribers_load_s']:.1f} s, list "
                f"{v['blocklist_load_s']:.1f} s, compile+load {v['compile_s']:.1f} s"
                for n, v in doc["load"].items()),
            f"timed cold rounds {doc['cold_s']:.0f} s; total run time {doc['elapsed_s']:.0f} s"]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="development: 1/20 of the scale, 8k packets, 2 rounds")
    p.add_argument("--json", action="store_true", help="also print a JSON document")
    p.add_argument("--packets", type=int, help="packets per scale (default 65536)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 3)")
    p.add_argument("--scale", type=float, help="big scale factor (default 1.0: 1M)")
    p.add_argument("--cpu", type=int, help="CPU to pin to (default: the last allowed)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    a.packets = a.packets or (8_192 if a.quick else 65_536)
    a.rounds = a.rounds or (2 if a.quick else 3)
    a.scale = a.scale or (0.05 if a.quick else 1.0)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("bench_cold.py needs root (BPF and mount)")
        return 1
    doc = bench(args)
    print(report(doc))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
