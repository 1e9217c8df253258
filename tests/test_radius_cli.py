"""`xdpzoot radius` and `xdpzoot run` with [radius], as processes in a namespace, answering
FreeRADIUS's radclient and writing sessions into a pinned instance; `xdpzoot sessions`
reading what they saved; a new [radius] section or secret taken on SIGHUP."""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_radius import (  # noqa: F401 (netns, radclient_installed: fixtures)
    BRAS1,
    BRAS2,
    OTHER_SECRET,
    RC_START,
    SECRET,
    USER,
    needs_radclient,
    netns,
    q,
    radclient,
    radclient_installed,
    wait_for,
)

from xdpzoot import tables
from xdpzoot.daemon import Daemon
from xdpzoot.dataplane import kernel, schema
from xdpzoot.dataplane.instance import Instance
from xdpzoot.lab import in_netns
from xdpzoot.sources.sessions import SessionTable

SRC = str(Path(__file__).resolve().parents[1] / "src")
FILE = """\
subscriber,address,type,up_kbps,down_kbps,flags,plan,user
9000,100.64.0.0/16,dynamic,,,,,
2001,,dynamic,100000,1000000,,home-1g,abc12345@zoot.example
"""


def write_config(tmp: Path, radius: str, state: Path | None = None) -> Path:
    """A config for the instance holding FILE (``tmp/subscribers.csv``), its state files in
    ``state`` (default ``tmp``), with this [radius] section."""
    state = state or tmp
    cfg = state / "xdpzoot.toml"
    cfg.write_text(f"""\
[sources]
subscribers = "{tmp}/subscribers.csv"
[limits]
hosts = 4096
prefixes = 1024
subscribers = 4096
csam_hosts = 1024
csam_prefixes = 1024
flows = 1024
pool_addresses = 1024
[bandwidth]
state = "{state}/state.msgpack"
audit = "{state}/audit.jsonl"
tick_seconds = 1
[radius]
state = "{state}/radius.msgpack"
{radius}""")
    return cfg


def client(name: str, source: str, secret: Path) -> str:
    return f"""[[radius.client]]
name = "{name}"
source = ["{source}/32"]
secret_file = "{secret}"
"""


def secret_file(path: Path, secret: bytes) -> Path:
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def router(bpffs, tmp_path_factory) -> Iterator[dict]:
    """A config with [radius] on 0.0.0.0 (inside the test's namespace) and a pinned
    instance holding FILE, loaded by the CLI."""
    tmp = tmp_path_factory.mktemp("radius-cli")
    (tmp / "subscribers.csv").write_text(FILE)
    secret = secret_file(tmp / "bras1.secret", SECRET)
    cfg = write_config(tmp, 'listen = "0.0.0.0:1813"\ncoa_listen = "0.0.0.0:3799"\n'
                       + client("bras1", BRAS1, secret))
    pin = os.path.join(bpffs, f"radius-{secrets.token_hex(3)}")
    r = {"cfg": str(cfg), "pin": pin, "tmp": tmp}
    try:
        xz(r, "subscribers", "load", str(tmp / "subscribers.csv"))
        yield r
    finally:
        kernel.unpin_all(pin)


