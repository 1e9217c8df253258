"""Contracts, not addresses, with real traffic: `xdpzoot run` serving RADIUS accounting in
the lab's router, FreeRADIUS's radclient as the BRAS, iperf3 and SMTP from the dynamic
subscriber. The subscriber reconnects on a new address (Stop, then Start) in the middle of
its uploads: its volume continues in the same contract (one volume rule counts both
sessions), the throttle that rule set holds on the new address at once (the contract's
state slot is the same), OP25B still applies, and the old address is the pool's again.

Then the metrics endpoint under a real Prometheus (in this lab: the daemon serving RADIUS
too): a Prometheus server the test starts in the router's namespace scrapes `xdpzoot run`
every second, and the test asks its HTTP API for the OP25B drop counter after real SMTP
attempts, for the CSAM generation and digest after a second list is loaded, and for the
RADIUS listener's counters after a radclient Start. The scrape itself, fetched over HTTP,
parses with prometheus-client's parser and holds no list entry and no subscriber address.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xdpzoot.dataplane.instance import Instance
from xdpzoot.lab import Lab, LabRouter, in_netns, lab_config, netns_run, wait_for

pytestmark = pytest.mark.lab

LAB_TAG = "xzq"
ROUTER = {"hook": "xdp", "mode": "generic"}

CONTRACT = 7001
USER = "abc12345@zoot.example"
NEW_ADDR = "100.64.1.77"       # the address of the second session (the first: lab dyn4)
SECRET = "lab-bras-secret"
PORT = 5301
PACE = "30M"                   # iperf3 --fq-rate: the sender is paced, as in test_lab_bandwidth
METRICS = "127.0.0.1:9386"     # inside the router's namespace: its own loopback
PROMETHEUS = "127.0.0.1:9390"
LIST_A = "# list A\n192.0.2.99\n203.0.113.200/29\n2001:db8:bad::/48\n"
LIST_B = LIST_A + "192.0.2.98\n"

SUBSCRIBERS = f"""\
subscriber,address,type,up_kbps,down_kbps,flags,plan,user
100,100.64.1.0/24,dynamic,,,,,
100,2001:db8:1::/64,dynamic,,,,,
200,198.51.100.8/29,static,100000,100000,,,
200,2001:db8:2::/64,static,100000,100000,,,
{CONTRACT},,dynamic,,,,home,{USER}
"""

# 12 MB upstream in any hour throttles the contract to 2 Mbit/s.
RULES = """\
[[rule]]
name = "lab-up-12mb"
direction = "up"
window = "rolling:1h"
threshold = "12MB"
action = "throttle"
rate = "2Mbit"
start = "now"
duration = "until-below"
"""


class Router(LabRouter):
    """The CLI in the router namespace; the config serves RADIUS accounting on 127.0.0.1."""

    def write_config(self) -> None:
        d = self.workdir
        secret = d / "bras.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(SECRET + "\n")
        (d / "rules.toml").write_text(RULES)
        for name, text in (("a.txt", LIST_A), ("b.txt", LIST_B)):   # CSAM lists
            (d / name).write_text(text)
            (d / name).chmod(0o600)
        cfg = lab_config(self.lab, d, extra=f"""\
[metrics]
listen = "{METRICS}"
[radius]
listen = "127.0.0.1:1813"
session_timeout = 600
state = "{d}/radius.msgpack"
[[radius.client]]
name = "bras1"
source = ["127.0.0.0/8"]
secret_file = "{secret}"
""")
        cfg.write_text(cfg.read_text().replace("[bandwidth]\n", f"""[bandwidth]
