"""RADIUS reconnect storm: Accounting-Start for N sessions from 4 NAS as fast as they are
answered, then N Stops; then a paced run for the reply latency.

The listener is the product: `xdpzoot radius` in a namespace the bench creates (NAS
addresses 192.0.2.1-4 and the server 192.0.2.10 on its lo), on an instance pinned in a
bpffs of the bench's own, with a subscriber file of one contract per user (the ``user``
column) and a dynamic pool: each session address becomes a host entry with its contract's
class (Instance.apply_sessions, under the instance's lock), and a request is answered only
after that write. The clients keep a window of requests outstanding per NAS; a request
unanswered for 2 s is sent again and counted as a retry.

Usage: bench_radius.py [--sessions N] [--window W] [--rate R] [--seconds S] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xdpzoot.dataplane import kernel  # noqa: E402
from xdpzoot.lab import in_netns  # noqa: E402

SECRET = b"bench-secret"
NAS = [f"192.0.2.{i}" for i in range(1, 5)]
SERVER = ("192.0.2.10", 1813)
POOL = ipaddress.ip_network("100.64.0.0/12")
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))   # this checkout's xdpzoot


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"xzbrad{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for a in [*NAS, SERVER[0]]:
            subprocess.run(["ip", "-n", name, "addr", "add", f"{a}/32", "dev", "lo"],
                           check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# --- requests, encoded by hand (RFC 2866): the client must not be the bottleneck -------------


def _attr(code: int, value: bytes) -> bytes:
    return bytes((code, len(value) + 2)) + value


def accounting_request(ident: int, status: int, i: int, nas: str) -> bytes:
    addr = POOL.network_address + 1 + i
    attrs = b"".join((
        _attr(40, struct.pack("!I", status)),
        _attr(44, f"sess-{i}".encode()),
        _attr(1, f"user{i}@zoot.example".encode()),
        _attr(4, ipaddress.ip_address(nas).packed),
        _attr(8, addr.packed),
    ))
    head = struct.pack("!BBH", 4, ident, 20 + len(attrs))
    return head + hashlib.md5(head + bytes(16) + attrs + SECRET).digest() + attrs


# --- the server: `xdpzoot radius` ------------------------------------------------------------


def setup(tmp: Path, pin_dir: str, users: int) -> Path:
    """The config, secret and subscriber file (a pool and ``users`` contracts); the maps
    made and the file loaded with the CLI. Returns the config's path."""
    secret = tmp / "bras.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(SECRET + b"\n")
    subs = tmp / "subscribers.csv"
    with subs.open("w") as f:
        f.write(f"subscriber,address,type,up_kbps,down_kbps,flags,plan,user\n"
                f"1,{POOL},dynamic,,,,,\n")
        f.writelines(f"{i + 2},,dynamic,,,,,user{i}@zoot.example\n" for i in range(users))
    room = max(4096, 1 << (users + 4096).bit_length())
    cfg = tmp / "xdpzoot.toml"
    cfg.write_text(f"""\
[limits]
hosts = {room}
subscribers = {room}
prefixes = 1024
csam_hosts = 4096
csam_prefixes = 1024
[sources]
subscribers = "{subs}"
[bandwidth]
state = "{tmp}/state.msgpack"
audit = "{tmp}/audit.jsonl"
[radius]
listen = "{SERVER[0]}:{SERVER[1]}"
session_timeout = 3600
state = "{tmp}/radius.msgpack"
[[radius.client]]
name = "bras"
source = [{", ".join(f'"{a}/32"' for a in NAS)}]
secret_file = "{secret}"
""")
    t0 = time.perf_counter()
    r = subprocess.run([*cli(cfg, pin_dir), "subscribers", "load", "--force", str(subs)],
                       capture_output=True, text=True, timeout=600, env=ENV)
    if r.returncode:
        raise RuntimeError(f"subscribers load: {r.stderr}")
    log(f"  {users:,} contracts loaded in {time.perf_counter() - t0:.1f} s")
    return cfg


def cli(cfg: Path, pin_dir: str) -> list[str]:
    return [sys.executable, "-m", "xdpzoot", "--config", str(cfg), "--pin-dir", pin_dir]


def serving(ns: str, cfg: Path, pin_dir: str) -> subprocess.Popen:
    """`xdpzoot radius` in ``ns`` (a child of ours), once its socket is bound."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, *cli(cfg, pin_dir), "radius"], env=ENV,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not subprocess.run(["ip", "netns", "exec", ns, "ss", "-Huln",
                              f"sport = :{SERVER[1]}"], capture_output=True,
                             text=True).stdout.strip():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"xdpzoot radius did not start: {p.communicate()[1]}")
        time.sleep(0.1)
    return p


def host_entries(pin_dir: str) -> int:
    with kernel.PinnedMap(os.path.join(pin_dir, "xz_hosts")) as hosts:
        return len(hosts.keys())


# --- the clients ---------------------------------------------------------------------------


def storm(ns: str, requests: list[list[bytes]], window: int) -> dict:
    """Send each NAS's requests keeping ``window`` outstanding; answered/s and retries."""
    with in_netns(ns):
        socks = []
        for a in NAS:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((a, 0))
            s.setblocking(False)
            socks.append(s)
    sel = selectors.DefaultSelector()
    state = []
    for k, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, k)
        state.append({"next": 0, "out": {}, "done": 0})
    total = sum(len(r) for r in requests)
    answered = retries = 0
    lat: list[float] = []
    t0 = time.perf_counter()
    while answered < total:
        now = time.perf_counter()
        for k, s in enumerate(socks):
            st = state[k]
            while len(st["out"]) < window and st["next"] < len(requests[k]):
                data = requests[k][st["next"]]
                s.sendto(data, SERVER)
                st["out"][data[1]] = (now, st["next"])
                st["next"] += 1
            for ident, (sent, j) in list(st["out"].items()):
                if now - sent > 2.0:
                    s.sendto(requests[k][j], SERVER)
                    st["out"][ident] = (now, j)
                    retries += 1
        for key, _ in sel.select(timeout=0.5):
            s, k = key.fileobj, key.data
            while True:
                try:
                    reply = s.recv(4096)
                except BlockingIOError:
                    break
                got = state[k]["out"].pop(reply[1], None)
                if got is not None:
                    answered += 1
                    lat.append(time.perf_counter() - got[0])
    elapsed = time.perf_counter() - t0
    for s in socks:
        s.close()
    lat.sort()
    return {"requests": total, "seconds": round(elapsed, 2),
            "answered_per_s": round(total / elapsed), "retries": retries,
            "p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2),
            "max_ms": round(lat[-1] * 1e3, 2)}


