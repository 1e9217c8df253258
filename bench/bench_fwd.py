"""Forwarding lab benchmark: routers side by side in one run, packets per second through a
router namespace with OP25B and the CSAM list, and the router program's cost per packet.

Topology, in namespaces of our own (``xzfb<hex>-gen/-rtr/-snk``, deleted at the end)::

    gen  <veth>  rtr  <veth>  snk
    192.0.2.1    192.0.2.254 / 198.51.100.1    198.51.100.2

- gen: an XDP program (bench/fwd_gen.c) run by BPF_PROG_TEST_RUN with
  BPF_F_TEST_XDP_LIVE_FRAMES, ingress ifindex = gen's veth, returning XDP_TX: every frame
  (64 bytes, Eth/IPv4/TCP) gets a random source from the dynamic pools (or a static host) and
  a random unicast destination. Mix "forward": TCP to 443, destinations not on the list (a
  random destination lands in a listed prefix for ~0.02% of frames), ``--syn-percent`` of
  them SYNs (100 by default), the rest ACKs. Mix "drop": half TCP SYNs to 25 from the pools,
  half to addresses on the CSAM list.
- rtr: the router under test, its default route towards snk (static neighbours everywhere).
- snk: an XDP program counting and dropping (a per-CPU counter: the sink count).

Routers: plain Linux forwarding; nftables with sets; iptables (legacy xtables) with ipset
hash:net sets; a minimal two-lookup XDP program (bench/ref_xdp.c); xdpzoot at XDP (native) and
at TC, attached by this checkout's CLI; xdpzoot with ``[dataplane] fast_path = true`` at
XDP and at TC when the config accepts it. Every router gets the same 1,024 /22 pools, static
hosts inside them (exempt from OP25B) and the same CSAM list (80% addresses, 20% prefixes).
Named with
--only only: xdpzoot without a list (what the list costs), and the XDP floor
(bench/floor_xdp.c: reads the frame, looks nothing up, returns the verdict the mix wants):
the most any XDP program gets in this lab, printed beside each xdpzoot-xdp goal; and the
floor after 1 or 2 dependent random reads of an array (xdp-floor-miss1-4m, ...-miss2-32m; sizes
128k, 4m, 32m, 128m): the price of one cold lookup in a structure of that size here; and the
floor after work that touches no memory (xdp-floor-spin48/96/144: dependent multiplies;
xdp-floor-code50/150: four chains of ALU steps, more code for the time): what a nanosecond of
a program's own time costs a frame here.

Each router and mix runs a ladder of offered loads (paced test_run batches, each step bounded
in frames and seconds). Processed = (sink count + the router's own drop counters) per second
of sending; the figure is the best step of the ladder, which runs with the kernel's BPF
stats off (kernel.bpf_stats_enabled costs every program run two clock reads, ~36 ns here, that
no router in production pays). ns/packet is the router program's run_time_ns / run_cnt from
those stats, switched on for one more step at the best step's offered load (its processed
rate is kept as ``stats_step``; the setting is restored afterwards); the netfilter routers run
no program of their own (their XDP_PASS stub is not their cost).

Pinning: the generator (this process, during a step) on CPU 0, the router's ingress veth in
threaded NAPI mode with its kthread on CPU 1; both SCHED_FIFO (``--no-rt``: not) while measured,
because the machine may be shared and a descheduled generator or router measures the
neighbours. The sink's NAPI is a softirq raised by the router's kthread and so runs on CPU 1
too (~as much as an XDP_DROP costs per forwarded frame; on CPU 0 it would wait behind each
whole test_run call of the generator, which does not yield, and its ring of 256 would drop).

Caveats: veth, not a NIC (no DMA, no driver ring: XDP on veth reads from a ptr_ring of 256
frames, and frames that find it full are the loss, not counted as processed); one router CPU;
each test_run call of the generator costs ~25 ms to set up, in which nothing is sent (part of
the step's time); TCP checksums are not valid (a router does not check them); the figures
move with whatever else the machine runs.

Usage: bench_fwd.py [--json] [--quick] [--csam N] [--pools N] [--statics N]
                    [--seconds S] [--rates 250k,500k,...,0] [--only NAME,...] [--no-rt]
                    [--syn-percent P] [--rounds N] [--mixes forward,drop]
                    [--xdpzoot-extra TOML]
Examples: make bench-fwd BENCH_ARGS="--quick --only plain,xdpzoot-xdp"
          make bench-fwd BENCH_ARGS="--rounds 3 --syn-percent 2 --only plain,xdpzoot-xdp"
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import ipaddress
import json
import os
import platform
import random
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))

from bench import bpffs, log  # noqa: E402  (bench/ is on the path: it is this folder)
from xdpzoot.dataplane import kernel  # noqa: E402
from xdpzoot.lab import NetnsError, in_netns, netns_run  # noqa: E402

POOL_BASE = int(ipaddress.IPv4Address("100.64.0.0"))
POOL_BITS = 10                    # a /22 pool: 1,024 addresses
MAX_POOLS = 4096                  # 100.64.0.0/10 holds 4,096 /22
GEN_ADDR, RTR_IN_ADDR = "192.0.2.1", "192.0.2.254"
RTR_OUT_ADDR, SNK_ADDR = "198.51.100.1", "198.51.100.2"
# First octets a destination or a list entry never has: 0, 100 (pools), 127, 192/198/203
# (the links' test nets live there), 224 and up. Must match random_dst() in fwd_gen.c.
BAD_FIRST = {0, 100, 127, 192, 198, 203}
FRAME_LEN = 64                    # bytes in memory (the FCS is not there)
MIX_IDS = {"forward": 0, "drop": 1}
XDP_DROP, XDP_PASS = 1, 2
RATES = (250_000, 500_000, 750_000, 1_000_000, 1_500_000, 2_000_000, 0)   # 0: unpaced
QUICK_RATES = (500_000, 1_000_000, 0)
GEN_CPU, ROUTER_CPU = 0, 1
RT_PRIO = 10                      # SCHED_FIFO priority of the generator and the router kthread
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
LIVE_BATCH = 64                   # frames per flush inside one test_run (the kernel's max 256)
CALL_S = 0.25                     # a test_run call of the generator lasts about this long
CALL_ITERS_START = 65_536
CALL_ITERS_MAX = 1 << 24
DRAIN_S = 0.1                     # after a step, for the router's queues to empty

# ---- the data set ---------------------------------------------------------------------------


@dataclass
class DataSet:
    """What every router is given: pools, static hosts inside them, the CSAM list."""

    pools: list[str]                       # "100.64.0.0/22", ...
    statics: list[str]                     # host addresses inside the pools
    csam: list[str]                        # "a.b.c.d" or "a.b.c.d/len"
    listed: list[int] = field(default_factory=list)   # one address inside each entry (host order)

    @property
    def pool_span(self) -> int:
        return len(self.pools) << POOL_BITS


def random_unicast(rng: random.Random) -> int:
    """A random address (host order) whose first octet is allowed (see BAD_FIRST)."""
    while True:
        a = rng.getrandbits(32)
        if 1 <= a >> 24 <= 223 and a >> 24 not in BAD_FIRST:
            return a


def make_dataset(n_pools: int, n_statics: int, n_csam: int, seed: int = 1) -> DataSet:
    """The pools (consecutive /22 from 100.64.0.0), static hosts drawn inside them, and a
    CSAM list of ``n_csam`` distinct entries, 80% addresses and 20% prefixes /24../30."""
    if not 1 <= n_pools <= MAX_POOLS:
        raise ValueError(f"pools: 1..{MAX_POOLS}")
    rng = random.Random(seed)
    pools = [f"{ipaddress.IPv4Address(POOL_BASE + (i << POOL_BITS))}/{32 - POOL_BITS}"
             for i in range(n_pools)]
    span = n_pools << POOL_BITS
    if n_statics > span // 2:
        raise ValueError("statics: at most half the pools' addresses")
    drawn: set[int] = set()
    while len(drawn) < n_statics:
        drawn.add(POOL_BASE + rng.randrange(span))
    statics = sorted(drawn)
    entries: dict[tuple[int, int], int] = {}
    n_prefixes = n_csam // 5
    while len(entries) < n_csam:
        plen = 32 if len(entries) >= n_prefixes else rng.randint(24, 30)
        a = random_unicast(rng) & (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
        if (a, plen) not in entries:
            entries[(a, plen)] = a + rng.randrange(1 << (32 - plen)) if plen < 32 else a
    csam = [str(ipaddress.IPv4Address(a)) + (f"/{p}" if p < 32 else "") for a, p in entries]
    return DataSet(pools, [str(ipaddress.IPv4Address(a)) for a in statics], csam,
                   list(entries.values()))


def write_sources(ds: DataSet, workdir: Path) -> tuple[Path, Path]:
    """The subscriber table and the CSAM list as xdpzoot reads them (maps/README.md)."""
    subs = workdir / "subscribers.csv"
    lines = ["subscriber,address,type"]
    lines += [f"{i + 1},{p},dynamic" for i, p in enumerate(ds.pools)]
    lines += [f"{1_000_000 + i},{a},static" for i, a in enumerate(ds.statics)]
    subs.write_text("\n".join(lines) + "\n")
    csam = workdir / "csam.txt"
    csam.write_text("\n".join(ds.csam) + "\n")
    os.chmod(csam, 0o600)
    return subs, csam


# ---- namespaces -----------------------------------------------------------------------------


@dataclass
class Topo:
    """The three namespaces, their veth names, MACs and the generator's ifindex."""

    tag: str
    gen: str
    rtr: str
    snk: str
    gen_dev: str
    rin: str          # router, towards gen (ingress of the measured traffic)
    rout: str         # router, towards snk
    snk_dev: str
    macs: dict[str, str] = field(default_factory=dict)
    gen_ifindex: int = 0

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.gen, self.rtr, self.snk)


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetnsError(res.returncode, argv, res.stdout, res.stderr)
    return res.stdout