tick_seconds = 1
snapshot_seconds = 1
rules = "{d}/rules.toml"
"""))
        (d / "subscribers.csv").write_text(SUBSCRIBERS)


def radclient(lab: Lab, attrs: dict[str, str]) -> None:
    """One accounting request from the router namespace; it must be answered."""
    text = "\n".join(f"{k} = {v}" for k, v in attrs.items()) + "\n"
    r = subprocess.run(["ip", "netns", "exec", lab.router, shutil.which("radclient") or
                        "radclient", "-x", "-r", "3", "-t", "2", "127.0.0.1:1813", "acct",
                        SECRET], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Accounting-Response" in r.stdout, r.stdout + r.stderr


def session(status: str, sid: str, addr: str) -> dict[str, str]:
    return {"Acct-Status-Type": status, "Acct-Session-Id": f'"{sid}"',
            "User-Name": f'"{USER}"', "NAS-IP-Address": "127.0.0.1",
            "Framed-IP-Address": addr}


def entry(router: Router, addr: str):
    """(sub_id, slot) of the entry that classifies ``addr`` in the router's maps."""
    import ipaddress

    a = ipaddress.ip_address(addr)
    key = (b"\0" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed
    with Instance(router.pin_dir) as inst:
        match = inst.classify(key)
    assert match, f"{addr}: no entry"
    return match[1].sub_id, match[1].slot


SMTP = """
import smtplib, socket, sys
try:
    with smtplib.SMTP(sys.argv[1], 25, local_hostname="client.lab.test", timeout=4) as s:
        s.sendmail("a@example.test", ["b@example.test"], "Subject: x\\r\\n\\r\\n" + sys.argv[2])
    print("sent")
except (socket.timeout, TimeoutError):
    print("timeout")
except OSError as e:
    print(f"error {e}")
"""


def upload(lab: Lab, *bound: str) -> subprocess.Popen:
    """iperf3 from the dynamic subscriber to the Internet host, bounded by ``bound``
    (``-n 8M`` or ``-t 3``); its JSON on stdout."""
    return subprocess.Popen(["ip", "netns", "exec", lab.dyn, "iperf3", "-c", lab.addr["inet4"],
                             "-p", str(PORT), *bound, "--fq-rate", PACE, "-J",
                             "--connect-timeout", "3000"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def test_reconnect_keeps_the_contract(lab, router, tmp_path):
    d = router.workdir
    router.cli("subscribers", "load", "--force", str(d / "subscribers.csv"))
    log = tmp_path / "daemon.log"
    audit = d / "audit.jsonl"
    with open(log, "w") as logf:
        daemon = subprocess.Popen(["ip", "netns", "exec", lab.router, *router.argv("run")],
                                  stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    iperf_srv = subprocess.Popen(["ip", "netns", "exec", lab.inet, "iperf3", "-s", "-p",
                                  str(PORT)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = lab.addr["dyn4"]
    try:
        def alive(what):
            def check():
                assert daemon.poll() is None, log.read_text()
                return what()
            return check

        wait_for(alive(lambda: (d / "state.msgpack").exists()), 60, f"the first tick: {log}")
        # Session 1 on the lab's dynamic address: the contract's entry, its own slot.
        radclient(lab, session("Start", "s1", old))
        sub, slot = entry(router, old)
        assert sub == CONTRACT and slot != 0

        def throttled() -> bool:
            return audit.exists() and any(
                json.loads(x)["action"] == "throttle" and json.loads(x)["subscriber"] == CONTRACT
                for x in audit.read_text().splitlines())

        # 8 MB from the first address: under the rule's 12 MB.
        first = upload(lab, "-n", "8M")
        out, _ = first.communicate(timeout=60)
        sent1 = json.loads(out)["end"]["sum_sent"]["bytes"]
        assert sent1 >= 8_000_000 and not throttled()

        # Reconnect: Stop, the address moves, Start on the new one.
        radclient(lab, session("Stop", "s1", old))
        netns_run(lab.dyn, "ip", "addr", "del", f"{old}/24", "dev", "eth0")
        netns_run(lab.dyn, "ip", "addr", "add", f"{NEW_ADDR}/24", "dev", "eth0")
        netns_run(lab.dyn, "ip", "route", "replace", "default", "via", lab.addr["rtr_dyn4"])
        radclient(lab, session("Start", "s2", NEW_ADDR))
        assert entry(router, NEW_ADDR) == (CONTRACT, slot)   # the same contract and slot
        assert entry(router, old)[0] == 100                  # the pool's again

        # 10 MB more from the new address: the contract passes 12 MB in the same window.
        second = upload(lab, "-n", "10M")
        try:
            wait_for(alive(throttled), 60, f"the rule's throttle of the contract: {log}")
        finally:
            second.kill()
            second.wait()
        use = router.json("usage", str(CONTRACT))
        row = next(r for r in use["rules"] if r["rule"] == "lab-up-12mb")
        assert row["bytes"] > 12_000_000 and row["state"] == "throttled", row
        assert use["maps"]["slot"] == slot and use["maps"]["throttle_up_kbps"] == 2000, use

        # The throttle bites on the new address: a 3 s upload gets far less than its pace.
        third = upload(lab, "-t", "3")
        try:
            out, _ = third.communicate(timeout=30)
        finally:
            if third.poll() is None:
                third.kill()
                third.wait()
        rate = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
        assert rate < 5, f"{rate:.1f} Mbit/s on the new address while throttled"
        print(f"contract {CONTRACT}: {sent1} B from {old}, then {row['bytes']} B in the rule's "
              f"window after the reconnect to {NEW_ADDR}; throttled there at {rate:.2f} Mbit/s")
        # OP25B: the contract is dynamic, so its new address cannot send to port 25.
        got = netns_run(lab.dyn, sys.executable, "-c", SMTP, lab.addr["inet4"],
                        uuid.uuid4().hex, timeout=20).stdout.strip()
        assert got == "timeout", got
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, log.read_text()
    finally:
        for p in (daemon, iperf_srv):
            if p.poll() is None:
                p.kill()
                p.wait()
        netns_run(lab.dyn, "ip", "addr", "del", f"{NEW_ADDR}/24", "dev", "eth0", check=False)
        netns_run(lab.dyn, "ip", "addr", "replace", f"{old}/24", "dev", "eth0", check=False)
        netns_run(lab.dyn, "ip", "route", "replace", "default", "via", lab.addr["rtr_dyn4"],
                  check=False)
        router.cli("unthrottle", str(CONTRACT), check=False)


# ---- the metrics endpoint under a real Prometheus ------------------------------------------

SMTP_SHORT = """
import smtplib, socket, sys
try:
    with smtplib.SMTP(sys.argv[1], 25, local_hostname="client.lab.test", timeout=1.5) as s:
        s.sendmail("a@example.test", ["b@example.test"], "Subject: x\\r\\n\\r\\nx\\r\\n")
    print("sent")
except (socket.timeout, TimeoutError):
    print("timeout")
"""


def get(url: str, ns: str, timeout: float = 5) -> bytes:
    """An HTTP GET from inside ``ns`` (this thread enters it for the request)."""
    with in_netns(ns), urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def query(lab: Lab, expr: str) -> float | None:
    """The value of an instant query against the test's Prometheus that has one series."""
    url = f"http://{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(get(url, lab.router))
    assert body["status"] == "success", body
    res = body["data"]["result"]
    return float(res[0]["value"][1]) if len(res) == 1 else None


def started(argv: list[str], ns: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=f, stderr=f)


def stopped(p: subprocess.Popen, log: Path) -> None:
    """SIGTERM (the daemon must stop cleanly), then SIGKILL: by pid, ours only."""
    try:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, log.read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module", autouse=True)
def prometheus(lab, tmp_path_factory) -> Iterator[Path]:
    """Prometheus in the router's namespace, scraping `xdpzoot run` there every second,
    from the module's start: it takes a new target on only some 5 s after it started (the
    pace of its discovery), which the test before the metrics' covers."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus missing: make setup installs the prometheus package"
    d = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: xdpzoot
    static_configs:
      - targets: ["{METRICS}"]
""")
    p = started([exe, f"--config.file={d}/prometheus.yml", f"--storage.tsdb.path={d}/data",
                 f"--web.listen-address={PROMETHEUS}", "--log.level=warn"], lab.router,
                d / "prometheus.log")
    try:
        yield d
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def scraped_daemon(lab, router, prometheus, tmp_path):
    """`xdpzoot run` in the router's namespace, list A in force, once Prometheus has
    scraped this process (not the daemon of a test before)."""
    router.cli("blocklist", "load", str(router.workdir / "a.txt"))
    since = int(time.time()) - 1
    log = tmp_path / "daemon.log"
    daemon = started(router.argv("run"), lab.router, log)
    try:
        def up() -> bool:
            assert daemon.poll() is None, log.read_text()
            try:
                return query(lab, f'process_start_time_seconds{{job="xdpzoot"}} >= {since} '
                             'and on () up{job="xdpzoot"} == 1') is not None
            except OSError:   # Prometheus not listening yet
                return False

        wait_for(up, 60, "Prometheus scraping the daemon")
        yield
    finally:
        stopped(daemon, log)


def test_metrics_under_prometheus(lab, router, scraped_daemon):
    # The scrape as Prometheus gets it: it parses, every family has HELP and TYPE, our
    # programs are on the three interfaces, no list entry or subscriber address is in it.
    text = get(f"http://{METRICS}/metrics", lab.router).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(f.documentation and f.type != "unknown" for f in fams.values())
    attached = {s.labels["interface"]: s.value
                for s in fams["xdpzoot_interface_attached"].samples}
    assert attached == {name: 1 for name in (*lab.access, *lab.core)}
    build = fams["xdpzoot_build_info"].samples[0].labels
    assert (build["hook"], build["mode"]) == ("xdp", "generic")
    entries = [x for x in LIST_B.splitlines() if x and not x.startswith("#")]
    rows = [row.split(",")[1] for row in SUBSCRIBERS.splitlines()[1:]]
    for net in [*entries, *filter(None, rows), lab.addr["dyn4"], NEW_ADDR]:
        assert net.split("/")[0] not in text, f"{net} appears in the exposition"

    # OP25B: real SMTP attempts from the dynamic subscriber; Prometheus gets the count
    # that `xdpzoot stats` reads.
    for _ in range(2):
        got = netns_run(lab.dyn, sys.executable, "-c", SMTP_SHORT, lab.addr["inet4"],
                        timeout=20).stdout.strip()
        assert got == "timeout", got
    drops = sum(r["packets"] for r in router.json("stats")["counters"]
                if (r["role"], r["verdict"], r["reason"]) == ("access", "drop", "op25b"))
    assert drops >= 2
    expr = 'xdpzoot_packets_total{role="access",verdict="drop",reason="op25b"}'
    wait_for(lambda: query(lab, expr) == drops, 30, f"Prometheus to have {drops} OP25B drops")

    # The CSAM list swapped: the other generation, list B's digest, its counts.
    gen = query(lab, "xdpzoot_csam_generation")
    router.cli("blocklist", "load", str(router.workdir / "b.txt"))
    wait_for(lambda: query(lab, "xdpzoot_csam_generation") == 1 - gen, 30,
             "Prometheus to have the new CSAM generation")
    sha = hashlib.sha256(LIST_B.encode()).hexdigest()[:16]
    assert query(lab, f'xdpzoot_csam_list_info{{sha256="{sha}"}}') == 1
    assert query(lab, 'xdpzoot_csam_entries{kind="host",family="ipv4"}') == 2

    # RADIUS: a Start is counted and its session held.
    starts = query(lab, 'xdpzoot_radius_requests_total{kind="start"}') or 0
    radclient(lab, session("Start", "m1", NEW_ADDR))
    wait_for(lambda: query(lab, 'xdpzoot_radius_requests_total{kind="start"}') == starts + 1,
             30, "Prometheus to count the RADIUS Start")
    assert query(lab, "xdpzoot_radius_sessions") >= 1
    radclient(lab, session("Stop", "m1", NEW_ADDR))

    # Our program taken off an interface behind xdpzoot's back: what the alert watches.
    gone = lab.access[1]
    expr = f'xdpzoot_interface_attached{{interface="{gone}"}}'
    netns_run(lab.router, "ip", "link", "set", "dev", gone, "xdpgeneric", "off")
    try:
        wait_for(lambda: query(lab, expr) == 0, 30, f"Prometheus to see {gone} without XDP")
    finally:   # the pinned program back on it
        netns_run(lab.router, "ip", "link", "set", "dev", gone, "xdpgeneric", "pinned",
                  f"{router.pin_dir}/prog_xdp_access")
    wait_for(lambda: query(lab, expr) == 1, 30, f"Prometheus to see {gone} with XDP again")
