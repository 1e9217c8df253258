"""`xdpzoot radius` and `xdpzoot run` with [radius], as processes in a namespace, answering
FreeRADIUS's radclient and writing sessions into a pinned instance; `xdpzoot sessions`
reading what they saved."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_radius import (  # noqa: F401 (netns, radclient_installed: fixtures)
    BRAS1,
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
from xdpzoot.dataplane import kernel, schema
from xdpzoot.dataplane.instance import Instance
from xdpzoot.sources.sessions import SessionTable

SRC = str(Path(__file__).resolve().parents[1] / "src")
FILE = """\
subscriber,address,type,up_kbps,down_kbps,flags,plan,user
9000,100.64.0.0/16,dynamic,,,,,
2001,,dynamic,100000,1000000,,home-1g,abc12345@zoot.example
"""


@pytest.fixture(scope="module")
def router(bpffs, tmp_path_factory) -> Iterator[dict]:
    """A config with [radius] on 0.0.0.0 (inside the test's namespace) and a pinned
    instance holding FILE, loaded by the CLI."""
    tmp = tmp_path_factory.mktemp("radius-cli")
    (tmp / "subscribers.csv").write_text(FILE)
    secret = tmp / "bras1.secret"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    cfg = tmp / "xdpzoot.toml"
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
state = "{tmp}/state.msgpack"
audit = "{tmp}/audit.jsonl"
tick_seconds = 1
[radius]
listen = "0.0.0.0:1813"
coa_listen = "0.0.0.0:3799"
state = "{tmp}/radius.msgpack"
[[radius.client]]
name = "bras1"
source = ["{BRAS1}/32"]
secret_file = "{secret}"
""")
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
        rc, out = radclient(netns, BRAS1, "acct", SECRET,
                            dict(RC_START, **{"Acct-Status-Type": "Stop"}))
        assert rc == 0 and "Accounting-Response" in out, out
        assert session_entry(router, "100.64.0.5")[0] is None
    finally:
        assert stopped(p) == 0
    assert len(SessionTable.restore(str(router["tmp"] / "radius.msgpack"), 3600)) == 1
