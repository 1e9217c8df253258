"""Bandwidth control under real TCP: subscriber rates, a throttle on a live transfer, a volume
rule enforced by `xdpzoot run`, and congestion mode, through a router running xdpzoot attached
by the real CLI, with XDP and with TC.

One lab per module; the router's programs are replaced (not rebuilt) between hooks. Timing
belongs in the benchmark (bench/bench_bandwidth.py): these tests assert coarse facts only.

The lab's round trip time is some tens of microseconds, far below any real subscriber's. A
window-based TCP sender there offers one window per round trip, thousands of times the rate,
and only a shaper's queue could hold it back; a policer (which the data plane is: it drops,
it never queues) leaves it in timeouts. A real path's round trip paces a sender by its ACKs;
here the senders are paced by the socket (``iperf3 --fq-rate``, internal TCP pacing) at 1.5x
the subscriber's rate, which the limiter has to bring down to the rate. What an unpaced
sender gets is test_unpaced_tcp_gets_its_rate.

Known limit, xfail(strict=True): the unpaced sender with a tiny burst (a policer drops, it
never queues).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdpzoot.dataplane import schema
from xdpzoot.lab import Lab, LabRouter, netns_run, read_maildir, wait_for

pytestmark = pytest.mark.lab

SUB = 200                  # the static subscriber, 198.51.100.8/29
RATE_KBPS = 20_000         # its rate, both directions
RATE = RATE_KBPS / 1000    # Mbit/s
PACE = "30M"               # senders' socket pacing: 1.5 x RATE (see the module docstring)
BAND = (8.0, 22.0)         # Mbit/s a rate-limited transfer must land in
PORT = 5301
IPERF_GRACE = 20           # seconds an iperf3 run may take beyond its own -t

SUBSCRIBERS = f"""\
subscriber,address,type,up_kbps,down_kbps,flags
100,100.64.1.0/24,dynamic,,,
100,2001:db8:1::/64,dynamic,,,
{SUB},198.51.100.8/29,static,{RATE_KBPS},{RATE_KBPS},
{SUB},2001:db8:2::/64,static,{RATE_KBPS},{RATE_KBPS},
"""

CONFIG = """\
[interfaces]
access = ["acc-dyn", "acc-sta"]
core = ["core0"]
[bandwidth]
enabled = true
burst_ms = 5
bulk_kbps = 2000
bulk_seconds = 1
bulk_share = 10
tick_seconds = 1
snapshot_seconds = 1   # tests wait for a snapshot as the sign of a tick
rules = "{rules}"
state = "{state}"
audit = "{audit}"
[sources]
subscribers = "{subs}"
[limits]
hosts = 4096
prefixes = 1024
csam_hosts = 4096
csam_prefixes = 1024
subscribers = 4096
flows = 4096
"""

# The volume rule of the quota test: 20 MB upstream in any hour throttles to 2 Mbit/s.
RULES = """\
[[rule]]
name = "lab-up-20mb"
direction = "up"
window = "rolling:1h"
threshold = "20MB"
action = "throttle"
rate = "2Mbit"
start = "now"
duration = "until-below"
"""

# One SMTP transaction with a message of argv[3] bytes; prints "sent <seconds>" (the time
# from connect to QUIT), or what went wrong.
SMTP = """
import smtplib, socket, sys, time
host, port, size, token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
body = ("x" * 75 + "\\r\\n") * (size // 77)
msg = f"Subject: {token}\\r\\n\\r\\n{token}\\r\\n{body}"
t0 = time.monotonic()
try:
    with smtplib.SMTP(host, port, local_hostname="client.lab.test", timeout=5) as s:
        s.sendmail("a@example.test", ["b@example.test"], msg)
    print(f"sent {time.monotonic() - t0:.3f}")
except ConnectionRefusedError:
    print("refused")
except (socket.timeout, TimeoutError):
    print("timeout")
"""


LAB_TAG = "xzb"   # the conftest's lab; its router is attached by the hook fixture


class Router(LabRouter):
    """The CLI in the router namespace, with this module's config."""

    def write_config(self, path: Path | None = None, rules: str = "",
                     state_dir: Path | None = None) -> Path:
        path = path or self.config
        subs = self.workdir / "subscribers.csv"
        subs.write_text(SUBSCRIBERS)
        state_dir = state_dir or self.workdir
        path.write_text(CONFIG.format(subs=subs, rules=rules,
                                      state=state_dir / "state.msgpack",
                                      audit=state_dir / "audit.jsonl"))
        return path

    def volume(self) -> dict:
        """The static subscriber's row of `xdpzoot top` (zeros before it moved any byte)."""
        rows = self.json("top", "-n", "100")
        row = next((r for r in rows if r["subscriber"] == SUB), None)
        return row or {"up_bytes": 0, "down_bytes": 0}

    def drops(self, reason: str) -> int:
        return sum(r["packets"] for r in self.json("stats")["counters"]
                   if r["verdict"] == "drop" and r["reason"] == reason)


# ---- iperf3 ---------------------------------------------------------------------------------


def _listening(ns: str, port: int) -> bool:
    out = netns_run(ns, "ss", "-Hltn", f"sport = :{port}", timeout=10, check=False).stdout
    return bool(out.strip())


@contextlib.contextmanager
def iperf_server(ns: str) -> Iterator[subprocess.Popen]:
    """A one-test iperf3 server in ``ns``, listening when this yields, killed at the end."""
    # -J: the client's --get-server-output then carries the receiver's intervals as JSON.
    srv = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-1", "-J", "-p",
                            str(PORT)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            assert srv.poll() is None, "iperf3 server exited"
            return _listening(ns, PORT)

        wait_for(listening, 10, "the iperf3 server to listen")
        yield srv
    finally:
        srv.kill()
        srv.wait()


def client_argv(dst: str, seconds: float, pace: str | None) -> list[str]:
    argv = ["iperf3", "-c", dst, "-p", str(PORT), "-t", str(seconds), "-J", "-i", "1",
            "--get-server-output"]
    return argv + (["--fq-rate", pace] if pace else [])


def iperf(lab: Lab, sender: str, receiver: str, dst: str, seconds: float = 3,
          pace: str | None = PACE) -> dict:
    """One TCP transfer from namespace ``sender`` to a server in ``receiver`` at ``dst``;
    iperf3's JSON. Downstream is a client in the inet namespace (not ``-R``: iperf3 does not
    hand ``--fq-rate`` over to the server)."""
    with iperf_server(receiver):
        res = netns_run(sender, *client_argv(dst, seconds, pace), timeout=seconds + IPERF_GRACE,
                        check=False)
    doc = json.loads(res.stdout)
    assert "error" not in doc, doc["error"]
    return doc


def goodput(doc: dict) -> float:
    """Mbit/s the receiver got."""
    return doc["end"]["sum_received"]["bits_per_second"] / 1e6


def received(doc: dict) -> int:
    return doc["end"]["sum_received"]["bytes"]


def receiver_intervals(doc: dict) -> list[tuple[float, float, float]]:
    """(start s, end s, Mbit/s) per interval, as the receiving server saw them."""
    srv = doc.get("server_output_json") or {}
    return [(i["sum"]["start"], i["sum"]["end"], i["sum"]["bits_per_second"] / 1e6)
            for i in srv.get("intervals", [])]


def up(lab: Lab, ns: str | None = None, **kw) -> dict:
    return iperf(lab, ns or lab.static, lab.inet, lab.addr["inet4"], **kw)


def down(lab: Lab, **kw) -> dict:
    return iperf(lab, lab.inet, lab.static, lab.addr["sta4"], **kw)


@pytest.fixture(scope="module")
def capacity(lab) -> float | None:
    """Under `make vmtest` only (XZ_VMTEST set): Mbit/s the lab carries for the dynamic
    subscriber, who has no rate, before xdpzoot is attached: what the (emulated) machine can
    do at all. None elsewhere: nothing is measured, nothing skipped."""
    if not os.environ.get("XZ_VMTEST"):
        return None
    return goodput(up(lab, lab.dyn, pace=None))


def needs_rate(capacity: float | None) -> None:
    """Tell "could not measure" from "wrong": in the kernel matrix's VM only, a machine that
    cannot carry the subscriber's rate unlimited cannot show it limited; skip, saying so."""
    if capacity is not None and capacity < RATE:
        pytest.skip(f"this machine carries {capacity:.1f} Mbit/s without a limit, below the "
                    f"{RATE:.0f} Mbit/s rate under test (make vmtest under emulation)")


# ---- the tests ------------------------------------------------------------------------------


def test_rate_limit(lab, router, hook, capacity):
    needs_rate(capacity)
    before = router.volume()
    u, d = up(lab), down(lab)
    after = router.volume()
    # The limiter holds every transfer under the band's top. Its floor (TCP not collapsed
    # by the policer) is a matter of CPU time too: under the full suite's load one transfer
    # in some hundreds got 7 Mbit/s; the better of two must reach it.
    for name, doc, again in (("upstream", u, up), ("downstream", d, down)):
        got = [goodput(doc)]
        if got[0] < BAND[0]:
            got.append(goodput(again(lab)))
        assert max(got) <= BAND[1], f"{name} {got} Mbit/s"
        assert max(got) >= BAND[0], f"{name} {got} Mbit/s"
    # What the receiver got passed the router, headers and all: the volume counters hold at
    # least as much (more: headers, the control connection, the other direction's ACKs).
    assert after["up_bytes"] - before["up_bytes"] >= received(u)
    assert after["down_bytes"] - before["down_bytes"] >= received(d)
    # The dynamic subscriber has no rate: over the same router and host it gets far more.
    free = goodput(up(lab, lab.dyn, pace=None))
    assert free > 40 or free > 1.5 * max(goodput(u), goodput(d)), f"unlimited {free:.1f}"


def test_volume_counts_every_packet(lab, router, hook):
    """Volume is counted in IP bytes as they are on the wire: a full TCP segment of 1448
    bytes is a 1500-byte IP packet, so a bulk transfer counts ~3.6% more than its payload,
    with either hook (volume rules must not depend on where the program is attached: at
    TC a GSO/GRO aggregate counts the headers of every packet it stands for)."""
    before = router.volume()
    doc = up(lab, seconds=2)
    ratio = (router.volume()["up_bytes"] - before["up_bytes"]) / received(doc)
    assert ratio > 1.03, f"counted / payload = {ratio:.4f}"


def test_throttle_live_transfer(lab, router, hook, capacity):
    needs_rate(capacity)
    drops = router.drops("throttle")
    with iperf_server(lab.inet):
        t0 = time.monotonic()
        client = subprocess.Popen(["ip", "netns", "exec", lab.static,
                                   *client_argv(lab.addr["inet4"], 7, PACE)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            # Not a wait for an event: the first 2 s of the transfer, unthrottled, are
            # measured (the receiver's intervals ending by then must be at the full rate).
            time.sleep(2)
            router.cli("throttle", str(SUB), "--rate", "2000")
            throttled_at = time.monotonic() - t0
            out, _ = client.communicate(timeout=7 + IPERF_GRACE)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    try:
        doc = json.loads(out)
        assert "error" not in doc, doc["error"]
        iv = receiver_intervals(doc)
        # The client's clock starts a little after Popen: intervals from 0.5 s after the
        # throttle command returned are surely throttled.
        before = [r for s, e, r in iv if e <= 2]
        after = [r for s, e, r in iv if s >= throttled_at + 0.5 and e - s > 0.5]
        assert before and max(before) > BAND[0], iv
        assert after, f"no interval after the throttle at {throttled_at:.1f} s: {iv}"
        assert max(after) < 5, iv
        assert router.drops("throttle") > drops
    finally:
        router.cli("unthrottle", str(SUB))
    # Unthrottled, the same subscriber's next transfer meets no throttle: a verdict, not a
    # rate (how fast TCP climbs back after the drops is the benchmark's business).
    drops = router.drops("throttle")
    assert received(up(lab, seconds=1)) > 0
    assert router.drops("throttle") == drops


def test_volume_rule_throttles(lab, router, hook, tmp_path):
    """`xdpzoot run` with a volume rule: 20 MB upstream in an hour throttles to 2 Mbit/s."""
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    cfg = router.write_config(tmp_path / "quota.toml", rules=str(rules), state_dir=tmp_path)
    audit = tmp_path / "audit.jsonl"
    log = tmp_path / "daemon.log"

    def throttle_logged() -> bool:
        if not audit.exists():
            return False
        for line in audit.read_text().splitlines():
            rec = json.loads(line)
            if rec["action"] == "throttle" and rec["subscriber"] == SUB:
                return True
        return False

    with open(log, "w") as logf:
        daemon = subprocess.Popen(["ip", "netns", "exec", lab.router,
                                   *router.argv("run", config=cfg)],
                                  stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    def ticked() -> bool:
        assert daemon.poll() is None, log.read_text()
        return (tmp_path / "state.msgpack").exists()

    try:
        # The first tick has read the counters' baseline once it has written its snapshot.
        wait_for(ticked, 30, f"the daemon's first tick: {log}")
        drops = router.drops("throttle")
        with iperf_server(lab.inet):
            # 30 MB at most, and 40 s at most (it stops once the throttle has been seen).
            client = subprocess.Popen(["ip", "netns", "exec", lab.static, "iperf3", "-c",
                                       lab.addr["inet4"], "-p", str(PORT), "-n", "30M",
                                       "--fq-rate", PACE],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            try:
                def throttled() -> bool:
                    assert client.poll() is None, "30 MB sent and no throttle"
                    return throttle_logged()

                wait_for(throttled, 40, f"the rule's throttle in the audit log: {log}")
                # The tick that logged it wrote the rate first: it bites.
                wait_for(lambda: router.drops("throttle") > drops, 10,
                         "drops for the throttle")
                v0, t0 = router.volume()["up_bytes"], time.monotonic()
                time.sleep(3)   # not a wait for an event: the rate is measured over 3 s
                v1, t1 = router.volume()["up_bytes"], time.monotonic()
            finally:
                client.kill()
                client.wait()
        rate = (v1 - v0) * 8 / (t1 - t0) / 1e6
        assert rate < 5, f"{rate:.1f} Mbit/s while throttled"
        assert router.drops("throttle") > 0
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()
        st = router.json("status")
        assert {(i["ifname"], i["hook"]) for i in st["interfaces"]} == {
            ("acc-dyn", hook), ("acc-sta", hook), ("core0", hook)}
        use = router.json("usage", str(SUB), config=cfg)
        row = next(r for r in use["rules"] if r["rule"] == "lab-up-20mb")
        assert row["bytes"] > 20_000_000 and row["state"] == "throttled", row
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        router.cli("unthrottle", str(SUB))   # the rule's throttle stays in the maps


def smtp(lab: Lab, size: int = 4000) -> tuple[str, float]:
    token = uuid.uuid4().hex
    res = netns_run(lab.static, sys.executable, "-c", SMTP, lab.addr["inet4"], "587",
                    str(size), token, timeout=30)
    word, *rest = res.stdout.split()
    if word == "sent":
        assert any(token in m["data"] for m in read_maildir(lab)), "sent but not delivered"
    return word, float(rest[0]) if rest else -1.0


def bulk_transfer(lab: Lab, seconds: int, during=None):
    """A paced upstream transfer of ``seconds`` from the static subscriber; ``during()`` is
    called while it runs. Returns the receiver's intervals and what ``during`` returned."""
    got = None
    with iperf_server(lab.inet):
        bulk = subprocess.Popen(["ip", "netns", "exec", lab.static,
                                 *client_argv(lab.addr["inet4"], seconds, PACE)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            if during:
                got = during()
            out, _ = bulk.communicate(timeout=seconds + IPERF_GRACE)
        finally:
            if bulk.poll() is None:
                bulk.kill()
                bulk.wait()
    doc = json.loads(out)
    assert "error" not in doc, doc["error"]
    return receiver_intervals(doc), got


def test_congestion_mode(lab, router, hook):
    drops = router.drops("bulk")
    assert router.json("congestion", "on")["active"]

    def held_then_smtp() -> tuple[str, float]:
        # The long flow is bulk once above 2 Mbit/s for over 1 s; held to its share, it
        # shows as drops for "bulk". Then the short exchange.
        wait_for(lambda: router.drops("bulk") > drops, 5, "drops for the bulk share")
        return smtp(lab)

    try:
        iv, (word, took) = bulk_transfer(lab, 6, held_then_smtp)
        # A short exchange of the same subscriber meanwhile is not held to the bulk share.
        assert word == "sent" and took < 5, (word, took)
        # The long flow was found bulk and held to its share (10% of 20 Mbit/s): packets
        # dropped for "bulk". For how long it stays held, see test_bulk_flow_stays_held.
        assert router.drops("bulk") > drops, iv
    finally:
        assert not router.json("congestion", "off")["active"]
    # Congestion mode off, a long transfer is no longer held to the bulk share: no drop for
    # "bulk" (a verdict; CI once saw 5 Mbit/s here where TCP had not yet climbed back).
    drops = router.drops("bulk")
    iv, _ = bulk_transfer(lab, 3)
    assert iv and router.drops("bulk") == drops, iv


def test_bulk_flow_stays_held(lab, router, hook):
    """In congestion mode a long transfer, once bulk, is to stay within its share (10% of
    20 Mbit/s, with a generous margin) for as long as it goes on. Measured: held for a
    second, then back at 10..17 Mbit/s, again and again."""
    assert router.json("congestion", "on")["active"]
    try:
        iv, _ = bulk_transfer(lab, 6)
    finally:
        assert not router.json("congestion", "off")["active"]
    late = [r for s, e, r in iv if s >= 2.5 and e - s > 0.5]
    assert late and max(late) < 5, iv


@pytest.mark.xfail(strict=True, reason=(
    "policer without a queue: an unpaced TCP sender at a LAN round trip gets a few percent "
    "of its rate (bpf/policy.h xz_gcra/xz_bandwidth); HTB at the same rate gets ~95%"))
def test_unpaced_tcp_gets_its_rate(lab, router, hook):
    """A plain TCP sender (no socket pacing) over the lab's ~0.05 ms round trip: its window
    per round trip is far above what 5 ms of 20 Mbit/s (12.5 kB, 8 full frames) holds; the
    limiter drops the rest of each flight, the retransmissions too (the bucket refills one
    frame per 0.6 ms), and TCP lives on retransmission timeouts. Measured: 0.5..3 Mbit/s
    with XDP and TC alike (bench/bench_bandwidth.py: HTB at the rate, same path: ~95%)."""
    assert goodput(up(lab, pace=None)) >= BAND[0]


# ---- a bug, shown without traffic --------------------------------------------------------------


def test_bulk_drops_do_not_use_up_the_rate(dp):
    """Congestion mode holds bulk flows to a share and leaves the rest of the rate to the
    subscriber's other flows. xz_bandwidth runs the subscriber's GCRA first (moving its
    ``tat`` by the packet's cost) and only then drops the packet for the bulk share: every
    packet a bulk flow offers, dropped or not, uses up the subscriber's rate.

    8 Mbit/s, burst 10 ms (about 7 full frames); the bulk share, 1%, is one full frame per
    150 ms. Twenty times: 20 back-to-back full frames of the bulk flow (dropped but for one
    now and then: the share), then the first packet of a new, short flow. The subscriber is
    far below its rate, so the short packets must pass; with the bug the bulk frames have
    filled the bucket each time and a short packet finds it full (it passes only when the
    test's own latency happened to drain one frame's cost, 1.5 ms)."""
    import ipaddress

    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    from xdpzoot import tables
    from xdpzoot.dataplane.layout import Entry

    def tcp(sport: int, size: int) -> bytes:
        return bytes(Ether() / IP(src="198.51.100.9", dst="203.0.113.10")
                     / TCP(sport=sport, dport=443) / Raw(b"x" * size))

    m = dp.maps
    m.clear_state([1])
    m.map("xz_flows").delete_many(m.map("xz_flows").keys())
    m.set_prefix(tables.key_of(ipaddress.ip_network("198.51.100.8/29")),
                 Entry(SUB, schema.TYPES["static"], 0, 8000, 8000, slot=1))
    m.set_control_params(burst_us=10_000, bulk_kbps=1, bulk_ms=0, bulk_share=1,
                         bulk_floor_kbps=0)
    m.set_control_flags(schema.C["XZ_C_RATES"] | schema.C["XZ_C_CONGESTION"])
    bulk = tcp(41000, 1460)
    shorts = [tcp(42000 + i, 10) for i in range(20)]   # each the first packet of its flow
    assert dp.verdict("xdp", "access", bulk)[0] == "pass"   # the flow's first window
    # Sleeps here are the time under test, not waits for an event: the flow's 100 ms
    # window closes, then the subscriber's bucket drains by the time it is given.
    time.sleep(0.15)
    dp.verdict("xdp", "access", bulk)                         # it closes: bulk from now on
    time.sleep(0.05)                                          # the subscriber's bucket drains
    v0, t0 = m.volumes([1])[1].up_bytes, time.monotonic()
    passed = 0
    for short in shorts:
        for _ in range(20):   # one by one: a repeat > 1 costs the kernel ~25 ms of RCU
            dp.verdict("xdp", "access", bulk)
        passed += dp.verdict("xdp", "access", short)[0] == "pass"
    v1, t1 = m.volumes([1])[1].up_bytes, time.monotonic()
    # The subscriber admitted well under half its rate (10 kB burst included) ...
    assert (v1 - v0) < 0.5 * (8000 * 1000 / 8 * (t1 - t0) + 10_000), (v1 - v0, t1 - t0)
    assert dp.counters()[("access", "drop", "bulk")] > 0
    # ... and yet its short flows are dropped for "rate".
    assert passed >= 18, dp.counters()
