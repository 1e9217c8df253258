"""RADIUS reconnect storm: Accounting-Start for N sessions from 4 NAS as fast as they are
answered, then N Stops; then a paced run for the reply latency.

The listener runs in a process of its own inside a namespace the bench creates (NAS
addresses 192.0.2.1-4 and the server 192.0.2.10 on its lo), writing every session address
into the pinned host map of a data plane compiled into a bpffs of the bench's own, and
answers only after the write. The map writer here is a stand-in for the instance's: one
host entry per session address with its contract's entry, the IPv4 directory opened once
for the pool (set_host reads and writes the 4 MiB directory on every call). The clients keep
a window of requests outstanding per NAS; a request unanswered for 2 s is sent again and
counted as a retry.

Usage: bench_radius.py [--sessions N] [--window W] [--rate R] [--seconds S] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import multiprocessing as mp
import os
import selectors
import shutil
import signal
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

from xdpzoot import tables  # noqa: E402
from xdpzoot.dataplane import dirs, kernel, schema  # noqa: E402
from xdpzoot.dataplane.layout import Entry, pack_class  # noqa: E402
from xdpzoot.lab import in_netns  # noqa: E402
from xdpzoot.sources.radius_server import Client, Listener  # noqa: E402
from xdpzoot.sources.sessions import Change, SessionTable  # noqa: E402

SECRET = b"bench-secret"
NAS = [f"192.0.2.{i}" for i in range(1, 5)]
SERVER = ("192.0.2.10", 1813)
POOL = ipaddress.ip_network("100.64.0.0/12")
DEFINES = ["-DXZ_MAX_HOSTS=262144", "-DXZ_MAX_SUBSCRIBERS=4096"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def bpffs() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="xdpzoot-bench-radius-", dir="/run")
    subprocess.run(["mount", "-t", "bpf", "bpf", root], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", root], check=False)
        shutil.rmtree(root, ignore_errors=True)


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


# --- the server process --------------------------------------------------------------------


def server(ns: str, pin_dir: str, ready, done, out) -> None:
    """Serve until SIGTERM, then report the stats and the host map's size."""
    maps = kernel.SubscriberMaps.open(pin_dir)
    d = maps.read_dir()   # open the directory once for the whole pool
    dirs.subscriber_added(d, [tables.addr16(a) for a in POOL.subnets(new_prefix=24)
                              for a in [a.network_address]], [])
    maps.write_dir(d)
    dynamic = schema.TYPES["dynamic"]

    def apply(c: Change) -> None:
        for n, user in c.add:
            sub = int(user[4:user.index("@")]) + 1
            maps.host_map.update(tables.addr16(n.network_address), pack_class(
                Entry(sub, dynamic)))
        if c.remove:
            maps.host_map.delete_many([tables.addr16(n.network_address) for n in c.remove])

    clients = [Client("bras", tuple(ipaddress.ip_network(f"{a}/32") for a in NAS), SECRET)]
    listener = Listener(clients, SessionTable(3600), apply)
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(SERVER)
        sock.setblocking(False)

    import asyncio

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await listener.serve(sock, None, stop, every=3600)

    asyncio.run(main())
    out.put({"stats": {k: v for k, v in listener.stats().items()
                       if k in ("sessions", "requests", "drops")},
             "hosts": len(maps.host_map.keys())})
    done.set()


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
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2)}


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
    # paced: sessions after the storm's, started and stopped in turn
    # each NAS starts a session and stops it with its next request
    paced_reqs = [[accounting_request(i % 256, 1 + i % 2, n + i // 2 * len(NAS) + k, NAS[k])
                   for i in range(m // len(NAS))] for k in range(len(NAS))]
    doc: dict = {"sessions": n, "window": args.window}
    with bpffs() as root, netns() as ns:
        pin_dir = os.path.join(root, "radius")
        log("compiling the maps ...")
        kernel.compile_bpf(pin_dir, DEFINES, maps_only=True)
        ctx = mp.get_context("fork")
        ready, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
        p = ctx.Process(target=server, args=(ns, pin_dir, ready, done, out))
        p.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the listener did not start")
            log(f"{n} Starts from {len(NAS)} NAS ...")
            doc["start"] = storm(ns, starts, args.window)
            with kernel.PinnedMap(os.path.join(pin_dir, "xz_hosts")) as hosts:
                doc["hosts_after_start"] = len(hosts.keys())
            log(f"{n} Stops ...")
            doc["stop"] = storm(ns, stops, args.window)
            log(f"paced, {args.rate:.0f}/s for {args.seconds:.0f} s ...")
            doc["paced"] = paced(ns, paced_reqs, args.rate)
        finally:
            p.terminate()   # SIGTERM: the listener stops and reports
            done.wait(30)
            doc["server"] = out.get(timeout=5) if done.is_set() else None
            p.join(10)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        s, t, pc = doc["start"], doc["stop"], doc["paced"]
        print(f"| phase | requests | answered/s | retries | p50 ms | p99 ms |\n"
              f"| --- | --- | --- | --- | --- | --- |\n"
              f"| Start storm | {s['requests']:,} | {s['answered_per_s']:,} | {s['retries']} "
              f"| {s['p50_ms']} | {s['p99_ms']} |\n"
              f"| Stop storm | {t['requests']:,} | {t['answered_per_s']:,} | {t['retries']} "
              f"| {t['p50_ms']} | {t['p99_ms']} |\n"
              f"| paced {pc['rate']:.0f}/s | {pc['requests']:,} | ({pc['answered']:,} "
              f"matched, {pc['late']} late) | | {pc['p50_ms']} | {pc['p99_ms']} |")
        print(f"host entries after the Starts: {doc['hosts_after_start']:,}; "
              f"server: {doc['server']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
