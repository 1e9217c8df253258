"""The data plane in a lab with real traffic: real SMTP clients and server, real DNS
resolvers, through a router running xdpzoot attached by the real CLI, with XDP and TC.

One lab per module; the router's programs are replaced (not rebuilt) between hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from xdpzoot.lab import Lab, LabRouter, lab_config, netns_run, read_maildir

pytestmark = pytest.mark.lab


SMTP = """
import smtplib, socket, sys
host, port, src, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
wait = float(sys.argv[5])
msg = f"Subject: {token}\\r\\n\\r\\n{token}\\r\\n"
try:
    with smtplib.SMTP(host, port, local_hostname="client.lab.test", timeout=wait,
                      source_address=(src, 0) if src else None) as s:
        s.sendmail("a@example.test", ["b@example.test"], msg)
    print("sent")
except ConnectionRefusedError:
    print("refused")
except (socket.timeout, TimeoutError):
    print("timeout")
"""

DNS = """
import sys, dns.exception, dns.message, dns.query
try:
    r = dns.query.udp(dns.message.make_query("example.test", "A"), sys.argv[1],
                      timeout=float(sys.argv[2]))
    print("answer" if r.answer else "empty")
except dns.exception.Timeout:
    print("timeout")
"""


# How long a client waits before it calls a connection or a query unanswered ("timeout"):
# 3 s and 2 s, or 5x that under `make vmtest`, where a Python server under emulation takes
# seconds to answer what it answers at once here (a late answer must not read as blocked).
SLOW = 5 if os.environ.get("XZ_VMTEST") else 1
SMTP_TIMEOUT, DNS_TIMEOUT = 3 * SLOW, 2 * SLOW

LAB_TAG = "xzp"
ROUTER = {"xdp_peers": True}   # the conftest's router fixture: attached by its hook fixture


class Router(LabRouter):
    """The CLI in the router namespace, with this module's config."""

    def write_config(self, action: str = "drop") -> None:
        lab_config(self.lab, self.workdir, action=action)


def smtp(lab: Lab, ns: str, dst: str, port: int, src: str = "") -> str:
    token = uuid.uuid4().hex
    res = netns_run(ns, sys.executable, "-c", SMTP, dst, str(port), src, token,
                    str(SMTP_TIMEOUT), timeout=20 * SLOW)
    result = res.stdout.strip()
    if result == "sent":
        assert any(token in m["data"] for m in read_maildir(lab)), "sent but not delivered"
    return result


def dns(ns: str, server: str) -> str:
    return netns_run(ns, sys.executable, "-c", DNS, server, str(DNS_TIMEOUT),
                     timeout=20 * SLOW).stdout.strip()


@pytest.mark.parametrize("fam", ["4", "6"])
def test_op25b(lab, router, hook, fam):
    a = lab.addr
    assert smtp(lab, lab.dyn, a["inet" + fam], 25) == "timeout"
    assert smtp(lab, lab.dyn, a["inet" + fam], 587) == "sent"
    assert smtp(lab, lab.static, a["inet" + fam], 25) == "sent"
    assert smtp(lab, lab.dyn, a["relay" + fam], 25) == "sent"   # the ISP's own relay
    if fam == "4":
        assert smtp(lab, lab.static, a["inet4"], 25, src=a["sta4b"]) == "sent"   # the /29
    rows = router.json("stats")["counters"]
    assert any(r["reason"] == "op25b" and r["verdict"] == "drop" and r["packets"] > 0
               for r in rows)


@pytest.mark.parametrize("fam", ["4", "6"])
def test_ip53b(lab, router, hook, fam):
    a = lab.addr
    assert dns(lab.inet, a["dyn" + fam]) == "timeout"
    assert dns(lab.inet, a["sta" + fam]) == "answer"
    assert dns(lab.dyn, a["inet" + fam]) == "answer"   # the subscriber's own lookups


