"""The CSAM list under real traffic: the list is swapped again and again by the real CLI
while a subscriber streams UDP at two addresses, one listed in every version of the list
and one only in every other; not one datagram to the first may get through. Then the
replies of ``[csam] action = "reject"``: a TCP RST and an ICMP "administratively
prohibited" that the subscriber's own stack turns into errors. With XDP and with TC.

One lab per module; the router's programs are replaced (not rebuilt) between hooks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from xdpzoot.lab import Lab, LabRouter, in_netns, netns_run, wait_for

pytestmark = pytest.mark.lab


ALWAYS = "192.0.2.66"      # on every version of the list
SOMETIMES = "192.0.2.67"   # on OLD only
PORT = 9999
SWAPS = 10
# The swap test's stream runs until the test says stop (a file), after its last swap: these
# bounds are the safety net, generous enough for an emulated machine, where ten list loads
# take minutes (a stream bounded at 10 s ended before the last swap there).
STREAM_PPS = 2_000
STREAM_MAX_SECONDS = 300.0
STREAM_MAX_PACKETS = int(STREAM_PPS * STREAM_MAX_SECONDS)   # whichever bound comes first
BURST = 200

LIST_OLD = f"# test list OLD\n{ALWAYS}\n{SOMETIMES}/32\n"
LIST_NEW = f"# test list NEW\n{ALWAYS}\n"

SUBSCRIBERS = """\
subscriber,address,type,up_kbps,down_kbps,flags
100,100.64.1.0/24,dynamic,,,
100,2001:db8:1::/64,dynamic,,,
200,198.51.100.8/29,static,100000,100000,
200,2001:db8:2::/64,static,100000,100000,
"""

CONFIG = """\
[interfaces]
access = ["acc-dyn", "acc-sta"]
core = ["core0"]
[op25b]
action = "drop"
allow = ["192.0.2.25/32", "2001:db8:ff::25/128"]
[suspend]
allow = ["192.0.2.80/32", "2001:db8:ff::80/128"]
[csam]
action = "{csam}"
[sources]
subscribers = "{subs}"
[limits]
csam_hosts = 4096
csam_prefixes = 1024
"""

# Counts UDP datagrams per destination address (IP_PKTINFO), on one socket bound to
# 0.0.0.0. Commands on stdin: "snap" prints the counts so far as one JSON line (after
# draining what is queued), "quit" or EOF ends it; it ends by itself after argv[2] s.
RECEIVER = r"""
import json, select, socket, struct, sys, time
IP_PKTINFO = 8
port, lifetime = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("0.0.0.0", port))
s.setblocking(False)
counts = {}
def drain():
    while True:
        try:
            _, anc, _, _ = s.recvmsg(64, socket.CMSG_SPACE(12))
        except BlockingIOError:
            return
        for level, kind, data in anc:
            if level == socket.SOL_IP and kind == IP_PKTINFO:
                dst = socket.inet_ntoa(data[8:12])   # ipi_addr: the header's destination
                counts[dst] = counts.get(dst, 0) + 1
print("ready", flush=True)
deadline = time.monotonic() + lifetime
while time.monotonic() < deadline:
    r, _, _ = select.select([s, sys.stdin], [], [], 0.2)
    if s in r:
        drain()
    if sys.stdin in r:
        cmd = sys.stdin.readline().strip()
        if cmd != "snap":
            break
        drain()
        print(json.dumps(counts), flush=True)
"""

# Streams one-byte UDP datagrams at the targets in turn, paced, until argv[3] packets,
# argv[4] seconds or the stop file, whichever first; prints what it sent per target.
SENDER = r"""
import json, os, socket, sys, time
targets, port = sys.argv[1].split(","), int(sys.argv[2])
max_n, max_s, pps, stop_file = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = dict.fromkeys(targets, 0)
t0 = time.monotonic()
n = 0
print("started", flush=True)
while n < max_n:
    now = time.monotonic() - t0
    if now >= max_s or (n % 50 == 0 and stop_file and os.path.exists(stop_file)):
        break
    if n / pps > now:   # pacing: the stream's rate, not a wait for an event
        time.sleep(n / pps - now)
    t = targets[n % len(targets)]
    s.sendto(b"x", (t, port))
    sent[t] += 1
    n += 1
