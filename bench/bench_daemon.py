"""The daemon's tick at scale: `xdpzoot run`'s round (owners, counters, the volume rules'
windows, throttles, congestion, the snapshot) with 1M subscribers, timed in the daemon's own
code (xdpzoot.daemon.Daemon.tick), with counters that move between ticks as traffic would
move them.

Set-up (not timed): a BPF filesystem under /run, a subscriber file of N static /32 hosts
(one subscriber each, 100.64.0.0/10 and 198.18.0.0/15 addresses), the two volume rules of
maps/bandwidth.toml plus a rolling one, and (a tree that has them) an ``[[abuse]]`` rule
judged at the end of each 60 s window, loaded with the CLI. Then in a fresh process (the
``--driver`` half): Daemon.start (the snapshot, empty at first), one tick (first sight of
the counters), and ``--ticks`` ticks, before each of which a tenth of the subscribers' upload
and download counters grow by a random amount (written into the state array in batches, as
the data plane would count). The daemon's clock is injected and moves tick_seconds (10 s)
per tick, so that a snapshot cadence (``snapshot_seconds``, 60 s by default) falls as it
would: the sixth tick writes one. Reported: each tick's phases, the median and the slowest
tick; the time to write the whole snapshot at the end (as at a stop) and its size.
``--tree PATH`` runs the driver against another checkout's src/ (the same Daemon API) for a
before/after figure in one run.

The metrics (a tree that has xdpzoot/metrics.py): the instance also holds a CSAM list of
``--csam`` addresses (1M, loaded with the CLI) and a full flow table (xz_flows, written in
batches: the largest LRU table the tick's census walks, once a minute while congestion mode
is on, as it is here). The driver runs in
a network namespace of its own and serves the metrics there on 127.0.0.1, as `xdpzoot run`
does; reported: the cost of one scrape in the daemon's process (the exposition built, wall
and CPU time of the serving thread, median of ``--scrapes``), then ``--ticks`` ticks again
while another process scrapes every 0.25 s over HTTP (the tick's median with scrapes next
to the one without, and the scrapes' latency).

    sudo .venv/bin/python bench/bench_daemon.py                 # 1M subscribers, 8 ticks
    sudo .venv/bin/python bench/bench_daemon.py --subscribers 100000 --csam 100000 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RULES = """\
[[rule]]
name = "monthly-1tb"
direction = "down"
window = "calendar-month"
threshold = "1TB"
action = "throttle"
rate = "1Mbit"
start = "next-window:2"
duration = "1 window"

[[rule]]
name = "daily-up"
direction = "up"
window = "calendar-day"
threshold = "20GB"
action = "notify"