def paced(ns: str, requests: list[list[bytes]], rate: float) -> dict:
    """Send at ``rate`` per second in all, round-robin over the NAS (each NAS's ids cycle:
    a reply later than 256 of its requests cannot be matched and counts as late)."""
    with in_netns(ns):
        socks = []
        for a in NAS:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((a, 0))
            s.setblocking(False)
            socks.append(s)
    sent: list[dict[int, float]] = [{} for _ in socks]
    lat: list[float] = []
    late = 0
    order = [(k, reqs[j]) for j in range(max(map(len, requests)))
             for k, reqs in enumerate(requests) if j < len(reqs)]
    t0 = time.perf_counter()
    i = 0
    deadline = t0 + len(order) / rate + 5
    while (i < len(order) or any(sent)) and time.perf_counter() < deadline:
        now = time.perf_counter()
        while i < len(order) and now - t0 >= i / rate:
            k, data = order[i]
            socks[k].sendto(data, SERVER)
            if data[1] in sent[k]:
                late += 1
            sent[k][data[1]] = now
            i += 1
        for k, s in enumerate(socks):
            try:
                while True:
                    reply = s.recv(4096)
                    t = sent[k].pop(reply[1], None)
                    if t is not None:
                        lat.append(time.perf_counter() - t)
            except BlockingIOError:
                pass
        time.sleep(0.0002)
    for s in socks:
        s.close()
    lat.sort()
    return {"rate": rate, "requests": len(order), "answered": len(lat), "late": late,
            "p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2),
            "max_ms": round(lat[-1] * 1e3, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n = args.sessions
    per = [list(range(k, n, len(NAS))) for k in range(len(NAS))]
    starts = [[accounting_request(j % 256, 1, i, NAS[k]) for j, i in enumerate(per[k])]
              for k in range(len(NAS))]
    stops = [[accounting_request(j % 256, 2, i, NAS[k]) for j, i in enumerate(per[k])]
             for k in range(len(NAS))]
    m = int(args.rate * args.seconds)

    def paced_requests(first: int) -> list[list[bytes]]:
        """Sessions from ``first`` on, started and stopped in turn: each NAS starts a
        session and stops it with its next request."""
        return [[accounting_request(i % 256, 1 + i % 2, first + i // 2 * len(NAS) + k, NAS[k])
                 for i in range(m // len(NAS))] for k in range(len(NAS))]

    doc: dict = {"sessions": n, "window": args.window}
    users = n + m + len(NAS)
    with kernel.scratch_bpffs("xdpzoot-bench-radius-") as root, netns() as ns, \
            tempfile.TemporaryDirectory() as td:
        pin_dir = os.path.join(root, "radius")
        log(f"the instance: a pool and {users:,} contracts ...")
        cfg = setup(Path(td), pin_dir, users)
        p = serving(ns, cfg, pin_dir)
        try:
            log(f"{n} Starts from {len(NAS)} NAS ...")
            doc["start"] = storm(ns, starts, args.window)
            doc["hosts_after_start"] = host_entries(pin_dir)
            log(f"paced, {args.rate:.0f}/s for {args.seconds:.0f} s, {n:,} sessions live ...")
            doc["paced_live"] = paced(ns, paced_requests(n), args.rate)
            log(f"{n} Stops ...")
            doc["stop"] = storm(ns, stops, args.window)
            doc["hosts_after_stop"] = host_entries(pin_dir)
            log(f"paced, {args.rate:.0f}/s for {args.seconds:.0f} s, after the Stops ...")
            doc["paced"] = paced(ns, paced_requests(n + m // 2 + len(NAS)), args.rate)
        finally:
            p.terminate()   # SIGTERM: the listener writes its snapshot and stops
            try:
                _, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            doc["server_exit"] = p.returncode
        doc["server"] = json.loads(subprocess.run(
            [*cli(cfg, pin_dir), "sessions", "--json"], capture_output=True, text=True,
            env=ENV).stdout or "null")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        s, t = doc["start"], doc["stop"]
        print("| phase | requests | answered/s | retries | p50 ms | p99 ms | max ms |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        for name, r in (("Start storm", s), (f"paced {args.rate:.0f}/s, {n:,} live",
                                              doc["paced_live"]),
                        ("Stop storm", t), (f"paced {args.rate:.0f}/s after the Stops",
                                            doc["paced"])):
            rate = (f"{r['answered_per_s']:,}" if "answered_per_s" in r else
                    f"({r['answered']:,} matched, {r['late']} late)")
            print(f"| {name} | {r['requests']:,} | {rate} | {r.get('retries', '')} "
                  f"| {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |")
        print(f"host entries after the Starts: {doc['hosts_after_start']:,}, after the "
              f"Stops: {doc['hosts_after_stop']:,}; `xdpzoot radius` exit "
              f"{doc['server_exit']}; sessions at the end: {doc['server']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