print(json.dumps({"sent": sent, "seconds": time.monotonic() - t0}), flush=True)
"""

# A TCP connect and a connected UDP exchange; prints what the caller's stack made of them.
PROBE = r"""
import errno, json, socket, struct, sys
kind, host, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
IP_RECVERR, MSG_ERRQUEUE = 11, 0x2000
out = {}
if kind == "tcp":
    try:
        socket.create_connection((host, port), timeout=1.5).close()
        out["result"] = "connected"
    except ConnectionRefusedError:
        out["result"] = "refused"
    except (socket.timeout, TimeoutError):
        out["result"] = "timeout"
    except OSError as e:
        out["result"] = "errno " + errno.errorcode.get(e.errno, str(e.errno))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
    s.connect((host, port))
    s.settimeout(2)
    s.send(b"p" * size)
    try:
        s.recv(64)
        out["result"] = "answer"
    except (socket.timeout, TimeoutError):
        out["result"] = "timeout"
    except OSError as e:
        out["result"] = "errno " + errno.errorcode.get(e.errno, str(e.errno))
    try:   # the ICMP message itself, from the error queue: errno, origin, type, code
        _, anc, _, _ = s.recvmsg(64, 512, MSG_ERRQUEUE)
        for level, t, data in anc:
            if level == socket.SOL_IP and t == IP_RECVERR:
                ee_errno, origin, itype, code = struct.unpack_from("=IBBB", data)
                out["icmp"] = {"errno": errno.errorcode.get(ee_errno), "origin": origin,
                               "type": itype, "code": code,
                               "offender": socket.inet_ntoa(data[20:24])}
    except (BlockingIOError, socket.timeout, TimeoutError, OSError):
        pass
print(json.dumps(out))
"""


LAB_TAG = "xzs"
ROUTER = {"xdp_peers": True}   # the conftest's router fixture: attached by its hook fixture


class Router(LabRouter):
    """The CLI in the router namespace, with this module's config."""

    def write_config(self, csam: str = "drop") -> None:
        subs = self.workdir / "subscribers.csv"
        subs.write_text(SUBSCRIBERS)
        self.config.write_text(CONFIG.format(csam=csam, subs=subs))


    def csam_drops(self) -> int:
        return sum(r["packets"] for r in self.json("stats")["counters"]
                   if (r["role"], r["verdict"], r["reason"]) == ("access", "drop", "csam"))

    def csam_hits(self) -> int:
        return sum(self.json("blocklist", "status")["hits"].values())

    def listed(self, addr: str) -> bool:
        return self.json("blocklist", "check", addr)["listed"]