def sysctl(ns: str, *pairs: str) -> None:
    netns_run(ns, "sysctl", "-q", "-w", *pairs, timeout=10)


def link_json(ns: str, dev: str) -> dict:
    return json.loads(ip("-j", "link", "show", "dev", dev, ns=ns))[0]


def topo_up(tag: str, rp_filter: int = 0) -> Topo:
    """Create gen <-> rtr <-> snk; both veth pairs are born in the router namespace with the
    peer moved straight into its namespace (the host's namespace never sees them). The
    router's ingress gets reverse path filtering ``rp_filter`` (0 off, 1 strict, 2 loose)."""
    t = Topo(tag, f"{tag}-gen", f"{tag}-rtr", f"{tag}-snk",
             f"{tag}g", f"{tag}i", f"{tag}o", f"{tag}s")
    for ns in t.namespaces:
        ip("netns", "add", ns)
        sysctl(ns, "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
               "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        ip("link", "set", "lo", "up", ns=ns)
    sysctl(t.rtr, "net.ipv4.ip_forward=1")
    ip("link", "add", t.rin, "type", "veth", "peer", "name", t.gen_dev, "netns", t.gen, ns=t.rtr)
    ip("link", "add", t.rout, "type", "veth", "peer", "name", t.snk_dev, "netns", t.snk,
       ns=t.rtr)
    for ns, dev in ((t.gen, t.gen_dev), (t.rtr, t.rin), (t.rtr, t.rout), (t.snk, t.snk_dev)):
        ip("link", "set", dev, "up", ns=ns)
        t.macs[dev] = link_json(ns, dev)["address"]
    ip("addr", "add", f"{GEN_ADDR}/24", "dev", t.gen_dev, ns=t.gen)
    ip("addr", "add", f"{RTR_IN_ADDR}/24", "dev", t.rin, ns=t.rtr)
    ip("addr", "add", f"{RTR_OUT_ADDR}/24", "dev", t.rout, ns=t.rtr)
    ip("addr", "add", f"{SNK_ADDR}/24", "dev", t.snk_dev, ns=t.snk)
    ip("neigh", "replace", RTR_IN_ADDR, "lladdr", t.macs[t.rin], "dev", t.gen_dev,
       "nud", "permanent", ns=t.gen)
    ip("neigh", "replace", GEN_ADDR, "lladdr", t.macs[t.gen_dev], "dev", t.rin,
       "nud", "permanent", ns=t.rtr)
    ip("neigh", "replace", SNK_ADDR, "lladdr", t.macs[t.snk_dev], "dev", t.rout,
       "nud", "permanent", ns=t.rtr)
    ip("neigh", "replace", RTR_OUT_ADDR, "lladdr", t.macs[t.rout], "dev", t.snk_dev,
       "nud", "permanent", ns=t.snk)
    # Inside the router namespace only: everything goes to the sink, the pools back to gen.
    ip("route", "replace", "default", "via", SNK_ADDR, "dev", t.rout, ns=t.rtr)
    ip("route", "replace", "100.64.0.0/10", "via", GEN_ADDR, "dev", t.rin, ns=t.rtr)
    ip("route", "replace", "default", "via", RTR_IN_ADDR, "dev", t.gen_dev, ns=t.gen)
    for ns, dev in ((t.rtr, t.rin), (t.rtr, t.rout), (t.gen, t.gen_dev), (t.snk, t.snk_dev)):
        sysctl(ns, f"net.ipv4.conf.{dev}.rp_filter={rp_filter if dev == t.rin else 0}")
    t.gen_ifindex = int(link_json(t.gen, t.gen_dev)["ifindex"])
    return t


def topo_down(t: Topo) -> None:
    """Delete our namespaces (their veths and programs go with them)."""
    names = set(ip("netns", "list", check=False).split())
    for ns in t.namespaces:
        if ns in names:
            ip("netns", "del", ns, check=False)


def napi_threads(dev: str) -> list[int]:
    """Pids of the kthreads ``napi/<dev>-<id>`` (the name is cut at 15 characters)."""
    want = f"napi/{dev}-"[:15]
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().strip().startswith(want):
                    pids.append(int(p.name))
    return pids


def threaded_napi(ns: str, dev: str, cpu: int, realtime: bool = False) -> str:
    """Threaded NAPI on ``dev`` (it has an XDP program, so it has NAPI), its kthreads pinned
    to ``cpu`` (and SCHED_FIFO with ``realtime``). Returns what was done, for the report."""
    res = netns_run(ns, "sh", "-c", f"echo 1 > /sys/class/net/{dev}/threaded", check=False)
    if res.returncode != 0:
        return f"threaded NAPI refused on {dev}: {res.stderr.strip()}"
    deadline = time.monotonic() + 2
    while not (pids := napi_threads(dev)) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not pids:
        return f"no napi/{dev} kthread found"
    for pid in pids:
        os.sched_setaffinity(pid, {cpu})
        if realtime:
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(RT_PRIO))
    return (f"napi/{dev} ({len(pids)} kthread) on CPU {cpu}"
            + (", SCHED_FIFO" if realtime else ""))