def test_suspend_and_resume(lab, router, hook):
    a = lab.addr
    out = router.json("suspend", a["dyn4"])
    assert out["suspended"]
    assert router.json("subscribers", "show", a["dyn4"])["flags"] == ["suspended"]
    assert smtp(lab, lab.dyn, a["inet4"], 587) == "timeout"
    assert dns(lab.dyn, a["inet4"]) == "timeout"
    assert smtp(lab, lab.dyn, a["support4"], 587) == "sent"   # support allow-list
    # The pool's other addresses are not affected: the static subscriber neither.
    assert smtp(lab, lab.static, a["inet4"], 587) == "sent"
    router.cli("resume", a["dyn4"])
    assert smtp(lab, lab.dyn, a["inet4"], 587) == "sent"
    # A whole subscriber by id: the static one, all of its addresses, both families.
    router.cli("suspend", "200")
    assert smtp(lab, lab.static, a["inet6"], 587) == "timeout"
    assert dns(lab.inet, a["sta4"]) == "timeout"
    router.cli("resume", "200")
    assert smtp(lab, lab.static, a["inet6"], 587) == "sent"


def test_reject_fails_fast(lab, router, hook):
    router.write_config(action="reject")
    router.cli("attach", "--hook", hook)
    try:
        assert smtp(lab, lab.dyn, lab.addr["inet4"], 25) == "refused"
        assert smtp(lab, lab.dyn, lab.addr["inet6"], 25) == "refused"
        assert smtp(lab, lab.dyn, lab.addr["inet4"], 587) == "sent"
    finally:
        router.write_config()
        router.cli("attach", "--hook", hook)


SCAN = """
import socket, sys
dst, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for port in range(first, first + n):   # one SYN each: a port scan, bounded
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((dst, port))
    s.close()
"""


def test_a_port_scan_shows_in_top(lab, router, hook):
    """200 SYNs to 200 ports of one host: `top --by scans` estimates ~200 destinations for
    the subscriber (the window never moves without a daemon: what the module's other tests
    opened counts too, a handful; the sketch counts a destination once, so the second hook's
    run adds nothing)."""
    netns_run(lab.static, sys.executable, "-c", SCAN, lab.addr["inet4"], "20000", "200",
              timeout=20)
    row = next(r for r in router.json("top", "--by", "scans") if r["subscriber"] == 200)
    assert 150 <= row["scans"] <= 280, row


def test_status_and_explain(lab, router, hook):
    st = router.json("status")
    assert {(i["ifname"], i["role"], i["hook"]) for i in st["interfaces"]} == {
        ("acc-dyn", "access", hook), ("acc-sta", "access", hook), ("core0", "core", hook)}
    assert st["tables"]["prefixes"] == 4
    assert st["switches"]["scans"]   # the default config counts them
    ex = router.json("explain", "--in", "access", "--src", lab.addr["dyn4"], "--dst",
                     lab.addr["inet4"], "--proto", "tcp", "--dport", "25")
    assert (ex["verdict"], ex["reason"]) == ("drop", "op25b")


CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.3).close()
    print("connected")
except OSError:
    print("no answer")
"""


def test_trace_sees_an_smtp_attempt(lab, router, hook):
    """`xdpzoot trace --count 1 --json` in the router's namespace, while a dynamic
    subscriber tries SMTP: the event names the hook, the reason and the subscriber (the
    pool's id), no address; the trace's flag is off once it exits."""
    argv = ["ip", "netns", "exec", lab.router,
            *router.argv("trace", "--count", "1", "--seconds", "20", "--json")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()   # once the flag is on; EOF (and the error) if not
        assert "tracing drops" in banner, banner + proc.stderr.read()
        assert netns_run(lab.dyn, sys.executable, "-c", CONNECT, lab.addr["inet4"], "25",
                         timeout=10).stdout.strip() == "no answer"
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    event, summary = (json.loads(line) for line in out.splitlines())
    assert {k: event[k] for k in ("role", "hook", "verdict", "reason", "subscriber", "proto",
                                  "dport", "family")} == {
        "role": "access", "hook": hook, "verdict": "drop", "reason": "op25b",
        "subscriber": 100, "proto": "tcp", "dport": 25, "family": 4}
    assert "src" not in event and "dst" not in event
    assert summary["summary"]["events"] == 1
    assert not router.json("status")["switches"]["trace"]