class Receiver:
    """The counting UDP receiver in the inet namespace (a child process of ours)."""

    def __init__(self, lab: Lab, lifetime: float):
        self.lab = lab
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.inet, sys.executable, "-c", RECEIVER, str(PORT),
             str(lifetime)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def counts(self) -> dict[str, int]:
        """The counts, once what is still on the wire has landed: a marker datagram, sent
        after it along the same path to an address that is not listed, has arrived."""
        marker = self.lab.addr["inet4"]
        seen = self.snap().get(marker, 0)
        with in_netns(self.lab.dyn), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"m", (marker, PORT))
        return wait_for(lambda: (c := self.snap()).get(marker, 0) > seen and c, 5,
                        "the marker datagram at the receiver")

    def snap(self) -> dict[str, int]:
        self.proc.stdin.write("snap\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the receiver ended early"
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()   # our own child, by its pid
                self.proc.wait(timeout=5)


def delta(after: dict[str, int], before: dict[str, int], addr: str) -> int:
    return after.get(addr, 0) - before.get(addr, 0)


def prepare_lab(lab: Lab) -> None:
    """The listed addresses, on the inet namespace's loopback (the conftest's lab fixture)."""
    for a in (ALWAYS, SOMETIMES):
        netns_run(lab.inet, "ip", "addr", "add", f"{a}/32", "dev", "lo")


@pytest.fixture(scope="module")
def lists(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("csam")
    out = {}
    for name, text in (("old", LIST_OLD), ("new", LIST_NEW)):
        p = d / f"{name}.txt"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        assert os.stat(p).st_mode & 0o777 == 0o600
        out[name] = str(p)
    return out


@pytest.fixture(scope="module")
def receiver(lab) -> Iterator[Receiver]:
    rx = Receiver(lab, lifetime=600)   # bounded, and stopped at the end
    try:
        yield rx
    finally:
        rx.stop()


def stream(lab: Lab, targets: list[str], stop_file: str = "",
           max_packets: int = STREAM_MAX_PACKETS, max_seconds: float = STREAM_MAX_SECONDS,
           pps: float = STREAM_PPS, cpu: int | None = None) -> subprocess.Popen:
    """Start the sender in the dynamic subscriber's namespace (a child process of ours),
    on one CPU if asked (a veth delivers on the sender's CPU: so does the data plane)."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    p = subprocess.Popen(
        ["ip", "netns", "exec", lab.dyn, *pin, sys.executable, "-c", SENDER, ",".join(targets),
         str(PORT), str(max_packets), str(max_seconds), str(pps), stop_file],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    return p


def finish(p: subprocess.Popen) -> dict[str, int]:
    try:
        out, _ = p.communicate(timeout=STREAM_MAX_SECONDS + 10)
    except subprocess.TimeoutExpired:
        p.kill()   # our own child, by its pid
        p.communicate()
        raise
    assert p.returncode == 0
    return json.loads(out)["sent"]


def burst(lab: Lab, rx: Receiver, addr: str, cpu: int | None = None) -> tuple[int, int]:
    """(sent, received) of a short paced burst to ``addr``."""
    before = rx.counts()
    sent = finish(stream(lab, [addr], max_packets=BURST, max_seconds=5, pps=1_000,
                         cpu=cpu))[addr]
    return sent, delta(rx.counts(), before, addr)


def probe(lab: Lab, ns: str, kind: str, host: str, port: int, size: int = 64) -> dict:
    """A TCP connect, or a connected UDP socket's send of ``size`` bytes and recv."""
    return json.loads(netns_run(ns, sys.executable, "-c", PROBE, kind, host, str(port),
                                str(size), timeout=20).stdout)


@pytest.fixture(scope="module")
def rejecting(router, hook, lists) -> Iterator[str]:
    """``[csam] action = "reject"`` (re-attached in place), NEW in force, for the tests of
    this hook that follow; back to "drop" before the next hook."""
    router.write_config(csam="reject")
    router.cli("attach", "--hook", hook)
    try:
        router.cli("blocklist", "load", lists["new"])
        assert router.listed(ALWAYS)
        yield hook
    finally:
        router.write_config()
        router.cli("attach", "--hook", hook)


PROHIBITED = {"errno": "EHOSTUNREACH", "origin": 2, "type": 3, "code": 13, "offender": ALWAYS}


def test_swap_under_traffic(lab, router, hook, lists, receiver, tmp_path):
    router.cli("blocklist", "load", lists["old"])
    assert router.listed(ALWAYS) and router.listed(SOMETIMES)
    drops0, hits0 = router.csam_drops(), router.csam_hits()
    before = receiver.counts()
    stop_file = tmp_path / "stop"
    sender = stream(lab, [ALWAYS, SOMETIMES], str(stop_file))
    try:
        # OLD in force: the stream is dropped, and so are the datagrams after the last swap.
        wait_for(lambda: router.csam_drops() > drops0, 60, "the stream's drops")
        loads = []
        for i in range(SWAPS):
            which = "new" if i % 2 == 0 else "old"
            r = router.json("blocklist", "load", lists[which])
            assert r["switched"], r
            loads.append(r["generation"])
            # The stream runs under each list: under NEW until a datagram to the address
            # only OLD lists got through, under OLD until the stream is dropped again.
            if which == "new":
                seen = receiver.counts().get(SOMETIMES, 0)
                wait_for(lambda seen=seen: receiver.counts().get(SOMETIMES, 0) > seen, 60,
                         "a datagram through under NEW")
            else:
                d = router.csam_drops()
                wait_for(lambda d=d: router.csam_drops() > d, 60, "drops under OLD")
        assert sender.poll() is None, "the stream ended before the last swap: raise its bounds"
        last = router.csam_drops()
        wait_for(lambda: router.csam_drops() > last, 60, "drops after the last swap")
    finally:
        stop_file.touch()
        sent = finish(sender)
    after = receiver.counts()
    got_always, got_sometimes = delta(after, before, ALWAYS), delta(after, before, SOMETIMES)
    # Generations alternate: each load went to the idle one.
    assert loads == [loads[0], 1 - loads[0]] * (SWAPS // 2)
    assert sent[ALWAYS] > 1_000 and sent[SOMETIMES] > 1_000
    assert got_always == 0, \
        f"{got_always} of {sent[ALWAYS]} datagrams to a listed address got through"
    # The other address got through while NEW was in force, and only then.
    assert 0 < got_sometimes < sent[SOMETIMES]
    # Every datagram that did not arrive was dropped by the CSAM rule, counted as such.
    drops = router.csam_drops() - drops0
    assert drops == sent[ALWAYS] + sent[SOMETIMES] - got_sometimes
    assert router.csam_hits() - hits0 == drops

    # The last load left OLD in force; NEW makes .67 reachable, OLD again does not.
    router.cli("blocklist", "load", lists["new"])
    assert router.listed(ALWAYS) and not router.listed(SOMETIMES)
    sent_n, got = burst(lab, receiver, SOMETIMES)
    assert got == sent_n == BURST
    sent_n, got = burst(lab, receiver, ALWAYS)
    assert (sent_n, got) == (BURST, 0)
    router.cli("blocklist", "load", lists["old"])
    assert router.listed(SOMETIMES)
    sent_n, got = burst(lab, receiver, SOMETIMES)
    assert (sent_n, got) == (BURST, 0)


def test_status_hits_every_cpu(lab, router, hook, lists, receiver):
    """`blocklist status` sums the hit counters over every CPU (kernel.PinnedMap.lookup of
    a per-CPU map once read CPU 0's value only, into a buffer too small for the rest)."""
    cpu = max(os.sched_getaffinity(0))
    if cpu == 0:
        pytest.skip("one CPU: nothing to miss")
    router.cli("blocklist", "load", lists["new"])
    drops0, hits0 = router.csam_drops(), router.csam_hits()
    sent, got = burst(lab, receiver, ALWAYS, cpu=cpu)   # counted on that CPU only
    assert (sent, got) == (BURST, 0)
    assert router.csam_drops() - drops0 == BURST       # the counters (bcc)
    assert router.csam_hits() - hits0 == BURST         # status (PinnedMap)


def test_reject_replies(lab, router, rejecting):
    a = lab.addr
    # Unlisted: the SMTP sink answers on every address of the inet namespace.
    assert probe(lab, lab.dyn, "tcp", a["other4"], 587)["result"] == "connected"
    assert probe(lab, lab.static, "tcp", a["other4"], 25)["result"] == "connected"
    # Listed: a RST from the router (no SMTP server answers it: the SYN never gets there).
    assert probe(lab, lab.dyn, "tcp", ALWAYS, 587)["result"] == "refused"
    assert probe(lab, lab.static, "tcp", ALWAYS, 25)["result"] == "refused"
    # Port 25 from a dynamic subscriber is OP25B's first (action "drop" here): the
    # CSAM rule decides only what the subscriber rules pass, so no RST but silence.
    assert probe(lab, lab.dyn, "tcp", ALWAYS, 25)["result"] == "timeout"
    # UDP: ICMP destination unreachable, code 13 (communication administratively
    # prohibited), which Linux reports to a connected socket as EHOSTUNREACH.
    u = probe(lab, lab.dyn, "udp", ALWAYS, PORT, size=64)
    assert u == {"result": "errno EHOSTUNREACH", "icmp": PROHIBITED}
    rows = router.json("stats")["counters"]
    assert any((r["role"], r["verdict"], r["reason"]) == ("access", "reject", "csam")
               and r["packets"] > 0 for r in rows)


def test_reject_short_datagram(lab, router, rejecting):
    """The ICMP answer (70 bytes for IPv4) is longer than a short datagram's frame: the
    reply program must grow the frame (native XDP on a veth has no tailroom for it: the
    reply program grows at the head)."""
    for size in (64, 23, 5):   # frames of 106, 65 and 47 bytes
        u = probe(lab, lab.dyn, "udp", ALWAYS, PORT, size=size)
        assert u == {"result": "errno EHOSTUNREACH", "icmp": PROHIBITED}, (size, u)