def attach_pinned_xdp(ns: str, dev: str, pin: str) -> None:
    ip("link", "set", "dev", dev, "xdpdrv", "pinned", pin, ns=ns)


def detach_xdp(ns: str, dev: str) -> None:
    ip("link", "set", "dev", dev, "xdpdrv", "off", ns=ns, check=False)


# ---- the generator and the sink -------------------------------------------------------------


class XdpMd(ct.Structure):
    """struct xdp_md of the UAPI: the test run's context (ctx_in)."""

    _fields_ = [("data", ct.c_uint32), ("data_end", ct.c_uint32), ("data_meta", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("rx_queue_index", ct.c_uint32),
                ("egress_ifindex", ct.c_uint32)]


def template_frame(t: Topo) -> bytes:
    """Eth/IPv4/TCP SYN to the router's MAC, 64 bytes; gen rewrites addresses, ports and, in
    the forward mix, the flags (Traffic.syn_per_1024)."""
    eth = (bytes.fromhex(t.macs[t.rin].replace(":", ""))
           + bytes.fromhex(t.macs[t.gen_dev].replace(":", "")) + struct.pack("!H", 0x0800))
    payload = FRAME_LEN - 14 - 20 - 20
    ip4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20 + payload, 0, 0x4000, 64, 6, 0,
                      socket.inet_aton(GEN_ADDR), socket.inet_aton(SNK_ADDR))
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    return eth + ip4 + tcp + bytes(payload)