def xz(r: dict, *args: str, ns: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(_cmd(r, args, ns), capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert out.returncode == 0, out.stderr
    return out


def _cmd(r: dict, args: tuple[str, ...], ns: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "xdpzoot", "--config", r["cfg"], "--pin-dir", r["pin"], *args]
    return ["ip", "netns", "exec", ns, *cmd] if ns else cmd


def serving(r: dict, ns: str, args: tuple[str, ...], ready: str) -> subprocess.Popen:
    """The command in ``ns``, once it printed a line with ``ready`` on stderr."""
    p = subprocess.Popen(_cmd(r, args, ns), stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": SRC})
    lines = []
    for line in p.stderr:   # ends when the process does: no wait without an end
        lines.append(line)
        if ready in line:
            return p
    p.wait(10)
    raise AssertionError("".join(lines))


def stopped(p: subprocess.Popen) -> int:
    p.send_signal(signal.SIGTERM)
    rc = p.wait(30)
    if hasattr(p, "reader"):   # said()'s: at the end of the stream now
        p.reader.join(10)
    p.stderr.close()
    return rc


def session_entry(r: dict, addr: str):
    with Instance(r["pin"]) as inst:
        return inst.maps.get_host(tables.addr16(addr)), inst.contracts()


@needs_radclient
def test_radius_command_then_the_daemon(router: dict, netns: str) -> None:  # noqa: F811
    # `xdpzoot radius` alone: a Start becomes the contract's entry, a Disconnect suspends
    # the contract (audited), SIGTERM stops it with the snapshot written
    p = serving(router, netns, ("radius",), "serving")
    try:
        rc, out = radclient(netns, BRAS1, "acct", SECRET, RC_START)
        assert rc == 0 and "Accounting-Response" in out, out
        e, contracts = session_entry(router, "100.64.0.5")
        assert e is not None and (e.sub_id, e.slot) == (2001, contracts[2001].slot)
        assert e.flags & schema.C["XZ_F_SESSION"]
        rc, out = radclient(netns, BRAS1, "disconnect", SECRET, {"User-Name": q(USER)})
        assert rc == 0 and "Disconnect-ACK" in out, out
        assert session_entry(router, "100.64.0.5")[0].flags & schema.C["XZ_F_SUSPENDED"]
        # a user the file does not know yet: not written; once the file has it and is
        # loaded, the listener writes its session (it watches the loads)
        rc, _ = radclient(netns, BRAS1, "acct", SECRET, dict(
            RC_START, **{"Acct-Session-Id": q("s9"), "User-Name": q("new@x"),
                         "Framed-IP-Address": "100.64.0.9"}))
        assert rc == 0 and session_entry(router, "100.64.0.9")[0] is None
        subs = router["tmp"] / "subscribers.csv"
        subs.write_text(FILE + "2002,,dynamic,,,,,new@x\n")
        xz(router, "subscribers", "load", str(subs))
        wait_for(lambda: session_entry(router, "100.64.0.9")[0] is not None, 20)
        assert session_entry(router, "100.64.0.9")[0].sub_id == 2002
    finally:
        assert stopped(p) == 0
    audit = [json.loads(x) for x in (router["tmp"] / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["rule"] == "coa" and audit[-1]["subscriber"] == 2001
    table = SessionTable.restore(str(router["tmp"] / "radius.msgpack"), 3600)
    assert [s.user for s in table.sessions.values()] == [USER, "new@x"]

    got = json.loads(xz(router, "sessions", "--json").stdout)
    assert got["sessions"] == 2 and got["by_nas"] == {"bras1/192.0.2.1": 2}
    assert got["addresses"] == {"ipv4": 2} and got["age_s"] >= 0
    shown = json.loads(xz(router, "sessions", "show", "100.64.0.5", "--json").stdout)
    assert [s["user"] for s in shown["sessions"]] == [USER]
    assert "No entries found" in xz(router, "sessions", "show", "nobody@x").stdout

    # the daemon serves it too, from the snapshot; the session's entry is written again
    # at start (taken away here), and a Stop removes it
    with Instance(router["pin"]) as inst, inst.locked():
        inst.maps.del_host(tables.addr16("100.64.0.5"))
    p = serving(router, netns, ("run",), "running:")
    try:
        assert session_entry(router, "100.64.0.5")[0] is not None
        # a CoA sets the contract's rates: the metrics count it by cause, and the request
        rc, out = radclient(netns, BRAS1, "coa", SECRET, {
            "User-Name": q(USER), "Mikrotik-Rate-Limit": q("10M/50M")})
        assert rc == 0 and "Received CoA-ACK" in out, out
        with in_netns(netns), urlopen("http://127.0.0.1:9386/metrics", timeout=10) as resp:
            got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in
                   text_string_to_metric_families(resp.read().decode()) for s in f.samples}
        assert got[("xdpzoot_subscribers_throttled", (("cause", "coa"),))] == 1
        assert got[("xdpzoot_radius_requests_total", (("kind", "coa"),))] == 1
        assert got[("xdpzoot_radius_sessions", ())] == 2   # both restored from the snapshot
        rc, out = radclient(netns, BRAS1, "acct", SECRET,
                            dict(RC_START, **{"Acct-Status-Type": "Stop"}))
        assert rc == 0 and "Accounting-Response" in out, out
        assert session_entry(router, "100.64.0.5")[0] is None
    finally:
        assert stopped(p) == 0
    assert len(SessionTable.restore(str(router["tmp"] / "radius.msgpack"), 3600)) == 1


def said(p: subprocess.Popen, text: str, timeout: float = 30) -> str:
    """The next line of ``p``'s stderr holding ``text`` (a thread reads them: a wait has
    an end even if the process says nothing)."""
    if not hasattr(p, "lines"):
        p.lines = queue.Queue()
        p.reader = threading.Thread(target=lambda: [p.lines.put(x) for x in p.stderr])
        p.reader.start()
    deadline = time.monotonic() + timeout
    while True:
        line = p.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        if text in line:
            return line


def rotated(p: subprocess.Popen, secret: Path, value: bytes, mode: int) -> str:
    """Write ``value`` into the secret file (mode ``mode``), SIGHUP, and the line saying
    how the reload went."""
    secret.write_bytes(value + b"\n")
    secret.chmod(mode)
    p.send_signal(signal.SIGHUP)
    return said(p, "radius: reload")


NEW_SECRET = b"n3w-s3cret-bras1"


def closed(host: str, port: int) -> bool:
    """Whether nothing serves UDP ``host:port`` (in this thread's namespace): a datagram
    there is refused at once (ICMP port unreachable); a listener drops it unanswered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((host, port))
        s.send(b"\0")
        try:
            s.recv(64)
        except ConnectionRefusedError:
            return True
        except TimeoutError:
            pass
    return False


@needs_radclient
def test_radius_sighup_takes_a_rotated_secret_and_keeps_the_sessions(
        router: dict, netns: str, tmp_path: Path) -> None:  # noqa: F811
    secret = secret_file(tmp_path / "bras1.secret", SECRET)
    r = dict(router, cfg=str(write_config(router["tmp"], 'listen = "0.0.0.0:1813"\n' +
                                          client("bras1", BRAS1, secret), tmp_path)))
    p = serving(r, netns, ("radius",), "serving")
    try:
        rc, out = radclient(netns, BRAS1, "acct", SECRET, RC_START)
        assert rc == 0 and "Accounting-Response" in out, out
        line = rotated(p, secret, NEW_SECRET, 0o600)
        assert line.strip() == "xdpzoot: radius: reloaded: client bras1 secret changed"
        # the old secret gets no answer now, the new one does
        interim = dict(RC_START, **{"Acct-Status-Type": "Interim-Update"})
        rc, out = radclient(netns, BRAS1, "acct", SECRET, interim, timeout=1)
        assert rc != 0 and "Received" not in out, out
        rc, out = radclient(netns, BRAS1, "acct", NEW_SECRET, dict(
            RC_START, **{"Acct-Session-Id": q("s2"), "Framed-IP-Address": "100.64.0.6"}))
        assert rc == 0 and "Accounting-Response" in out, out
        # the session from before the SIGHUP is still in the maps
        e, _ = session_entry(r, "100.64.0.5")
        assert e is not None and e.sub_id == 2001
        # a new secret file others may read: refused, the listener goes on as it was
        line = rotated(p, secret, b"th1rd-s3cret", 0o644)
        assert "radius: reload failed, keeping the old config: " in line and "(chmod 600)" in line
        assert b"th1rd" not in line.encode() and b"n3w" not in line.encode()
        rc, out = radclient(netns, BRAS1, "acct", NEW_SECRET, interim)
        assert rc == 0 and "Accounting-Response" in out, out
    finally:
        assert stopped(p) == 0
    assert session_entry(r, "100.64.0.5")[0] is not None
    shown = json.loads(xz(r, "sessions", "show", USER, "--json").stdout)
    assert sorted(s["addresses"] for s in shown["sessions"]) == [["100.64.0.5/32"],
                                                                  ["100.64.0.6/32"]]


@needs_radclient
def test_run_sighup_moves_stops_and_starts_the_listener(
        router: dict, netns: str, tmp_path: Path, capsys) -> None:  # noqa: F811
    """Daemon.reload (what `xdpzoot run` does on SIGHUP), in the namespace: a new address
    and client taken while serving, nothing removed from the maps; an address in use
    refused; [radius] off stops the listener, on starts it from the snapshot."""
    s1 = secret_file(tmp_path / "bras1.secret", SECRET)
    s2 = secret_file(tmp_path / "bras2.secret", OTHER_SECRET)
    bras1 = client("bras1", BRAS1, s1)
    both = bras1 + client("bras2", BRAS2, s2)

    def reload(radius: str) -> str:
        write_config(router["tmp"], radius, tmp_path)
        d.reload()
        return capsys.readouterr().err

    with in_netns(netns):
        d = Daemon(str(write_config(router["tmp"], 'listen = "0.0.0.0:1813"\n' + bras1,
                                    tmp_path)), router["pin"])
        d.start()
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # no SO_REUSEADDR
        busy.bind(("0.0.0.0", 3800))
        try:
            rc, out = radclient(netns, BRAS1, "acct", SECRET, RC_START)
            assert rc == 0 and "Accounting-Response" in out, out
            removed = []
            apply = d.radius.inst.apply_sessions
            d.radius.inst.apply_sessions = lambda c, u: removed.extend(c.remove) or apply(c, u)
            err = reload(f'listen = "{BRAS2}:1813"\n' + both)
            assert f"radius: reloaded: listen 0.0.0.0:1813 -> {BRAS2}:1813, client bras2 " \
                   "added\n" in err
            assert closed(BRAS1, 1813)
            at_bras2 = dict(RC_START, **{"NAS-IP-Address": BRAS2,
                                         "Framed-IP-Address": "100.64.0.7"})
            rc, out = radclient(netns, BRAS2, "acct", OTHER_SECRET, at_bras2)
            assert rc == 0 and "Accounting-Response" in out, out
            err = reload(f'listen = "{BRAS2}:1813"\ncoa_listen = "0.0.0.0:3800"\n' + both)
            assert ("radius: reload failed, keeping the old config: [Errno 98] "
                    "0.0.0.0:3800: Address already in use") in err
            rc, out = radclient(netns, BRAS2, "acct", OTHER_SECRET,
                                dict(at_bras2, **{"Acct-Status-Type": "Interim-Update"}))
            assert rc == 0 and "Accounting-Response" in out, out
            assert removed == []
            assert "radius: stopped" in reload(both) and d.radius is None
            assert closed(BRAS2, 1813)
            assert len(SessionTable.restore(str(tmp_path / "radius.msgpack"), 60)) == 2
            assert "radius: started, 2 sessions restored" in reload(
                'listen = "0.0.0.0:1813"\n' + bras1)
            for addr in ("100.64.0.5", "100.64.0.7"):
                assert session_entry(router, addr)[0].sub_id == 2001
            rc, out = radclient(netns, BRAS1, "acct", SECRET,
                                dict(RC_START, **{"Acct-Status-Type": "Stop"}))
            assert rc == 0 and session_entry(router, "100.64.0.5")[0] is None
        finally:
            busy.close()
            if d.radius is not None:
                d.radius.stop()
            d.inst.close()