[[rule]]
name = "rolling-both"
direction = "both"
window = "rolling:24h"
threshold = "100GB"
action = "throttle"
rate = "10Mbit"
duration = "until-below"
"""


# The CLI of the tree on PYTHONPATH (older trees have no xdpzoot/__main__.py).
CLI = [sys.executable, "-c", "import sys; from xdpzoot.cli import main; sys.argv[0] = 'xdpzoot'; "
       "main()"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def subscriber_file(path: Path, n: int) -> None:
    """``n`` static /32 hosts, subscriber ids 1..n."""
    base = (100 << 24) | (64 << 16)
    with path.open("w") as f:
        f.write("subscriber,address,type\n")
        for i in range(n):
            a = base + i
            f.write(f"{i + 1},{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255},static\n")


def csam_file(path: Path, n: int) -> None:
    """``n`` IPv4 addresses from 100.96.0.0/11 upwards (no subscriber's)."""
    base = (100 << 24) | (96 << 16)
    with path.open("w") as f:
        for i in range(n):
            a = base + i
            f.write(f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}\n")
    path.chmod(0o600)


def config(path: Path, tmp: Path, n: int, csam: int = 0, metrics: bool = True,
           abuse: bool = True) -> None:
    room = max(n + n // 10, 4096)
    path.write_text(f"""\
[limits]
hosts = {room}
subscribers = {room}
prefixes = 1024
csam_hosts = {max(csam + csam // 10, 4096)}
csam_prefixes = 1024

[bandwidth]
rules = "{tmp}/rules.toml"
state = "{tmp}/state/state.msgpack"
audit = "{tmp}/state/audit.jsonl"
tick_seconds = 10
""" + ("""
[metrics]
listen = ""   # served by the driver, in its namespace
""" if metrics else "") + ("""
[[abuse]]     # judged every 60 s (the default window): at the sixth tick
name = "scan"
signal = "scans"
threshold = 500
for = "10m"
action = "suspend"
""" if abuse else ""))


# ---- the driver: runs in a process of its own, against the tree under test -----------------


def driver(args: argparse.Namespace) -> None:
    import ctypes as ct
    import struct

    from xdpzoot.daemon import Daemon

    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    fd = lib.bpf_obj_get(os.path.join(args.pin, "xz_state").encode())
    if fd < 0:
        raise SystemExit(f"open {args.pin}/xz_state: {os.strerror(ct.get_errno())}")
    try:   # struct xz_state as the tree under test has it, and its scan sketch's count
        from xdpzoot.dataplane.layout import SCAN_COUNT, STATE
        state_size = STATE.size
    except ImportError:
        state_size, SCAN_COUNT = 9 * 8, None   # up, down (tat, bulk_tat, bytes, packets); op25b
    slots = args.subscribers + 1   # slot 0 is the pool addresses'

    def read_state() -> bytearray:
        out = bytearray(slots * state_size)
        buf = (ct.c_char * len(out)).from_buffer(out)
        for i in range(slots):
            if lib.bpf_map_lookup_elem(fd, struct.pack("=I", i), ct.byref(buf, i * state_size)):
                raise SystemExit(f"lookup xz_state[{i}]: {os.strerror(ct.get_errno())}")
        return out

    class Opts(ct.Structure):
        _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]

    raw = read_state()
    rng = random.Random(args.seed)

    def traffic() -> None:
        """A tenth of the slots count more bytes up and down, written in batches; and (a
        tree with the scan sketch) opened conversations to 1-50 destinations in the window
        in force, one in a thousand of them to 1,000."""
        chosen = sorted(rng.sample(range(1, slots), max(1, (slots - 1) // 10)))
        epoch = d.inst.control_params().get("scan_epoch", 0) if d.inst else 0
        for s in chosen:
            off = s * state_size
            for field in (2, 6):   # up.bytes, down.bytes
                o = off + field * 8
                v = int.from_bytes(raw[o:o + 8], "little") + rng.randrange(1, 50_000_000)
                raw[o:o + 8] = v.to_bytes(8, "little")
            if SCAN_COUNT is not None:   # the estimate in 1/64ths above the window
                n = 1000 if rng.random() < 0.001 else rng.randrange(1, 51)
                o = off + SCAN_COUNT * 8
                raw[o:o + 8] = (n << 38 | epoch).to_bytes(8, "little")
        for i in range(0, len(chosen), 65536):
            part = chosen[i:i + 65536]
            keys = b"".join(struct.pack("=I", s) for s in part)
            vals = b"".join(bytes(raw[s * state_size:(s + 1) * state_size]) for s in part)
            count = ct.c_uint32(len(part))
            opts = Opts(sz=ct.sizeof(Opts))
            if lib.bpf_map_update_batch(fd, keys, vals, ct.byref(count), ct.byref(opts)):
                raise SystemExit(f"update xz_state: {os.strerror(ct.get_errno())}")

    now = [time.time()]
    d = Daemon(args.config, args.pin, clock=lambda: now[0])
    phases: dict[str, list[float]] = {}

    def timed(obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases.setdefault(label, []).append(time.perf_counter() - t0)
        setattr(obj, name, wrapper)

    t0 = time.perf_counter()
    d.start()
    start_s = time.perf_counter() - t0
    inst = getattr(d, "inst", None) or getattr(d, "maps", None)
    metrics = None
    with contextlib.suppress(ImportError):
        from xdpzoot import metrics
    if metrics is not None:
        fill_flows(lib, args.pin)
    for obj, name, label in ((inst, "owners", "owners (map columns)"),
                             (inst, "class_columns", "owners (map columns)"),
                             (inst, "owner_ids", "owners (map columns)"),
                             (getattr(d, "census", None), "take", "census (metrics)"),
                             (inst, "volumes", "counters (state array)"),
                             (inst, "byte_counters", "counters (state array)"),
                             (inst, "state_words", "counters (state array)"),
                             (d, "_counters", "counters that moved (all)"),
                             (d.acct, "observe", "volume rules (accounting)"),
                             (d, "_enforce_rates", "throttles in force"),
                             (d, "_congestion", "congestion"),
                             (d, "_watch_sources", "source sync check"),
                             (d, "_persist", "audit log and snapshot"),
                             (d, "_abuse", "abuse rules (a window's end)")):
        if obj is not None and hasattr(obj, name):
            timed(obj, name, label)
    t0 = time.perf_counter()
    d.tick()
    first = time.perf_counter() - t0
    phases.clear()

    def ticking() -> list[float]:
        out = []
        for _ in range(args.ticks):
            traffic()
            now[0] += 10   # the config's tick_seconds
            t0 = time.perf_counter()
            d.tick()
            out.append(time.perf_counter() - t0)
        return out

    ticks = ticking()
    phase_medians = {k: statistics.median(v) for k, v in phases.items()}
    phase_max = {k: max(v) for k, v in phases.items()}
    snap = Path(d.cfg.bandwidth.state)
    from xdpzoot.bandwidth import store

    t0 = time.perf_counter()
    store.save_snapshot(str(snap), d.acct.snapshot())
    snapshot_s = time.perf_counter() - t0
    print(json.dumps({
        "start_s": start_s, "first_tick_s": first, "ticks_s": ticks,
        "tick_median_s": statistics.median(ticks), "snapshot_s": snapshot_s,
        "phases_median_s": phase_medians, "phases_max_s": phase_max,
        "snapshot_bytes": snap.stat().st_size if snap.exists() else None,
        "metrics": scrapes(args, d, metrics, ticking) if metrics is not None else None,
    }))


# ---- the metrics: a scrape's cost in the daemon's process, and the ticks meanwhile ----------

# Another process scraping every EVERY seconds until it is terminated (by its pid).
SCRAPER = """
import sys, time, urllib.request
url, every = sys.argv[1], float(sys.argv[2])
while True:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()
    time.sleep(max(0.0, every - (time.monotonic() - t0)))
"""


def fill_flows(lib, pin: str) -> None:
    """xz_flows full (its max_entries of distinct flows), written in batches as the data
    plane would insert them: the census's LRU walk at its largest."""
    import ctypes as ct
    import struct

    class Opts(ct.Structure):
        _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]

    class Info(ct.Structure):
        _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                    ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                    ("rest", ct.c_uint8 * 128)]

    fd = lib.bpf_obj_get(os.path.join(pin, "xz_flows").encode())
    info, size = Info(), ct.c_uint32(ct.sizeof(Info))
    if fd < 0 or lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)):
        raise SystemExit(f"open {pin}/xz_flows: {os.strerror(ct.get_errno())}")
    n, batch = info.max_entries, 65536
    for start in range(0, n, batch):
        part = range(start, min(n, start + batch))
        keys = b"".join(struct.pack("=I", i).rjust(info.key_size, b"\0") for i in part)
        count = ct.c_uint32(len(part))
        opts = Opts(sz=ct.sizeof(Opts))
        if lib.bpf_map_update_batch(fd, keys, bytes(info.value_size * len(part)),
                                    ct.byref(count), ct.byref(opts)):
            raise SystemExit(f"update xz_flows: {os.strerror(ct.get_errno())}")
    os.close(fd)


def scrapes(args: argparse.Namespace, d, metrics, ticking) -> dict:
    """One scrape's cost in this process (the daemon's), as its HTTP server thread pays it,
    then the ticks again while another process scrapes over HTTP."""
    server = metrics.Server(d, "127.0.0.1:9386")
    cost: list[tuple[float, float]] = []   # (wall, CPU of the serving thread)
    collect = server.registry.collect

    def timed_collect():
        t0, c0 = time.perf_counter(), time.thread_time()
        yield from collect()
        cost.append((time.perf_counter() - t0, time.thread_time() - c0))

    server.registry.collect = timed_collect
    url = "http://127.0.0.1:9386/metrics"
    import urllib.request

    def fetch() -> int:
        with urllib.request.urlopen(url, timeout=10) as r:
            return len(r.read())

    size = 0
    for _ in range(args.scrapes):   # one at a time, nothing else running
        size = fetch()
    alone = list(cost)
    cost.clear()
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, url, "0.25"])
    try:
        time.sleep(0.5)
        ticks = ticking()
    finally:
        scraper.terminate()
    scraper.wait(30)
    server.close()
    during = list(cost)
    wall = sorted(w for w, _ in alone)
    return {"exposition_bytes": size, "alone_wall_s": wall,
            "alone_wall_median_s": statistics.median(wall),
            "alone_cpu_median_s": statistics.median(c for _, c in alone),
            "during_ticks_wall_s": sorted(w for w, _ in during),
            "during_ticks_cpu_median_s": statistics.median(c for _, c in during)
            if during else None,
            "scrapes_during_ticks": len(during),
            "ticks_with_scrapes_s": ticks,
            "tick_median_with_scrapes_s": statistics.median(ticks)}