class Traffic:
    """fwd_gen.c compiled and loaded: the generator, the sink and the pass stub."""

    def __init__(self, ds: DataSet, t: Topo, pin_dir: str, syn_percent: float = 100):
        from bcc import BPF

        self.topo, self.ds = t, ds
        # The forward mix's SYNs (each opens a conversation to a new destination: the scan
        # sketch counts it) among ACKs (segments of established connections).
        self.syn_per_1024 = round(syn_percent * 1024 / 100)
        n_listed = max(1, len(ds.listed))
        self.bpf = BPF(src_file=str(HERE / "fwd_gen.c").encode(),
                       cflags=[f"-DGEN_STATICS={max(1, len(ds.statics))}",
                               f"-DGEN_LISTED={n_listed}"])
        self.gen_fd = self.bpf.load_func(b"gen", BPF.XDP).fd
        os.makedirs(pin_dir, exist_ok=True)
        self.pins = {}
        for name in ("sink", "pass"):
            self.pins[name] = os.path.join(pin_dir, f"fwd_{name}")
            kernel.pin(self.bpf.load_func(name.encode(), BPF.XDP).fd, self.pins[name])
        st = self.bpf[b"gen_static"]
        for i, a in enumerate(ds.statics):
            st[st.Key(i)] = st.Leaf(struct.unpack("=I", socket.inet_aton(a))[0])
        fill_array(self.bpf[b"gen_listed"],
                   [struct.unpack("=I", struct.pack("!I", a))[0] for a in ds.listed])
        self.frame = template_frame(t)
        tm = self.bpf[b"gen_tmpl"]
        leaf = tm.Leaf()
        ct.memmove(ct.byref(leaf), self.frame, ct.sizeof(leaf))
        tm[tm.Key(0)] = leaf
        self.sink = self.bpf[b"sink_count"]

    def set_mix(self, mix: str) -> None:
        cfg = self.bpf[b"gen_cfg"]
        leaf = cfg.Leaf()
        leaf.mix, leaf.pool_base, leaf.pool_span = MIX_IDS[mix], POOL_BASE, self.ds.pool_span
        leaf.n_static, leaf.n_listed = len(self.ds.statics), len(self.ds.listed)
        leaf.syn_per_1024 = self.syn_per_1024
        cfg[cfg.Key(0)] = leaf

    def set_rate(self, rate: int) -> None:
        """Pace the generator at ``rate`` frames/s (0: unpaced), starting now."""
        t = self.bpf[b"gen_pace"]
        leaf = t[t.Key(0)]
        leaf.gap_ns, leaf.next_ns = (1_000_000_000 // rate if rate else 0), 0
        t[t.Key(0)] = leaf

    def sent(self) -> int:
        t = self.bpf[b"gen_pace"]
        return int(t[t.Key(0)].sent)

    def sink_count(self) -> int:
        return sum(int(v) for v in self.sink[self.sink.Key(0)])

    def send(self, frames: int) -> None:
        """Send ``frames`` frames now (the caller is in the generator's namespace)."""
        buf = ct.create_string_buffer(self.frame, len(self.frame))
        md = XdpMd(data=0, data_end=len(self.frame), ingress_ifindex=self.topo.gen_ifindex)
        opts = kernel._TestRunOpts(   # noqa: SLF001  (the layout kernel.py keeps)
            sz=ct.sizeof(kernel._TestRunOpts), data_in=ct.cast(buf, ct.c_void_p),
            data_size_in=len(self.frame), ctx_in=ct.cast(ct.pointer(md), ct.c_void_p),
            ctx_size_in=ct.sizeof(md), repeat=frames, flags=BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size=LIVE_BATCH)
        rc = kernel._libbpf.bpf_prog_test_run_opts(self.gen_fd, ct.byref(opts))  # noqa: SLF001
        if rc < 0:
            err = ct.get_errno() or -rc
            raise kernel.KernelError(f"live test_run: {os.strerror(err)}")


def fill_array(table, values: list[int]) -> None:
    """Write u32 ``values`` at 0.. into a bcc array, in batches where bcc can."""
    if not values:
        return
    keys = (table.Key * len(values))(*range(len(values)))
    leaves = (table.Leaf * len(values))(*values)
    try:
        table.items_update_batch(keys, leaves)
    except Exception:   # older kernels or bcc: one by one
        for k, v in zip(keys, leaves, strict=True):
            table[k] = v


# ---- the routers ----------------------------------------------------------------------------


@dataclass
class Env:
    """What a router needs to set itself up."""

    topo: Topo
    ds: DataSet
    traffic: Traffic
    workdir: Path
    pin_root: str
    subs_file: Path
    csam_file: Path
    xdpzoot_extra: str = ""       # TOML appended to xdpzoot's config (--xdpzoot-extra)


class Router:
    """One router under test. ``setup`` leaves the router's ingress veth with an XDP program
    (its own or the pass stub), so that gen's XDP_TX reaches it."""

    name = "?"
    label = "?"
    needs: tuple[str, ...] = ()   # programs that must be installed (scripts/setup.sh)

    def __init__(self, env: Env):
        self.env = env
        self.t = env.topo

    def setup(self) -> None:
        attach_pinned_xdp(self.t.rtr, self.t.rin, self.env.traffic.pins["pass"])

    def teardown(self) -> None:
        detach_xdp(self.t.rtr, self.t.rin)

    def drops(self) -> int:
        """Packets the router dropped by its own counters, since setup."""
        return 0

    def prog_ids(self) -> list[int]:
        """Kernel ids of the programs doing this router's work (for BPF stats)."""
        return []

    def set_mix(self, mix: str) -> None:
        """The mix about to run (only the floor needs to know)."""


class Plain(Router):
    name, label = "plain", "Linux forwarding, no rules"


def nft_ruleset(ds: DataSet) -> str:
    def elems(xs: list[str]) -> str:
        return ", ".join(xs)

    return f"""table inet xzf {{
    set pools {{ type ipv4_addr; flags interval; elements = {{ {elems(ds.pools)} }} }}
    set static {{ type ipv4_addr; elements = {{ {elems(ds.statics)} }} }}
    set csam {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {elems(ds.csam)} }} }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        tcp dport 25 ip saddr @pools ip saddr != @static counter drop
        ip daddr @csam counter drop
    }}
}}
"""


class Nft(Router):
    name, label = "nft", "nftables, interval sets"
    needs = ("nft",)

    def setup(self) -> None:
        super().setup()
        path = self.env.workdir / "ruleset.nft"
        path.write_text(nft_ruleset(self.env.ds))
        netns_run(self.t.rtr, "nft", "-f", str(path), timeout=300)

    def teardown(self) -> None:
        netns_run(self.t.rtr, "nft", "delete", "table", "inet", "xzf", check=False)
        super().teardown()

    def drops(self) -> int:
        doc = json.loads(netns_run(self.t.rtr, "nft", "-j", "list", "chain", "inet", "xzf",
                                   "forward").stdout)
        n = 0
        for item in doc["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    n += int(expr["counter"]["packets"])
        return n


class Ipt(Router):
    name, label = "iptables", "iptables-legacy + ipset hash:net"
    ipt = "iptables-legacy"
    needs = ("ipset", "iptables-legacy", "iptables-legacy-restore")

    def setup(self) -> None:
        super().setup()
        ds = self.env.ds
        size = 1 << max(10, (len(ds.csam) * 2 - 1).bit_length())
        lines = [f"create xzf_pools hash:net family inet maxelem {max(65536, size)}",
                 "create xzf_static hash:net family inet maxelem 65536",
                 f"create xzf_csam hash:net family inet hashsize {size // 4} maxelem {size}"]
        lines += [f"add xzf_pools {p}" for p in ds.pools]
        lines += [f"add xzf_static {a}" for a in ds.statics]
        lines += [f"add xzf_csam {e}" for e in ds.csam]
        netns_run(self.t.rtr, "ipset", "restore", input="\n".join(lines) + "\n", timeout=300)
        rules = ("*filter\n"
                 "-A FORWARD -p tcp --dport 25 -m set --match-set xzf_pools src "
                 "-m set ! --match-set xzf_static src -j DROP\n"
                 "-A FORWARD -m set --match-set xzf_csam dst -j DROP\n"
                 "COMMIT\n")
        netns_run(self.t.rtr, f"{self.ipt}-restore", input=rules)

    def teardown(self) -> None:
        netns_run(self.t.rtr, self.ipt, "-F", "FORWARD", check=False)
        for s in ("xzf_pools", "xzf_static", "xzf_csam"):
            netns_run(self.t.rtr, "ipset", "destroy", s, check=False)
        super().teardown()

    def drops(self) -> int:
        out = netns_run(self.t.rtr, self.ipt, "-L", "FORWARD", "-v", "-x", "-n").stdout
        return sum(int(line.split()[0]) for line in out.splitlines()[2:]
                   if line.split() and line.split()[2] == "DROP")


class Ref(Router):
    name, label = "ref-xdp", "reference XDP, two LPM lookups"

    def setup(self) -> None:
        from bcc import BPF

        ds = self.env.ds
        self.bpf = BPF(src_file=str(HERE / "ref_xdp.c").encode(),
                       cflags=[f"-DREF_SUBS={len(ds.pools) + len(ds.statics) + 16}",
                               f"-DREF_CSAM={len(ds.csam) + 16}"])
        fn = self.bpf.load_func(b"ref", BPF.XDP)
        self.fd = fn.fd
        fill_lpm(self.bpf[b"ref_subs"], [(p, 1) for p in ds.pools] + [(a, 0) for a in ds.statics])
        fill_lpm(self.bpf[b"ref_csam"], [(e, 1) for e in ds.csam])
        pin = os.path.join(self.env.pin_root, "fwd_ref")
        kernel.pin(self.fd, pin)
        attach_pinned_xdp(self.t.rtr, self.t.rin, pin)

    def drops(self) -> int:
        t = self.bpf[b"ref_drops"]
        return sum(int(v) for k in range(2) for v in t[t.Key(k)])

    def prog_ids(self) -> list[int]:
        return [kernel.prog_id(self.fd)]


# The floor's array sizes (2^bits words of 8 bytes): the CSAM filter's, the directory's and the
# OP25B counters', a CSAM generation's lines and more, the pool addresses' state.
FLOOR_SIZES = {"128k": 14, "4m": 19, "32m": 22, "128m": 24}
# Work before the floor's verdict, no memory touched: dependent multiplies (~0.8 ns each here),
# or independent ALU steps in four chains (more code for the time): what a program's own time
# costs a frame in this lab.
SPINS = (48, 96, 144)
CODES = (50, 150)


class Floor(Router):
    name, label = "xdp-floor", "XDP floor: no lookup, the mix's verdict"

    def __init__(self, env: Env, misses: int = 0, size: str = "4m", spin: int = 0,
                 code: int = 0) -> None:
        super().__init__(env)
        self.misses, self.bits, self.spin, self.code = misses, FLOOR_SIZES[size], spin, code
        if code:
            self.name = f"xdp-floor-code{code}"
            self.label = f"XDP floor + {code} x 4 independent ALU steps"
        if spin:
            self.name = f"xdp-floor-spin{spin}"
            self.label = f"XDP floor + {spin} dependent multiplies"
        if misses:
            self.name = f"xdp-floor-miss{misses}-{size}"
            self.label = (f"XDP floor + {misses} dependent random read{'s' * (misses > 1)}"
                          f" of {size[:-1]} {size[-1].upper()}iB")

    def setup(self) -> None:
        from bcc import BPF

        self.bpf = BPF(src_file=str(HERE / "floor_xdp.c").encode(),
                       cflags=[f"-DFLOOR_MISSES={self.misses}", f"-DFLOOR_MEM_BITS={self.bits}"]
                       + ([f"-DFLOOR_SPIN={self.spin}"] if self.spin else [])
                       + ([f"-DFLOOR_CODE={self.code}"] if self.code else []))
        self.fd = self.bpf.load_func(b"floor_prog", BPF.XDP).fd
        pin = os.path.join(self.env.pin_root, "fwd_floor")
        kernel.pin(self.fd, pin)
        attach_pinned_xdp(self.t.rtr, self.t.rin, pin)

    def set_mix(self, mix: str) -> None:
        t = self.bpf[b"floor_verdict"]
        t[t.Key(0)] = t.Leaf(XDP_DROP if mix == "drop" else XDP_PASS)

    def drops(self) -> int:
        t = self.bpf[b"floor_drops"]
        return sum(int(v) for v in t[t.Key(0)])

    def prog_ids(self) -> list[int]:
        return [kernel.prog_id(self.fd)]


def fill_lpm(table, entries: list[tuple[str, int]]) -> None:
    """LPM trie entries (prefix or address, u8 value), in batches where the kernel can."""
    keys = (table.Key * len(entries))()
    leaves = (table.Leaf * len(entries))()
    for i, (text, v) in enumerate(entries):
        net = ipaddress.IPv4Network(text)
        keys[i].prefixlen = net.prefixlen
        keys[i].addr = struct.unpack("=I", net.network_address.packed)[0]
        leaves[i] = v
    try:
        table.items_update_batch(keys, leaves)
    except Exception:   # no batch ops for this map type: one by one
        for k, v in zip(keys, leaves, strict=True):
            table[k] = v


XDPZOOT_CONFIG = """\
[interfaces]
access = ["{rin}"]
core = ["{rout}"]
hook = "{hook}"
mode = "native"

[sources]
subscribers = "{subs}"
{csam}

[limits]
pool_addresses = {pool_addrs}   # every pool address may send to port 25 (the drop mix)
{extra}"""


class Xdpzoot(Router):
    """xdpzoot through this checkout's CLI, as an operator runs it."""

    def __init__(self, env: Env, hook: str, fast_path: bool = False, with_list: bool = True):
        super().__init__(env)
        self.hook, self.fast_path, self.with_list = hook, fast_path, with_list
        at = "XDP" if hook == "xdp" else "TC"
        self.name = (("xdpzoot-fast" if hook == "xdp" else "xdpzoot-tc-fast") if fast_path
                     else f"xdpzoot-{hook}") + ("" if with_list else "-nolist")
        self.label = (f"xdpzoot, {at} fast path" if fast_path
                      else f"xdpzoot at {'XDP (native)' if hook == 'xdp' else 'TC'}") + \
            ("" if with_list else ", no CSAM list (what the list costs)")
        self.pin_dir = os.path.join(env.pin_root, self.name)
        self.config = env.workdir / f"{self.name}.toml"
        extra = ("\n[dataplane]\nfast_path = true\n" if fast_path else "") + env.xdpzoot_extra
        self.config.write_text(XDPZOOT_CONFIG.format(
            rin=self.t.rin, rout=self.t.rout, hook=hook, subs=env.subs_file,
            csam=f'csam = "{env.csam_file}"' if with_list else "# no list: attach loads one",
            pool_addrs=1024 * len(env.ds.pools), extra=extra))
        self.attached = False

    def cli(self, *args: str, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        return netns_run(self.t.rtr, *xdpzoot_argv(), "--config", str(self.config),
                         "--pin-dir", self.pin_dir, *args, timeout=timeout, check=check)

    def setup(self) -> None:
        if self.hook == "tc":
            super().setup()           # the pass stub: gen's XDP_TX needs XDP on the peer
        else:
            detach_xdp(self.t.rtr, self.t.rin)
        self.attached = True
        self.cli("attach", "--hook", self.hook)
        self.cli("subscribers", "load", str(self.env.subs_file))
        if self.with_list:
            self.cli("blocklist", "load", str(self.env.csam_file))

    def teardown(self) -> None:
        if self.attached:
            self.cli("detach", check=False)
        super().teardown()

    def drops(self) -> int:
        doc = json.loads(self.cli("stats", "--json", timeout=60).stdout)
        return sum(int(r["packets"]) for r in doc["counters"] if r["verdict"] == "drop")

    def prog_ids(self) -> list[int]:
        pid = kernel.pinned_prog_id(os.path.join(self.pin_dir, f"prog_{self.hook}_access"))
        return [pid] if pid else []


def xdpzoot_argv() -> list[str]:
    """The CLI of this checkout (not whichever one is installed)."""
    src = str(ROOT / "src")
    if src not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    return [sys.executable, "-m", "xdpzoot"]


def make_routers(env: Env) -> list[Router]:
    """Every router; the ones in EXTRA_ROUTERS run only when --only names them."""
    return [Plain(env), Nft(env), Ipt(env), Ref(env), Xdpzoot(env, "xdp"),
            Xdpzoot(env, "tc"), Xdpzoot(env, "xdp", fast_path=True),
            Xdpzoot(env, "tc", fast_path=True),
            Xdpzoot(env, "xdp", with_list=False), Floor(env),
            *(Floor(env, m, z) for m in (1, 2) for z in FLOOR_SIZES),
            *(Floor(env, spin=n) for n in SPINS), *(Floor(env, code=n) for n in CODES)]


# Parts of a breakdown, not routers an operator compares: xdpzoot at XDP without a CSAM list
# loaded (its programs then look nothing up for the list: the difference is the list's cost);
# the XDP floor (bench/floor_xdp.c: no lookup, the verdict the mix wants), the best any XDP
# program could do here, so the ceiling of the XDP goals' ratios in this lab; and the floor with
# one or two dependent random reads of an array of 128 KiB .. 128 MiB before its verdict: what
# a lookup in a structure of that size costs a frame here, whatever the program around it; and
# the floor after work that touches no memory: what a program's own time costs a frame.
EXTRA_ROUTERS = {"xdpzoot-xdp-nolist", "xdp-floor"} | {
    f"xdp-floor-miss{m}-{z}" for m in (1, 2) for z in FLOOR_SIZES} | {
    f"xdp-floor-spin{n}" for n in SPINS} | {f"xdp-floor-code{n}" for n in CODES}


def selected(routers: list[Router], only: set[str] | None) -> list[Router]:
    """The routers --only names, or all but EXTRA_ROUTERS."""
    return [r for r in routers if (r.name in only if only else r.name not in EXTRA_ROUTERS)]


# ---- measuring ------------------------------------------------------------------------------


def prog_stats(ids: list[int]) -> tuple[int, int]:
    """Summed (run_time_ns, run_cnt) of the programs with these ids (still loaded)."""
    stats = [s for s in map(kernel.prog_run_stats, ids) if s]
    return sum(s[0] for s in stats), sum(s[1] for s in stats)


@contextlib.contextmanager
def bpf_stats(on: bool) -> Iterator[None]:
    """kernel.bpf_stats_enabled ``on`` or off inside, the previous value restored after."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    path.write_text("1\n" if on else "0\n")
    try:
        yield
    finally:
        path.write_text(old + "\n")


@contextlib.contextmanager
def pinned_to(cpu: int, realtime: bool) -> Iterator[None]:
    """This thread on ``cpu`` only, and with ``realtime`` SCHED_FIFO: on a shared machine
    the generator is then not descheduled in the middle of a step (the kernel's RT
    throttling still leaves others 5%)."""
    old = os.sched_getaffinity(0)
    old_policy, old_param = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setaffinity(0, {cpu})
    if realtime:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIO))
    try:
        yield
    finally:
        if realtime:
            os.sched_setscheduler(0, old_policy, old_param)
        os.sched_setaffinity(0, old)


def offer(traffic: Traffic, rate: int, seconds: float) -> tuple[int, float]:
    """Offer ``rate`` frames/s (0: as fast as the generator goes) for about ``seconds``.
    The generator paces itself inside long test_run calls (each call costs tens of ms to
    set up, time in which nothing is sent: counted in the elapsed time). Call sizes adapt
    so that a call lasts about CALL_S. Returns (frames sent, elapsed seconds)."""
    traffic.set_rate(rate)
    sent0 = traffic.sent()
    iters = CALL_ITERS_START
    t0 = time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        traffic.send(iters)
        took = time.perf_counter() - now
        left = seconds - (time.perf_counter() - t0)
        iters = int(min(max(iters * min(CALL_S, max(left, 0.01)) / took, 4096), CALL_ITERS_MAX))
    return traffic.sent() - sent0, time.perf_counter() - t0


def step_at(router: Router, traffic: Traffic, mix: str, rate: int, seconds: float,
            realtime: bool, label: str = "") -> dict:
    """One step: ``rate`` offered for ``seconds``, what the sink and the router counted."""
    sink0, drop0 = traffic.sink_count(), router.drops()
    with pinned_to(GEN_CPU, realtime), in_netns(traffic.topo.gen):
        sent, elapsed = offer(traffic, rate, seconds)
    time.sleep(DRAIN_S)
    sink, drops = traffic.sink_count() - sink0, router.drops() - drop0
    step = {"rate": rate, "sent": sent, "seconds": round(elapsed, 4),
            "offered_pps": round(sent / elapsed), "sink": sink, "drops": drops,
            "processed_pps": round((sink + drops) / elapsed)}
    step["loss"] = round(1 - (sink + drops) / sent, 4) if sent else 0.0
    log(f"    {mix:7} {rate_label(rate):>8}: offered {step['offered_pps']:>9,} "
        f"processed {step['processed_pps']:>9,} (sink {sink:,}, drops {drops:,}){label}")
    return step


def ladder(router: Router, traffic: Traffic, mix: str, rates: tuple[int, ...],
           seconds: float, realtime: bool) -> dict:
    """Every step of the rate ladder for one router and mix (BPF stats off); the best step;
    ns/packet from one more step at the best step's load with the stats on."""
    traffic.set_mix(mix)
    router.set_mix(mix)
    steps = [step_at(router, traffic, mix, rate, seconds, realtime) for rate in rates]
    best = max(steps, key=lambda s: s["processed_pps"])
    out = {"steps": steps, "best": best, "ns_per_packet": None, "bpf_runs": 0}
    ids = router.prog_ids()
    if ids:
        s0 = prog_stats(ids)
        with bpf_stats(True):
            out["stats_step"] = step_at(router, traffic, mix, best["rate"], seconds, realtime,
                                        " (BPF stats on)")
        s1 = prog_stats(ids)
        runs = s1[1] - s0[1]
        out["bpf_runs"] = runs
        out["ns_per_packet"] = round((s1[0] - s0[0]) / runs, 1) if runs else None
    return out


def rate_label(rate: int) -> str:
    if not rate:
        return "unpaced"
    return f"{rate / 1e6:g}M" if rate >= 1_000_000 else f"{rate // 1000}k"


def parse_rates(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        out.append(int(float(part.rstrip("km")) * mult))
    return tuple(out)


# ---- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Build the lab, run every router and mix, tear everything down. Returns the document."""
    t_start = time.monotonic()
    log(f"data set: {args.pools} pools, {args.statics} static hosts, "
        f"{args.csam:,} CSAM entries ...")
    ds = make_dataset(args.pools, args.statics, args.csam)
    rates = args.rates or (QUICK_RATES if args.quick else RATES)
    seconds = args.seconds or (0.5 if args.quick else 1.5)
    doc: dict = {"config": {"kernel": platform.release(), "cpus": os.cpu_count(),
                            "pools": args.pools, "statics": len(ds.statics),
                            "csam": len(ds.csam), "rates": list(rates), "seconds": seconds,
                            "frame_bytes": FRAME_LEN, "generator_cpu": GEN_CPU,
                            "router_cpu": ROUTER_CPU, "realtime": not args.no_rt,
                            "xdpzoot_extra": args.xdpzoot_extra,
                            "syn_percent": args.syn_percent, "rounds": args.rounds,
                            "mixes": list(args.mixes)},
                 "routers": []}
    tag = "xzfb" + secrets.token_hex(2)
    topo: Topo | None = None
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xzf-")))
        pin_root = stack.enter_context(bpffs())
        stack.enter_context(bpf_stats(False))
        try:
            log(f"namespaces {tag}-gen/-rtr/-snk ...")
            topo = topo_up(tag, args.rp_filter)
            doc["config"]["rp_filter"] = args.rp_filter
            subs, csam = write_sources(ds, workdir)
            log("compiling the generator and the sink ...")
            traffic = Traffic(ds, topo, pin_root, args.syn_percent)
            attach_pinned_xdp(topo.snk, topo.snk_dev, traffic.pins["sink"])
            # The sink's NAPI stays a softirq, raised (and so run) on the router's CPU by the
            # router's kthread: on the generator's CPU it would wait for each whole test_run
            # call (the generator does not yield) behind a ring of 256 frames.
            doc["config"]["sink_napi"] = "softirq on the router's CPU"
            extra = args.xdpzoot_extra.replace("\\n", "\n")
            extra = f"\n{extra}\n" if extra else ""
            env = Env(topo, ds, traffic, workdir, pin_root, subs, csam, extra)
            routers = selected(make_routers(env), args.only)
            # Rounds: every router in turn, then again, so that what the machine does
            # meanwhile falls on all of them alike; ratios are taken within a round.
            for k in range(args.rounds):
                if args.rounds > 1:
                    log(f"round {k + 1} of {args.rounds}")
                for router in routers:
                    doc["routers"].append(run_router(router, traffic, rates, seconds,
                                                     not args.no_rt, args.mixes)
                                          | {"round": k + 1})
        finally:
            if topo is not None:
                topo_down(topo)
    doc["seconds"] = round(time.monotonic() - t_start, 1)
    return doc


def run_router(router: Router, traffic: Traffic, rates: tuple[int, ...], seconds: float,
               realtime: bool, mixes: tuple[str, ...] = tuple(MIX_IDS)) -> dict:
    """Set one router up, run the mixes, tear it down; a router that cannot be set up is
    reported with the reason (the fast path before that feature exists: config refused)."""
    out: dict = {"name": router.name, "label": router.label}
    log(f"{router.name}: setting up ...")
    missing = [p for p in router.needs if shutil.which(p) is None]
    if missing:
        out["status"], out["error"] = "not installed", f"missing {', '.join(missing)} (make setup)"
        log(f"  {out['status']}: {out['error']}")
        return out
    t0 = time.monotonic()
    try:
        try:
            router.setup()
        except NetnsError as e:
            text = (e.stderr or e.stdout or str(e)).strip()
            refused = "unknown key" in text or "fast_path" in text
            out["status"] = "not available (config refused)" if refused else "setup failed"
            out["error"] = text[-600:]
            log(f"  {out['status']}: {out['error']}")
            return out
        out["setup_seconds"] = round(time.monotonic() - t0, 1)
        out["napi"] = threaded_napi(router.t.rtr, router.t.rin, ROUTER_CPU, realtime)
        log(f"  {out['napi']}")
        out["status"] = "ok"
        out["mixes"] = {mix: ladder(router, traffic, mix, rates, seconds, realtime)
                        for mix in mixes}
    finally:
        router.teardown()
    return out


def table(doc: dict) -> str:
    """The figures as a Markdown table: a router's figures of every round (round 1 / 2 /
    ...), then its ratio to plain forwarding within each round and their median."""
    rows = ["| router | forward mix, kpps | drop mix, kpps | ns/packet (BPF stats) fwd ; drop "
            "| forward / plain | drop / plain |", "|---|---|---|---|---|---|"]
    by_name: dict[str, list[dict]] = {}
    for r in doc["routers"]:
        by_name.setdefault(r["name"], []).append(r)
    rel = ratios(doc)
    for name, runs in by_name.items():
        ok = [r for r in runs if r.get("status") == "ok"]
        if not ok:
            rows.append(f"| {runs[0]['label']} | {runs[0]['status']} | | | | |")
            continue

        def kpps(mix: str, ok=ok) -> str:
            if mix not in ok[0]["mixes"]:
                return "-"
            return " / ".join(f"{r['mixes'][mix]['best']['processed_pps'] / 1000:,.0f}"
                              for r in ok)

        def ns(mix: str, ok=ok) -> str:
            v = [r["mixes"][mix]["ns_per_packet"] if mix in r["mixes"] else None for r in ok]
            return "-" if None in v else " / ".join(f"{x:.0f}" for x in v)

        def ratio(mix: str, name=name) -> str:
            v = rel.get(name, {}).get(mix)
            if not v:
                return ""
            return " / ".join(f"{x:.2f}" for x in v["rounds"]) + \
                (f" (median {v['median']:.2f})" if len(v["rounds"]) > 1 else "")

        cost = "-" if ns("forward") == ns("drop") == "-" else f"{ns('forward')} ; {ns('drop')}"
        rows.append(f"| {runs[0]['label']} | {kpps('forward')} | {kpps('drop')} | {cost} "
                    f"| {ratio('forward')} | {ratio('drop')} |")
    return "\n".join(rows)


def ratios(doc: dict, base: str = "plain") -> dict:
    """Each router's processed rate over router ``base``'s in the same round, per mix:
    {name: {mix: {"rounds": [...], "median": x}}}; nothing where ``base`` did not run."""
    best: dict[tuple[str, int], dict] = {
        (r["name"], r.get("round", 1)): {m: v["best"]["processed_pps"]
                                         for m, v in r["mixes"].items()}
        for r in doc["routers"] if r.get("status") == "ok"}
    out: dict = {}
    for (name, k), pps in best.items():
        ref = best.get((base, k))
        if name == base or not ref:
            continue
        for mix, v in pps.items():
            if ref.get(mix):
                out.setdefault(name, {}).setdefault(mix, {"rounds": []})["rounds"].append(
                    round(v / ref[mix], 3))
    for mixes in out.values():
        for v in mixes.values():
            v["median"] = statistics.median(v["rounds"])
    return out


# Issue 8's goals: (router, mix, against, at least).
GOALS = (("xdpzoot-xdp", "forward", "plain", 0.8), ("xdpzoot-fast", "forward", "plain", 1.5),
         ("xdpzoot-xdp", "drop", "iptables", 3.0), ("xdpzoot-xdp", "drop", "nft", 4.0),
         ("xdpzoot-xdp", "drop", "ref-xdp", 1.0))


def goals(doc: dict) -> list[dict]:
    """The goals the routers that ran can say something about, with the ratio of every
    round, the median and whether the median meets the goal."""
    out = []
    for name, mix, base, least in GOALS:
        r = ratios(doc, base)
        v = r.get(name, {}).get(mix)
        if v:
            out.append({"router": name, "mix": mix, "against": base, "goal": least,
                        "rounds": v["rounds"], "median": v["median"],
                        "met": v["median"] >= least})
            floor = r.get("xdp-floor", {}).get(mix) if name == "xdpzoot-xdp" else None
            if floor:   # the same ratio for the floor: the most any XDP program gets here
                out[-1]["floor_median"] = floor["median"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the JSON document, not the table")
    p.add_argument("--quick", action="store_true", help="3 steps of 0.5 s, 10k list entries")
    p.add_argument("--csam", type=int, help="CSAM list entries (default 100000; 1M allowed)")
    p.add_argument("--pools", type=int, default=1024, help="dynamic /22 pools (1..4096)")
    p.add_argument("--statics", type=int, default=1024, help="static hosts inside the pools")
    p.add_argument("--seconds", type=float, help="seconds per step (at most 2)")
    p.add_argument("--rates", type=parse_rates,
                   help="offered loads, e.g. 250k,1M,0 (0: unpaced)")
    p.add_argument("--no-rt", action="store_true",
                   help="no SCHED_FIFO for the generator and the router's NAPI kthread")
    p.add_argument("--xdpzoot-extra", default="", metavar="TOML",
                   help="appended to xdpzoot's config, e.g. '[bandwidth]\\nenabled = false'")
    p.add_argument("--syn-percent", type=float, default=100, metavar="P",
                   help="forward mix: P%% of the frames are SYNs, each a new conversation the "
                        "scan sketch counts (100, the default: the published runs), the rest "
                        "ACKs of established connections (0: all)")
    p.add_argument("--rounds", type=int,
                   help="run the routers in turn this many times (default 3, --quick 1); "
                        "ratios to plain forwarding per round and their median")
    p.add_argument("--rp-filter", type=int, choices=(0, 1, 2), default=0,
                   help="reverse path filtering on the router's ingress, for every router "
                        "(0 off, the default; 1 strict; 2 loose): the fast path then looks "
                        "the route back to each source up, as the kernel does")
    p.add_argument("--mixes", type=lambda s: tuple(s.split(",")), default=tuple(MIX_IDS),
                   help="the mixes to run: forward,drop (both, the default), or one of them")
    p.add_argument("--only", type=lambda s: set(s.split(",")),
                   help="routers to run: plain,nft,iptables,ref-xdp,xdpzoot-xdp,xdpzoot-tc,"
                        "xdpzoot-fast,xdpzoot-tc-fast (all of these by default), "
                        "xdpzoot-xdp-nolist (no CSAM "
                        "list: what the list costs), xdp-floor (no lookup: the most an XDP "
                        "program gets here)")
    args = p.parse_args(argv)
    if args.csam is None:
        args.csam = 10_000 if args.quick else 100_000
    if not 1 <= args.csam <= 2_000_000:
        p.error("--csam: 1..2000000")
    if not 0 <= args.syn_percent <= 100:
        p.error("--syn-percent: 0..100")
    if not args.mixes or not set(args.mixes) <= set(MIX_IDS):
        p.error("--mixes: forward, drop or forward,drop")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if not 1 <= args.rounds <= 10:
        p.error("--rounds: 1..10")
    if args.seconds is not None and not 0 < args.seconds <= 2:
        p.error("--seconds: more than 0, at most 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("bench_fwd.py needs root (namespaces, BPF, bpffs)")
        return 2
    if (os.cpu_count() or 1) < 2:
        log("bench_fwd.py needs 2 CPUs (generator and router apart)")
        return 2
    doc = run(args)
    doc["ratios"], doc["goals"] = ratios(doc), goals(doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(table(doc))
        print()
        for g in doc["goals"]:
            print(f"{g['router']} / {g['against']}, {g['mix']} mix: "
                  + " / ".join(f"{x:.2f}" for x in g["rounds"])
                  + f" (median {g['median']:.2f}; goal >= {g['goal']}: "
                  + ("met)" if g["met"] else "not met)")
                  + (f"; the XDP floor: {g['floor_median']:.2f}" if "floor_median" in g
                     else ""))
        for r in doc["routers"]:
            if r.get("status") != "ok":
                print(f"\n{r['label']}: {r['status']}: {r.get('error', '')}")
    log(f"done in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
