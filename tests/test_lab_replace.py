"""`xdpzoot attach` again (program replace) under live traffic: while the dynamic
subscriber streams a paced mix of packets through the router, the real CLI replaces the
programs several times. Counted on the far side (a packet socket on the Internet host's
link, which sees every frame the router sent it, whatever the sockets there do with it):
not one packet to a listed address and not one OP25B packet (a TCP SYN to port 25 from the
dynamic subscriber) may arrive; the allowed packets flow again after each replace, and what
they lost is reported (the kernel's replace is atomic: XDP swaps the program pointer, TC
replaces the filter in place; the maps are pinned and kept). With XDP (the same mode, and
changes of mode: these the kernel cannot swap), TC, and XDP with the fast path.

Run with ``-rA`` to see the loss per replace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from xdpzoot.lab import Lab, LabRouter, lab_config, netns_run

pytestmark = pytest.mark.lab

LISTED = "192.0.2.66"      # on the CSAM list the config loads with every attach
STREAM_PPS = 1_000
# Bounds of the stream, whichever comes first (the test ends it with a stop file): room
# for three attaches (a bcc compile each, 10-15 s on a loaded machine).
STREAM_MAX_SECONDS = 240.0
STREAM_MAX_PACKETS = 240_000
FLOW_TIMEOUT = 10.0         # allowed traffic not seen again after this: the replace broke it
MARK_PORTS = range(9000, 9100)   # one end marker port per stream
# A replace may cost what the kernel loses in its swap (nothing, on a veth); a detach
# window or emptied maps would cost hundreds of packets per replace at this rate.
MAX_LOST_PER_REPLACE = 20

LIST = f"# replace test\n{LISTED}\n"

LIMITS = """\
[limits]
csam_hosts = 4096
csam_prefixes = 1024
"""
FAST_PATH = """\
[dataplane]
fast_path = true
"""

# (what, protocol, destination, port) of each stream; "allowed" ones must arrive.
STREAMS = (
    ("allowed", "udp", "203.0.113.10", 5301),
    ("allowed", "tcp", "203.0.113.10", 443),
    ("allowed", "tcp", "192.0.2.25", 25),      # the ISP's relay: OP25B lets it through
    ("op25b", "tcp", "203.0.113.10", 25),
    ("listed", "udp", LISTED, 5301),
    ("listed", "tcp", LISTED, 443),
)

# Counts the IPv4 packets from argv[1] that arrive on eth0, by "proto/dst/dport" (TCP:
# SYNs only), from a packet socket. Commands on stdin: "snap" prints the counts so far as
# one JSON line; "mark P" waits (at most argv[2] s) for a UDP datagram to port P (an end
# marker, one of argv[3]..argv[4]) first, then prints them; EOF ends it. "drops" is what
# the socket itself lost.
SINK = r"""
import json, select, socket, struct, sys, time
src, wait_s = socket.inet_aton(sys.argv[1]), float(sys.argv[2])
marks = range(int(sys.argv[3]), int(sys.argv[4]))
ETH_P_IP, SOL_PACKET, PACKET_STATISTICS, PACKET_OUTGOING = 0x0800, 263, 6, 4
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("eth0", ETH_P_IP))
s.setblocking(False)
counts, state, seen = {}, {"drops": 0}, set()
def drain():
    while True:
        try:
            p, addr = s.recvfrom(128)
        except BlockingIOError:
            return
        if addr[2] == PACKET_OUTGOING or len(p) < 24 or p[12:16] != src:
            continue
        ihl, proto, dst = (p[0] & 15) * 4, p[9], socket.inet_ntoa(p[16:20])
        dport = struct.unpack_from("!H", p, ihl + 2)[0]
        if proto == 17 and dport in marks:
            seen.add(dport)
        elif proto == 17 or (proto == 6 and p[ihl + 13] & 0x02):
            k = f"{'udp' if proto == 17 else 'tcp'}/{dst}/{dport}"
            counts[k] = counts.get(k, 0) + 1
def report(mark=None):
    drain()
    state["drops"] += struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]
    print(json.dumps({"counts": counts, "drops": state["drops"], "mark": mark in seen}),
          flush=True)
print("ready", flush=True)
while True:
    r, _, _ = select.select([s, sys.stdin], [], [])
    if s in r:
        drain()
    if sys.stdin in r:
        cmd = sys.stdin.readline().split()
        if cmd == ["snap"]:
            report()
        elif cmd[:1] == ["mark"]:
            mark, deadline = int(cmd[1]), time.monotonic() + wait_s
            while mark not in seen and time.monotonic() < deadline:
                select.select([s], [], [], 0.05)
                drain()
            report(mark)
        else:
            break
