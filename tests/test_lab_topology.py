"""The lab topology itself, with real traffic and no xdpzoot program attached.

If these fail, every other lab test fails for a reason that has nothing to do with xdpzoot.
Runs as root; builds one lab for the module (about a second) and tears it down even on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid

import pytest

from xdpzoot import lab as labmod
from xdpzoot.lab import (
    DNS_ANSWER4,
    DNS_ANSWER6,
    DNS_NAME,
    DNS_WHOAMI,
    Lab,
    lab_down,
    lab_exists,
    lab_servers,
    lab_state,
    lab_up,
    netns_run,
    read_maildir,
)

pytestmark = pytest.mark.lab


TAG = "xzt"   # marks labs made by tests, should one ever be left behind
LAB_TAG = TAG   # the conftest's lab fixture


def _prefix() -> str:
    return TAG + secrets.token_hex(3)


def _host_netns() -> list[str]:
    """Names of all namespaces on the host (read only)."""
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                         check=True, timeout=10).stdout.strip()
    return [e["name"] for e in json.loads(out)] if out else []


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _ns(lab: Lab, role: str) -> str:
    return {"dyn": lab.dyn, "sta": lab.static, "inet": lab.inet, "rtr": lab.router}[role]


# Clients run inside a namespace.  local_hostname is given so that smtplib does not ask a
# resolver for this host's FQDN (there is none inside the lab: that would be a slow timeout).
_SMTP_CLIENT = """
import smtplib, sys
host, port, src, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
msg = f"From: a@example.test\\r\\nTo: b@example.test\\r\\nSubject: {token}\\r\\n\\r\\n{token}\\r\\n"
with smtplib.SMTP(host, port, local_hostname="client.lab.test", timeout=5,
                  source_address=(src, 0) if src else None) as s:
    refused = s.sendmail("a@example.test", ["b@example.test"], msg)
    assert not refused, refused