# ---- the set-up and the report --------------------------------------------------------------


def run_tree(tree: Path, args: argparse.Namespace, cfg: Path, pin: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    # In a namespace of its own: the driver serves the metrics on its loopback.
    ns = "xzbd" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--driver",
                            "--config", str(cfg), "--pin", pin, "--subscribers",
                            str(args.subscribers), "--ticks", str(args.ticks), "--seed",
                            str(args.seed), "--scrapes", str(args.scrapes)],
                           env=env, capture_output=True, text=True, timeout=3600)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    if r.returncode != 0:
        raise SystemExit(f"driver ({tree}) failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare(tree: Path, args: argparse.Namespace, tmp: Path, pin: str) -> Path:
    """The maps (a subscriber load, which creates them) and the files, for ``tree``."""
    (tmp / "state").mkdir(exist_ok=True)
    (tmp / "rules.toml").write_text(RULES)
    cfg = tmp / "xdpzoot.toml"
    config(cfg, tmp, args.subscribers, args.csam,
           metrics=(tree / "src" / "xdpzoot" / "metrics.py").exists(),
           abuse=(tree / "src" / "xdpzoot" / "bandwidth" / "abuse.py").exists())
    subs = tmp / "subscribers.csv"
    if not subs.exists():
        subscriber_file(subs, args.subscribers)
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    t0 = time.perf_counter()
    r = subprocess.run([*CLI, "--config", str(cfg), "--pin-dir", pin,
                        "subscribers", "load", str(subs)], env=env, capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"subscribers load ({tree}) failed:\n{r.stderr}")
    log(f"  {args.subscribers:,} subscribers loaded in {time.perf_counter() - t0:.1f} s")
    # Congestion mode on: the census counts the flow table (filled by the driver) once a
    # minute, its worst case; the tick's own congestion step does nothing more for it.
    subprocess.run([*CLI, "--config", str(cfg), "--pin-dir", pin, "congestion", "on"],
                   env=env, capture_output=True, check=True, timeout=120)
    if args.csam:
        lst = tmp / "csam.txt"
        if not lst.exists():
            csam_file(lst, args.csam)
        r = subprocess.run([*CLI, "--config", str(cfg), "--pin-dir", pin, "blocklist", "load",
                            str(lst)], env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"blocklist load ({tree}) failed:\n{r.stderr}")
        log(f"  a CSAM list of {args.csam:,} addresses loaded")
    return cfg


def detach(tree: Path, cfg: Path, pin: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    subprocess.run([*CLI, "--config", str(cfg), "--pin-dir", pin, "detach"], env=env,
                   capture_output=True, timeout=120)


def report(name: str, r: dict) -> None:
    log(f"{name}: tick median {r['tick_median_s'] * 1000:.0f} ms, slowest "
        f"{max(r['ticks_s']) * 1000:.0f} ms "
        f"(ticks {', '.join(f'{t * 1000:.0f}' for t in r['ticks_s'])} ms; first tick "
        f"{r['first_tick_s'] * 1000:.0f} ms; start {r['start_s'] * 1000:.0f} ms; whole "
        f"snapshot written in {r['snapshot_s'] * 1000:.0f} ms, "
        f"{(r['snapshot_bytes'] or 0) / 1e6:.1f} MB)")
    for k, v in r["phases_median_s"].items():
        top = r.get("phases_max_s", {}).get(k, v)
        log(f"    {k:28s} {v * 1000:8.1f} ms (slowest {top * 1000:.1f})")
    m = r.get("metrics")
    if m:
        log(f"  metrics: one scrape, {m['exposition_bytes'] / 1000:.0f} kB: "
            f"{m['alone_wall_median_s'] * 1000:.1f} ms (CPU "
            f"{m['alone_cpu_median_s'] * 1000:.1f} ms) in the daemon's process, median of "
            f"{len(m['alone_wall_s'])}, slowest {max(m['alone_wall_s']) * 1000:.1f} ms")
        during = m["during_ticks_wall_s"]
        if during:
            log(f"  while ticking: {m['scrapes_during_ticks']} scrapes, median "
                f"{statistics.median(during) * 1000:.1f} ms, slowest {max(during) * 1000:.1f}"
                f" ms; tick median {m['tick_median_with_scrapes_s'] * 1000:.0f} ms with "
                f"scrapes every 0.25 s, {r['tick_median_s'] * 1000:.0f} ms without")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--subscribers", type=int, default=1_000_000)
    ap.add_argument("--ticks", type=int, default=8)
    ap.add_argument("--csam", type=int, default=1_000_000,
                    help="CSAM list addresses loaded (0: none)")
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tree", action="append", default=[],
                    help="another checkout to time too (its src/), e.g. before a change")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--pin", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver:
        driver(args)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench_daemon.py: needs root (BPF maps)")
    out = {}
    root = tempfile.mkdtemp(prefix="xzbench-daemon-", dir="/run")
    subprocess.run(["mount", "-t", "bpf", "bpf", root], check=True)
    try:
        with tempfile.TemporaryDirectory(prefix="xzbench-daemon-") as td:
            for tree in [ROOT, *map(Path, args.tree)]:
                name = "this checkout" if tree == ROOT else str(tree)
                log(f"daemon tick, {args.subscribers:,} subscribers, {name}:")
                tmp = Path(td) / str(len(out))
                tmp.mkdir()
                pin = os.path.join(root, f"t{len(out)}")
                cfg = prepare(tree, args, tmp, pin)
                try:
                    out[name] = run_tree(tree, args, cfg, pin)
                finally:
                    detach(tree, cfg, pin)
                report(name, out[name])
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", root], check=False)
            os.rmdir(root)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