"""

# Sends the streams (argv[1]: JSON list of [proto, dst, dport]) in turn from a raw socket,
# paced, until argv[2] packets, argv[3] seconds or the stop file (argv[5]), whichever
# first: UDP datagrams and TCP SYNs, each from its own source port. Then a few UDP
# datagrams to port MARK (argv[6]) at the first stream's address, the end marker. Prints
# what it sent per stream.
SENDER = r"""
import json, os, socket, struct, sys, time
streams = json.loads(sys.argv[1])
max_n, max_s, pps, stop_file, mark = (int(sys.argv[2]), float(sys.argv[3]),
                                      float(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
src = sys.argv[7]
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while t >> 16:
        t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
def packet(proto, dst, sport, dport):
    s4, d4 = socket.inet_aton(src), socket.inet_aton(dst)
    if proto == "udp":
        l4 = struct.pack("!HHHH", sport, dport, 9, 0) + b"x"
        num = 17
    else:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, sport * 7919, 0, 5 << 4, 0x02, 64240,
                         0, 0)
        num = 6
    c = csum(s4 + d4 + struct.pack("!BBH", 0, num, len(l4)) + l4)
    l4 = l4[:6] + struct.pack("!H", c) + l4[8:] if num == 17 else \
        l4[:16] + struct.pack("!H", c) + l4[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), sport, 0x4000, 64, num, 0,
                     s4, d4)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + l4
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sent = [0] * len(streams)
t0 = time.monotonic()
n = 0
print("started", flush=True)
while n < max_n:
    now = time.monotonic() - t0
    if now >= max_s or (n % 50 == 0 and os.path.exists(stop_file)):
        break
    if n / pps > now:
        time.sleep(n / pps - now)
    i = n % len(streams)
    proto, dst, dport = streams[i]
    s.sendto(packet(proto, dst, 20000 + (n // len(streams)) % 40000, dport), (dst, 0))
    sent[i] += 1
    n += 1
for _ in range(3):
    s.sendto(packet("udp", streams[0][1], 20000, mark), (streams[0][1], 0))
print(json.dumps(sent), flush=True)
"""


def key(proto: str, dst: str, port: int) -> str:
    return f"{proto}/{dst}/{port}"


class Router(LabRouter):
    """The CLI in the router namespace; the config loads the CSAM list with every attach."""

    def write_config(self, fast_path: bool = False) -> None:
        lst = self.workdir / "csam.txt"
        fd = os.open(lst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(LIST)
        cfg = lab_config(self.lab, self.workdir, extra=LIMITS + (FAST_PATH if fast_path else ""))
        cfg.write_text(cfg.read_text().replace("[sources]\n", f'[sources]\ncsam = "{lst}"\n'))

    def attach(self, hook: str, mode: str) -> dict:
        out = self.json("attach", "--hook", hook, "--mode", mode)
        assert {(a["hook"], a["mode"]) for a in out["attached"]} == \
            {(hook, mode if hook == "xdp" else "clsact")}
        return out


class Sink:
    """The packet counter on the Internet host's link (a child process of ours)."""

    def __init__(self, lab: Lab):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.inet, sys.executable, "-c", SINK, lab.addr["dyn4"],
             str(FLOW_TIMEOUT), str(MARK_PORTS.start), str(MARK_PORTS.stop)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the sink ended early"
        return json.loads(line)

    def counts(self) -> dict[str, int]:
        return self._ask("snap")["counts"]

    def after_mark(self, port: int) -> dict:
        """Everything up to the sender's end marker to ``port`` (a veth keeps the order)."""
        return self._ask(f"mark {port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()   # our own child, by its pid
                self.proc.wait(timeout=5)


LAB_TAG = "xzr"
LAB_SERVERS = False
ROUTER = {"xdp_peers": True}   # native XDP_TX/redirect into a veth needs XDP on the peer


def prepare_lab(lb: Lab) -> None:
    netns_run(lb.inet, "ip", "addr", "add", f"{LISTED}/32", "dev", "lo")
    for ns in (lb.dyn, lb.static, lb.inet):
        # As in test_lab_fastpath: the hosts' own packets carry their checksums after
        # an XDP redirect (the counted ones are made whole by the sender anyway).
        netns_run(ns, "ethtool", "-K", "eth0", "tx", "off", timeout=10)


@pytest.fixture(scope="module")
def sink(lab) -> Iterator[Sink]:
    sk = Sink(lab)
    try:
        yield sk
    finally:
        sk.stop()


def stream(lab: Lab, stop_file: str, mark: int) -> subprocess.Popen:
    """The sender in the dynamic subscriber's namespace (a child process of ours), on one
    CPU: a veth delivers on the sender's CPU, so the order holds up to the end marker."""
    p = subprocess.Popen(
        ["ip", "netns", "exec", lab.dyn, "taskset", "-c", "0", sys.executable, "-c", SENDER,
         json.dumps([s[1:] for s in STREAMS]), str(STREAM_MAX_PACKETS),
         str(STREAM_MAX_SECONDS), str(STREAM_PPS), stop_file, str(mark),
         lab.addr["dyn4"]],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    return p


def finish(p: subprocess.Popen) -> list[int]:
    try:
        out, _ = p.communicate(timeout=STREAM_MAX_SECONDS + 10)
    except subprocess.TimeoutExpired:
        p.kill()   # our own child, by its pid
        p.communicate()
        raise
    assert p.returncode == 0
    return json.loads(out)


_marks = iter(MARK_PORTS)


def allowed(counts: dict[str, int]) -> int:
    return sum(counts.get(key(*s[1:]), 0) for s in STREAMS if s[0] == "allowed")


def wait_flowing(sink: Sink, since: int) -> None:
    """Wait until allowed packets arrive again, past ``since`` of them."""
    deadline = time.monotonic() + FLOW_TIMEOUT
    while allowed(sink.counts()) <= since:
        assert time.monotonic() < deadline, "allowed traffic does not flow after the replace"
        time.sleep(0.02)


# (hook, fast path, the XDP mode of each attach in turn: the first is not under test).
# XDP: a replace in the same mode, then two changes of mode, which the kernel cannot swap
# (one XDP mode per interface at a time: loader.attach covers the gap with TC).
VARIANTS = {
    "xdp": ("xdp", False, ["native", "native", "generic", "native"]),
    "tc": ("tc", False, ["auto"] * 3),
    "xdp-fast-path": ("xdp", True, ["native"] * 3),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_replace_under_traffic(lab, router, sink, variant, tmp_path):
    hook, fast_path, modes = VARIANTS[variant]
    router.write_config(fast_path=fast_path)
    out = router.attach(hook, modes[0])
    assert out["fast_path"]["enabled"] is fast_path
    assert router.json("blocklist", "check", LISTED)["listed"]
    before = sink.counts()
    stop_file = tmp_path / "stop"
    mark = next(_marks)
    sender = stream(lab, str(stop_file), mark)
    try:
        wait_flowing(sink, allowed(before))
        for mode in modes[1:]:
            router.attach(hook, mode)
            wait_flowing(sink, allowed(sink.counts()))
        assert sender.poll() is None, "the stream ended before the last replace: raise its bounds"
    finally:
        stop_file.touch()
        sent = finish(sender)
    end = sink.after_mark(mark)
    assert end["mark"], "the end marker did not arrive"
    assert end["drops"] == 0, "the sink lost packets: the counts are not exact"
    got = {key(*s[1:]): end["counts"].get(key(*s[1:]), 0) - before.get(key(*s[1:]), 0)
           for s in STREAMS}
    by = {k: sent[i] for i, k in enumerate(key(*s[1:]) for s in STREAMS)}
    for what, proto, dst, port in STREAMS:
        k = key(proto, dst, port)
        assert by[k] > 100, f"{k}: only {by[k]} sent"
        if what != "allowed":
            assert got[k] == 0, f"{what} {k}: {got[k]} of {by[k]} got through a replace"
    allowed_sent = sum(by[key(*s[1:])] for s in STREAMS if s[0] == "allowed")
    allowed_got = sum(got[key(*s[1:])] for s in STREAMS if s[0] == "allowed")
    lost, replaces = allowed_sent - allowed_got, len(modes) - 1
    print(f"replace under traffic ({variant}): "
          f"{replaces} replaces, allowed {allowed_got}/{allowed_sent} received, "
          f"{lost} lost ({lost / replaces:.1f} per replace)")
    assert 0 <= lost <= MAX_LOST_PER_REPLACE * replaces, \
        f"{lost} of {allowed_sent} allowed packets lost over {replaces} replaces"