print("sent")
"""

_DNS_CLIENT = """
import sys, dns.message, dns.query, dns.rdatatype
server, name, rdtype = sys.argv[1], sys.argv[2], sys.argv[3]
r = dns.query.udp(dns.message.make_query(name, getattr(dns.rdatatype, rdtype)), server, timeout=2)
print(" ".join(rr.to_text() for rrset in r.answer for rr in rrset))
"""


@pytest.mark.parametrize(
    "src, dst",
    [
        ("dyn", "inet4"), ("dyn", "inet6"), ("sta", "inet4"), ("sta", "inet6"),
        ("dyn", "relay4"), ("dyn", "relay6"), ("sta", "support4"), ("sta", "support6"),
        ("sta", "other4"),
    ],
)
def test_ping(lab: Lab, src: str, dst: str) -> None:
    netns_run(_ns(lab, src), "ping", "-n", "-c", "1", "-W", "2", lab.addr[dst], timeout=10)


@pytest.mark.parametrize("key", ["sta4b", "sta4c"])
def test_ping_from_static_secondary(lab: Lab, key: str) -> None:
    netns_run(lab.static, "ping", "-n", "-c", "1", "-W", "2", "-I", lab.addr[key],
              lab.addr["inet4"], timeout=10)


@pytest.mark.parametrize(
    "src, src_key, dst_key, port, peer_key",
    [
        ("dyn", None, "inet4", 25, "dyn4"),
        ("dyn", None, "inet4", 587, "dyn4"),
        ("sta", "sta4b", "inet4", 25, "sta4b"),
        ("dyn", None, "inet6", 25, "dyn6"),
        ("sta", None, "relay4", 587, "sta4"),
    ],
    ids=["dyn-25", "dyn-587", "sta4b-25", "dyn6-25", "sta-relay-587"],
)
def test_smtp_delivery(lab: Lab, src: str, src_key: str | None, dst_key: str, port: int,
                       peer_key: str) -> None:
    token = uuid.uuid4().hex
    src_addr = lab.addr[src_key] if src_key else ""
    res = netns_run(_ns(lab, src), sys.executable, "-c", _SMTP_CLIENT, lab.addr[dst_key],
                    str(port), src_addr, token, timeout=20)
    assert res.stdout.strip() == "sent"
    # The sink writes the file before it answers 250: no waiting needed.
    got = [m for m in read_maildir(lab) if token in m["data"]]
    assert len(got) == 1, read_maildir(lab)
    msg = got[0]
    assert msg["port"] == port
    assert msg["peer"] == lab.addr[peer_key]
    assert msg["rcpt_tos"] == ["b@example.test"]
    assert os.path.isfile(msg["file"]) and os.path.dirname(msg["file"]) == str(lab.maildir)


@pytest.mark.parametrize(
    "client, server_key, role",
    [
        ("inet", "dyn4", "dyn"),
        ("inet", "dyn6", "dyn"),
        ("inet", "sta4", "sta"),
        ("inet", "sta6", "sta"),
        ("inet", "sta4b", "sta"),
        ("dyn", "inet4", "inet"),
        ("sta", "inet6", "inet"),
    ],
)
def test_dns(lab: Lab, client: str, server_key: str, role: str) -> None:
    server = lab.addr[server_key]
    ns = _ns(lab, client)
    a = netns_run(ns, sys.executable, "-c", _DNS_CLIENT, server, DNS_NAME, "A", timeout=10)
    assert DNS_ANSWER4 in a.stdout.split()
    who = netns_run(ns, sys.executable, "-c", _DNS_CLIENT, server, DNS_WHOAMI, "TXT",
                    timeout=10)
    assert who.stdout.strip() == f'"{role}"'


def test_dns_aaaa(lab: Lab) -> None:
    r = netns_run(lab.inet, sys.executable, "-c", _DNS_CLIENT, lab.addr["dyn6"], DNS_NAME,
                  "AAAA", timeout=10)
    assert DNS_ANSWER6 in r.stdout.split()


def test_router_shape(lab: Lab) -> None:
    links = json.loads(netns_run(lab.router, "ip", "-j", "link", "show").stdout)
    assert {link["ifname"] for link in links} == {"lo", *lab.access, *lab.core}
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        assert netns_run(lab.router, "sysctl", "-n", key).stdout.strip() == "1"
    rp = netns_run(lab.router, "sysctl", "-n", "net.ipv4.conf.all.rp_filter").stdout
    assert rp.strip() == "0"
    # Every neighbour the lab's traffic needs is static: nothing was learnt or is pending.
    for ns in lab.namespaces:
        neigh = json.loads(netns_run(ns, "ip", "-j", "neigh", "show").stdout)
        learnt = [n for n in neigh if "PERMANENT" not in n.get("state", [])
                  and not n["dst"].startswith("fe80:")]
        assert not learnt, (ns, learnt)


def test_state_roundtrip(lab: Lab) -> None:
    assert lab_exists(lab.prefix)
    assert lab_state(lab.prefix) == lab
    servers = lab_servers(lab.prefix)
    assert set(servers) == {"smtp-inet", "dns-inet", "dns-dyn", "dns-sta"}
    for s in servers.values():
        assert not _pid_gone(s["pid"])
    # dnsmasq wrote its own pid file, and it names the pid we started.
    for role in ("inet", "dyn", "sta"):
        pidfile = lab.rundir / f"dnsmasq-{role}.pid"
        assert int(pidfile.read_text()) == servers[f"dns-{role}"]["pid"]


def test_lab_up_refuses_existing(lab: Lab) -> None:
    with pytest.raises(FileExistsError):
        lab_up(lab.prefix, servers=False)
    assert lab_exists(lab.prefix)


def test_lab_down_removes_everything() -> None:
    prefix = _prefix()
    rundir = labmod.RUN_ROOT / prefix
    pids: list[int] = []
    try:
        lab_up(prefix)
        pids = [s["pid"] for s in lab_servers(prefix).values()]
        assert len(pids) == 4 and lab_exists(prefix)
    finally:
        lab_down(prefix)
    assert not [n for n in _host_netns() if n.startswith(prefix)]
    assert not lab_exists(prefix)
    assert lab_state(prefix) is None
    assert not rundir.exists()
    assert all(_pid_gone(p) for p in pids)
    lab_down(prefix)  # idempotent


def test_lab_up_cleans_up_after_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = _prefix()

    def broken(lab: Lab, servers: dict) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(labmod, "_start_servers", broken)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            lab_up(prefix)
        assert not lab_exists(prefix)
        assert not (labmod.RUN_ROOT / prefix).exists()
    finally:
        lab_down(prefix)


@pytest.mark.parametrize("bad", ["", "x", "X1", "1abc", "a-b", "abcdefghijklm", "../etc"])
def test_bad_prefix(bad: str) -> None:
    with pytest.raises(ValueError):
        lab_up(bad)
