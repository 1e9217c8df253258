"""The fast path under real traffic: a router attached at XDP native with
``[dataplane] fast_path = true`` forwards from XDP itself, and hands the kernel exactly what
it cannot forward (TTL 1, over the egress MTU, an unresolved neighbour), which the kernel
then answers or delivers; the policy (OP25B, CSAM, rates, counters) still applies.
test_lab_fastpath_tc.py runs these tests again with the router at TC.

Proof that the program forwarded a packet and not the kernel: the fast path's ``forwarded``
counter grows with the packets the pipeline passed, while the router kernel's own
forwarding counters (``ForwDatagrams``, ``Ip6OutForwDatagrams``) stay still.

One lab per module; the routes, MTUs and neighbours a test changes are put back after it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from test_lab_policy import smtp

from xdpzoot.config import Bandwidth
from xdpzoot.lab import Lab, LabRouter, in_netns, lab_config, netns_run, wait_for

pytestmark = pytest.mark.lab

PORT = 5302
IPERF_SECONDS = 2
IPERF_GRACE = 20           # seconds an iperf3 run may take beyond its own -t
CORE_MTU = 1280            # the IPv6 minimum: one value serves both families
BIG = 1400                 # ICMP payload: over CORE_MTU, under the access links' 1500
CSAM_LISTED = "192.0.2.99"  # "other4" on the inet namespace's loopback

EXTRA = """\
[dataplane]
fast_path = true
[limits]
csam_hosts = 4096
csam_prefixes = 1024
"""


LAB_TAG = "xzf"
ROUTER = {"hook": "xdp", "mode": "native", "xdp_peers": True}   # the conftest's router


class Router(LabRouter):
    """The CLI in the router namespace, with the fast path on."""

    def write_config(self, fast_path: bool = True) -> None:
        lab_config(self.lab, self.workdir, extra=EXTRA.replace(
            "true", "true" if fast_path else "false", 1))

    def fast(self) -> dict[str, int]:
        """Fast path packets by reason (``forwarded`` and the reasons to pass)."""
        return {r: c["packets"] for r, c in self.json("stats")["fast_path"].items()}

    def passed(self) -> int:
        """Packets the pipeline passed, both roles."""
        return sum(r["packets"] for r in self.json("stats")["counters"]
                   if r["verdict"] == "pass")

    def dropped(self, reason: str) -> int:
        return sum(r["packets"] for r in self.json("stats")["counters"]
                   if r["verdict"] == "drop" and r["reason"] == reason)

    def up_bytes(self, sub: int) -> int:
        """Subscriber ``sub``'s upstream volume (`xdpzoot top`; 0 before it moved a byte)."""
        rows = self.json("top", "-n", "100")
        return next((r["up_bytes"] for r in rows if r["subscriber"] == sub), 0)

    def kernel_forwarded(self) -> int:
        """Packets the router's kernel forwarded itself (IPv4 and IPv6)."""
        snmp = netns_run(self.lab.router, "cat", "/proc/net/snmp", "/proc/net/snmp6",
                         timeout=10).stdout.splitlines()
        ip = [line.split() for line in snmp if line.startswith("Ip: ")]
        v4 = int(dict(zip(ip[0][1:], ip[1][1:], strict=True))["ForwDatagrams"])
        v6 = next(int(line.split()[1]) for line in snmp
                  if line.startswith("Ip6OutForwDatagrams"))
        return v4 + v6


def prepare_lab(lab: Lab) -> None:
    """The conftest's lab fixture: on a wire every packet carries its checksums; a veth
    hands the stack's packets over with the TCP/UDP checksum left to an offload that never
    comes once XDP has redirected them: the hosts compute their own, as on a real link."""
    for ns in (lab.dyn, lab.static, lab.inet):
        netns_run(ns, "ethtool", "-K", "eth0", "tx", "off", timeout=10)


def test_attached_native_with_the_fast_path(router):
    """The module's router: XDP native, the fast path on every interface; the hosts' ends
    of the links run XDP too, so that a redirect into a veth reaches them."""
    out = router.attached
    assert {a["mode"] for a in out["attached"]} == {"native"}
    assert out["fast_path"] == {"enabled": True,
                                "egress": sorted(["acc-dyn", "acc-sta", "core0"]),
                                "virtual_macs": {}, "rp_filter": {}}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def link_mac(ns: str, dev: str) -> str:
    return json.loads(netns_run(ns, "ip", "-j", "link", "show", "dev", dev,
                                timeout=10).stdout)[0]["address"]


def ping(lab: Lab, dst: str, *args: str) -> str:
    """One ping from the dynamic subscriber; its output (it may fail)."""
    fam = "-6" if ":" in dst else "-4"
    res = netns_run(lab.dyn, "ping", fam, "-n", "-c", "1", "-W", "2", *args, dst, timeout=10,
                    check=False)
    return res.stdout + res.stderr


def iperf_up(lab: Lab, dst: str, ns: str | None = None, pace: str | None = None) -> dict:
    """A TCP transfer from the dynamic subscriber (or namespace ``ns``) to an iperf3 server
    in the inet namespace; ``pace``: the sender's socket pacing (iperf3 --fq-rate)."""
    srv = subprocess.Popen(["ip", "netns", "exec", lab.inet, "iperf3", "-s", "-1", "-p",
                            str(PORT), "-B", dst], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            assert srv.poll() is None, "iperf3 server exited"
            return bool(netns_run(lab.inet, "ss", "-Hltn", f"sport = :{PORT}",
                                  timeout=10).stdout)

        wait_for(listening, 10, "the iperf3 server to listen")
        res = netns_run(ns or lab.dyn, "iperf3", "-c", dst, "-p", str(PORT), "-t",
                        str(IPERF_SECONDS), "-J", *(["--fq-rate", pace] if pace else []),
                        timeout=IPERF_SECONDS + IPERF_GRACE, check=False)
    finally:
        srv.kill()
        srv.wait()
    doc = json.loads(res.stdout)
    assert "error" not in doc, doc["error"]
    return doc


@pytest.mark.parametrize("fam", ["4", "6"])
def test_tcp_transfer_is_forwarded_by_the_fast_path(lab, router, fam):
    """Checksums and MACs right (TCP gets through), every passed packet forwarded by the
    program."""
    fast0, passed0, kernel0 = router.fast(), router.passed(), router.kernel_forwarded()
    doc = iperf_up(lab, lab.addr["inet" + fam])
    got = doc["end"]["sum_received"]
    assert got["bytes"] > 0 and got["bits_per_second"] > 0
    fast = delta(fast0, router.fast())
    passed = router.passed() - passed0
    kernel = router.kernel_forwarded() - kernel0
    # Both directions (data and ACKs) enter the router through the program: each packet the
    # pipeline passed is forwarded by the fast path; the kernel forwards next to nothing.
    assert fast.get("forwarded", 0) >= 0.98 * passed > 1000, (fast, passed)
    assert fast["forwarded"] <= passed
    assert kernel <= 0.02 * passed, (kernel, passed)


@pytest.mark.parametrize("fam,answer", [("4", "Time to live exceeded"),
                                        ("6", "Time exceeded: Hop limit")])
def test_ttl_1_is_answered_by_the_router(lab, router, fam, answer):
    fast0 = router.fast()
    out = ping(lab, lab.addr["inet" + fam], "-t", "1")
    assert answer in out and lab.addr["rtr_dyn" + fam] in out, out
    assert delta(fast0, router.fast()).get("ttl", 0) >= 1
    # TTL 2 goes through, forwarded by the fast path.
    fast0 = router.fast()
    assert " 0% packet loss" in ping(lab, lab.addr["inet" + fam], "-t", "2")
    assert delta(fast0, router.fast()).get("forwarded", 0) >= 2   # request and reply


@pytest.mark.parametrize("fam,answer", [("4", f"Frag needed and DF set (mtu = {CORE_MTU})"),
                                        ("6", f"Packet too big: mtu={CORE_MTU}")])
def test_over_the_egress_mtu_is_answered(lab, router, fam, answer):
    netns_run(lab.router, "ip", "link", "set", "dev", "core0", "mtu", str(CORE_MTU))
    try:
        fast0 = router.fast()
        out = ping(lab, lab.addr["inet" + fam], "-M", "do", "-s", str(BIG))
        assert answer in out, out
        assert delta(fast0, router.fast()).get("mtu", 0) >= 1
        fast0 = router.fast()   # what fits still goes the fast way
        assert " 0% packet loss" in ping(lab, lab.addr["inet" + fam], "-M", "do", "-s", "1000")
        assert delta(fast0, router.fast()).get("forwarded", 0) >= 2
    finally:
        netns_run(lab.router, "ip", "link", "set", "dev", "core0", "mtu", "1500")
        netns_run(lab.dyn, "ip", "-" + fam, "route", "flush", "cache", check=False)


@pytest.mark.parametrize("fam", ["4", "6"])
def test_unresolved_neighbour_first_packet_delivered(lab, router, fam):
    """The kernel resolves the neighbour and delivers the packet that was waiting for it;
    once resolved, the fast path forwards again."""
    inet = lab.addr["inet" + fam]
    mac = link_mac(lab.inet, "eth0")
    netns_run(lab.router, "ip", "neigh", "del", inet, "dev", "core0")
    try:
        fast0 = router.fast()
        assert " 0% packet loss" in ping(lab, inet), "first packet not delivered"
        assert delta(fast0, router.fast()).get("no_neigh", 0) >= 1
        fast0 = router.fast()
        assert " 0% packet loss" in ping(lab, inet)
        assert delta(fast0, router.fast()).get("forwarded", 0) >= 2
    finally:
        netns_run(lab.router, "ip", "neigh", "replace", inet, "lladdr", mac, "dev", "core0",
                  "nud", "permanent")


@pytest.mark.parametrize("fam", ["4", "6"])
def test_frame_for_another_host_is_not_forwarded(lab, router, fam):
    """A frame on the access link addressed to another host's MAC (an interface sees such
    frames in promiscuous mode; a veth always): the kernel drops it, and the fast path does
    not forward it either. The same datagram to the router's MAC arrives: the frame is
    good."""
    a, port = lab.addr, PORT + 1
    af = socket.AF_INET if fam == "4" else socket.AF_INET6
    ip = (IP(src=a["dyn4"], dst=a["inet4"]) if fam == "4" else
          IPv6(src=a["dyn6"], dst=a["inet6"]))
    dyn_mac, rtr_mac = link_mac(lab.dyn, "eth0"), link_mac(lab.router, "acc-dyn")
    other = "02:00:5e:10:00:99"   # a host beside the router on the access link

    def frame(dst: str, n: int) -> bytes:
        return bytes(Ether(src=dyn_mac, dst=dst) / ip / UDP(sport=port, dport=port) /
                     f"datagram {n}".encode())

    with in_netns(lab.inet):
        rx = socket.socket(af, socket.SOCK_DGRAM)
    with in_netns(lab.dyn):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with rx, tx:
        rx.bind((a["inet" + fam], port))
        rx.settimeout(1.0)
        tx.bind(("eth0", 0))
        fast0 = router.fast()
        for n in range(5):
            tx.send(frame(other, n))
        deadline = time.monotonic() + 10
        while delta(fast0, router.fast()).get("other_host", 0) < 5:
            assert time.monotonic() < deadline, delta(fast0, router.fast())
            time.sleep(0.1)
        with pytest.raises(TimeoutError):
            rx.recv(100)
        got = delta(fast0, router.fast())
        assert (got.get("other_host"), got.get("forwarded", 0)) == (5, 0), got
        tx.send(frame(rtr_mac, 5))
        assert rx.recv(100) == b"datagram 5"
        assert delta(fast0, router.fast()).get("forwarded", 0) >= 1


def test_a_vrrp_virtual_mac_is_forwarded_when_named(lab, router):
    """Frames on the access link to a VRRP virtual MAC (keepalived's use_vmac: a macvlan on
    the router's access interface, up, which the kernel routes as its own): the fast path
    hands them to the kernel (other_host) until the macvlan is in [interfaces] vmacs, and
    then forwards them, checksums and MACs right (the datagrams arrive), routed as the
    kernel routes them, from the macvlan: a policy rule of its (`iif vrrp.7`) that
    prohibits the destination stops them (unroutable: the kernel's, none arrive)."""
    a, port, vmac = lab.addr, PORT + 2, "00:00:5e:00:01:07"
    dyn_mac = link_mac(lab.dyn, "eth0")
    netns_run(lab.router, "ip", "link", "add", "vrrp.7", "link", "acc-dyn", "address", vmac,
              "type", "macvlan", "mode", "private", timeout=10)
    netns_run(lab.router, "ip", "link", "set", "vrrp.7", "up", timeout=10)

    def frame(n: int) -> bytes:
        return bytes(Ether(src=dyn_mac, dst=vmac) / IP(src=a["dyn4"], dst=a["inet4"]) /
                     UDP(sport=port, dport=port) / f"datagram {n}".encode())

    def send(first: int) -> dict[str, int]:
        fast0 = router.fast()
        for n in range(first, first + 5):
            tx.send(frame(n))
        deadline = time.monotonic() + 10
        while sum(delta(fast0, router.fast()).values()) < 5:
            assert time.monotonic() < deadline, delta(fast0, router.fast())
            time.sleep(0.1)
        return delta(fast0, router.fast())

    with in_netns(lab.inet):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(lab.dyn):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        with rx, tx:
            rx.bind((a["inet4"], port))
            rx.settimeout(2.0)
            tx.bind(("eth0", 0))
            assert send(0) == {"other_host": 5}
            router.write_config()
            router.config.write_text(router.config.read_text().replace(
                'core = ["core0"]\n', 'core = ["core0"]\nvmacs = ["vrrp.7"]\n', 1))
            router.attach("xdp", "native")
            assert router.json("status")["fast_path"]["virtual_macs"] == {"acc-dyn": [vmac]}
            assert f"VRRP virtual MACs on acc-dyn: {vmac}" in router.cli("status").stdout
            while True:   # what the kernel delivered of the first five, if anything
                try:
                    rx.settimeout(0.5)
                    rx.recv(100)
                except TimeoutError:
                    break
            rx.settimeout(2.0)
            assert send(5) == {"forwarded": 5}
            assert sorted(rx.recv(100) for _ in range(5)) == [
                f"datagram {n}".encode() for n in range(5, 10)]
            netns_run(lab.router, "ip", "route", "add", "prohibit", a["inet4"], "table", "77",
                      timeout=10)
            netns_run(lab.router, "ip", "rule", "add", "iif", "vrrp.7", "table", "77", "pref",
                      "100", timeout=10)
            assert send(10) == {"unroutable": 5}
            rx.settimeout(1.0)
            with pytest.raises(TimeoutError):
                rx.recv(100)
    finally:
        netns_run(lab.router, "ip", "rule", "del", "pref", "100", timeout=10, check=False)
        netns_run(lab.router, "ip", "route", "flush", "table", "77", timeout=10, check=False)
        netns_run(lab.router, "ip", "link", "del", "vrrp.7", timeout=10, check=False)
        router.write_config()
        router.attach("xdp", "native")


def test_reverse_path_filter_as_the_kernels(lab, router):
    """rp_filter on the access interface (strict, as BCP 38 asks of an ISP's edge): a
    datagram from the subscriber's own address is forwarded by the fast path and arrives;
    one with a spoofed source (routed back by the core side) goes to the kernel, counted
    rp_filter, and the kernel drops it; `status` names the interface's filter."""
    a, port = lab.addr, PORT + 3
    dyn_mac, rtr_mac = link_mac(lab.dyn, "eth0"), link_mac(lab.router, "acc-dyn")

    def frame(src: str, n: int) -> bytes:
        return bytes(Ether(src=dyn_mac, dst=rtr_mac) / IP(src=src, dst=a["inet4"]) /
                     UDP(sport=port, dport=port) / f"datagram {n}".encode())

    def send(src: str, first: int) -> dict[str, int]:
        fast0 = router.fast()
        for n in range(first, first + 5):
            tx.send(frame(src, n))
        deadline = time.monotonic() + 10
        while sum(delta(fast0, router.fast()).values()) < 5:
            assert time.monotonic() < deadline, delta(fast0, router.fast())
            time.sleep(0.1)
        return delta(fast0, router.fast())

    hook = {a["hook"] for a in router.attached["attached"]}.pop()   # the module's
    netns_run(lab.router, "sysctl", "-q", "-w", "net.ipv4.conf.acc-dyn.rp_filter=1",
              timeout=10)
    try:
        router.attach(hook, "native" if hook == "xdp" else None)
        assert router.json("status")["fast_path"]["rp_filter"] == {"acc-dyn": "strict"}
        assert "rp_filter: acc-dyn strict" in router.cli("status").stdout
        with in_netns(lab.inet):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with in_netns(lab.dyn):
            tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with rx, tx:
            rx.bind((a["inet4"], port))
            rx.settimeout(2.0)
            tx.bind(("eth0", 0))
            assert send(a["dyn4"], 0) == {"forwarded": 5}
            assert sorted(rx.recv(100) for _ in range(5)) == [
                f"datagram {n}".encode() for n in range(5)]
            assert send("198.51.100.200", 5) == {"rp_filter": 5}
            rx.settimeout(1.0)
            with pytest.raises(TimeoutError):
                rx.recv(100)
    finally:
        netns_run(lab.router, "sysctl", "-q", "-w", "net.ipv4.conf.acc-dyn.rp_filter=0",
                  timeout=10)
        router.attach(hook, "native" if hook == "xdp" else None)


def test_for_the_router_itself_goes_to_the_kernel(lab, router):
    fast0 = router.fast()
    assert " 0% packet loss" in ping(lab, lab.addr["rtr_core4"])   # the router's own address
    assert delta(fast0, router.fast()).get("local", 0) >= 1


@pytest.mark.parametrize("fam", ["4", "6"])
def test_op25b_still_applies(lab, router, fam):
    a = lab.addr
    fast0, drops0 = router.fast(), router.dropped("op25b")
    assert smtp(lab, lab.dyn, a["inet" + fam], 25) == "timeout"
    assert smtp(lab, lab.dyn, a["inet" + fam], 587) == "sent"
    assert smtp(lab, lab.static, a["inet" + fam], 25) == "sent"
    assert router.dropped("op25b") > drops0
    assert delta(fast0, router.fast()).get("forwarded", 0) > 0


def test_csam_still_applies(lab, router, tmp_path):
    lst = tmp_path / "csam.txt"
    lst.write_text(f"{CSAM_LISTED}\n")
    lst.chmod(0o600)
    router.cli("blocklist", "load", str(lst))
    try:
        drops0 = router.dropped("csam")
        assert " 0% packet loss" not in ping(lab, CSAM_LISTED)
        assert router.dropped("csam") > drops0
        assert " 0% packet loss" in ping(lab, lab.addr["support4"])   # not listed
    finally:
        lst.write_text("# empty\n")
        router.cli("blocklist", "load", "--force", str(lst))   # an empty list: forced


def test_rates_still_apply(lab, router):
    """The static subscriber held to 20 Mbit/s (a throttle: the limiter its contract's rate
    uses too) gets no more than that, plus its burst, through the fast path: the limiter
    drops what is over, the fast path forwards the rest, and its volume counts it. The
    sender is paced by its socket, as in test_lab_bandwidth (whose module docstring says
    why), at three times the rate."""
    rate = 20.0   # Mbit/s
    # The most the receiver may see: the rate, and the burst (the config's default, 500 ms
    # of the rate) spent within the transfer's seconds; 10% for where they start and end.
    most = rate * (1 + Bandwidth().burst_ms / 1000 / IPERF_SECONDS) * 1.1
    pace = f"{int(rate * 3)}M"
    if os.environ.get("XZ_VMTEST"):   # as test_lab_bandwidth.needs_rate, under emulation only
        free = iperf_up(lab, lab.addr["inet4"], ns=lab.static, pace=pace)
        if free["end"]["sum_received"]["bits_per_second"] / 1e6 < 1.5 * rate:
            pytest.skip(f"this machine carries less than 1.5 x {rate:.0f} Mbit/s unthrottled "
                        "(make vmtest under emulation)")
    router.cli("throttle", "200", "--rate", str(int(rate * 1000)))
    try:
        fast0, passed0, drops0 = router.fast(), router.passed(), router.dropped("throttle")
        up0 = router.up_bytes(200)
        doc = iperf_up(lab, lab.addr["inet4"], ns=lab.static, pace=pace)
        mbps = doc["end"]["sum_received"]["bits_per_second"] / 1e6
        assert 0 < mbps <= most, f"{mbps:.1f} Mbit/s through a {rate:.0f} Mbit/s limit"
        # Its volume counts what it sent through the fast path: at least what arrived.
        assert router.up_bytes(200) - up0 >= doc["end"]["sum_received"]["bytes"]
        assert router.dropped("throttle") > drops0
        passed = router.passed() - passed0
        assert delta(fast0, router.fast()).get("forwarded", 0) >= 0.98 * passed > 100
    finally:
        router.cli("unthrottle", "200")


def test_status_shows_the_fast_path(lab, router):
    # Its own traffic (not what earlier tests left in the counters): one ping forwarded by
    # the fast path, one with TTL 1 handed to the kernel.
    ping(lab, lab.addr["inet4"])
    ping(lab, lab.addr["inet4"], "-t", "1")
    st = router.json("status")
    assert st["switches"]["fast_path"] is True
    fp = st["fast_path"]
    assert fp["enabled"] and sorted(fp["egress"]) == ["acc-dyn", "acc-sta", "core0"]
    assert fp["counters"]["forwarded"]["packets"] > 0
    text = router.cli("status").stdout
    assert "Fast path: on" in text and "forwarded" in text and "to kernel: ttl" in text


def test_switched_off_the_kernel_forwards(request, lab, router):
    """fast_path = false (a control bit: no recompile needed), at either hook: nothing is
    forwarded by the program. Put back as it was (the module's hook) for any test after."""
    hook, mode = request.module.ROUTER["hook"], request.module.ROUTER["mode"]
    try:
        for other in ("tc" if hook == "xdp" else "xdp", hook):
            router.write_config(fast_path=False)
            router.cli("attach", "--hook", other, "--mode", "native" if other == "xdp" else
                       "auto")
            fast0, kernel0 = router.fast(), router.kernel_forwarded()
            assert " 0% packet loss" in ping(lab, lab.addr["inet4"])
            assert delta(fast0, router.fast()) == {}
            assert router.kernel_forwarded() - kernel0 >= 2
    finally:
        router.write_config()
        router.cli("attach", "--hook", hook, "--mode", mode)
