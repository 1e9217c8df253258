"""RADIUS accounting and CoA/Disconnect: the decoder, the session table, and the listener
answering FreeRADIUS's radclient (a client this project did not write) in a namespace of
its own.

Map writes go to a recorder here: the listener hands every change to the ``apply`` it is
given and answers only after it returned, which these tests check by what was recorded when
the answer arrived.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import packets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrad import packet as rp

from xdpzoot import tables
from xdpzoot.config import parse_config
from xdpzoot.dataplane import dirs, schema
from xdpzoot.dataplane.layout import Entry
from xdpzoot.lab import in_netns
from xdpzoot.model import TCP as P_TCP
from xdpzoot.model import Packet
from xdpzoot.sources import radius
from xdpzoot.sources.files import SourceError
from xdpzoot.sources.radius import Accounting, Drop
from xdpzoot.sources.radius_server import (
    Action,
    Client,
    Listener,
    open_listener,
    read_secret,
)
from xdpzoot.sources.sessions import Change, SessionTable

net = ipaddress.ip_network
SECRET = b"s3cret-bras1"
OTHER_SECRET = b"s3cret-bras2"
BRAS1 = "192.0.2.1"      # bras1's address (on the namespace's lo)
BRAS2 = "198.51.100.1"   # bras2's
ACCT, COA = 1813, 3799
USER = "abc12345@zoot.example"


# --- the session table, pure ----------------------------------------------------------------


def acct(status: str, sid: str = "s1", user: str = USER, *nets: str) -> Accounting:
    return Accounting(status, "192.0.2.1", sid, user, (b"class-1",), tuple(map(net, nets)))


class Recorder:
    """A table driven like the listener drives it: plan, apply (recorded), commit."""

    def __init__(self, timeout: float = 3600):
        self.table = SessionTable(timeout)
        self.changes: list[Change] = []

    def send(self, a: Accounting, nas: str = "bras1/192.0.2.1", now: float = 0.0) -> Change:
        p = self.table.plan(a, nas, now)
        if p.change:
            self.changes.append(p.change)
        self.table.commit(p, now)
        return p.change


def test_start_interim_stop() -> None:
    r = Recorder()
    c = r.send(acct("start", "s1", USER, "100.64.0.5/32"))
    assert c == Change(((net("100.64.0.5/32"), USER),), ())
    c = r.send(acct("interim", "s1", USER, "2001:db8:100::/56"))   # late prefix, no v4
    assert c == Change(((net("2001:db8:100::/56"), USER),), ())
    s = r.table.sessions[("bras1/192.0.2.1", "s1")]
    assert s.networks == (net("100.64.0.5/32"), net("2001:db8:100::/56"))
    assert s.cls == (b"class-1",)
    assert r.send(acct("interim", "s1", USER, "100.64.0.5/32")) == Change()   # nothing new
    assert r.send(Accounting("interim", "", "s1", "", (), ())) == Change()   # no User-Name
    assert r.table.sessions[("bras1/192.0.2.1", "s1")].user == USER
    c = r.send(acct("stop", "s1", USER))
    assert set(c.remove) == {net("100.64.0.5/32"), net("2001:db8:100::/56")} and not c.add
    assert len(r.table) == 0 and r.table.owner == {}


def test_retransmissions_change_nothing() -> None:
    r = Recorder()
    r.send(acct("start", "s1", USER, "100.64.0.5/32"))
    before = r.table.dump()
    assert r.send(acct("start", "s1", USER, "100.64.0.5/32")) == Change()
    assert r.table.dump() == before
    r.send(acct("stop", "s1"))
    assert r.send(acct("stop", "s1")) == Change()
    # a Start or Interim that arrives after its Stop does not bring the session back
    assert r.send(acct("start", "s1", USER, "100.64.0.5/32"), now=10) == Change()
    assert r.send(acct("interim", "s1", USER, "100.64.0.5/32"), now=11) == Change()
    assert len(r.table) == 0


def test_stop_keeps_an_address_another_session_took() -> None:
    r = Recorder()
    r.send(acct("start", "old", "a@x", "100.64.0.5/32", "2001:db8:1::/56"))
    # the NAS gives the address to a new session before the old one's Stop arrives
    c = r.send(acct("start", "new", "b@x", "100.64.0.5/32"))
    assert c == Change(((net("100.64.0.5/32"), "b@x"),), ())
    c = r.send(acct("stop", "old", "a@x"))
    assert c == Change((), (net("2001:db8:1::/56"),))
    assert r.table.owner == {net("100.64.0.5/32"): ("bras1/192.0.2.1", "new")}


def test_reconnect_same_contract_new_address() -> None:
    r = Recorder()
    r.send(acct("start", "s1", USER, "100.64.0.5/32"))
    r.send(acct("stop", "s1", USER))
    c = r.send(acct("start", "s2", USER, "100.64.0.9/32"))
    assert c == Change(((net("100.64.0.9/32"), USER),), ())
    assert r.changes[-2] == Change((), (net("100.64.0.5/32"),))


def test_accounting_on_clears_that_nas_only() -> None:
    r = Recorder()
    r.send(acct("start", "s1", "a@x", "100.64.0.1/32"))
    r.send(acct("start", "s2", "b@x", "100.64.0.2/32"))
    r.send(acct("start", "s1", "c@x", "100.64.1.1/32"), nas="bras2/198.51.100.1")
    r.send(acct("stop", "s9"))   # remembered as stopped
    c = r.send(acct("on", ""))
    assert set(c.remove) == {net("100.64.0.1/32"), net("100.64.0.2/32")}
    assert list(r.table.sessions) == [("bras2/198.51.100.1", "s1")]
    # after the reboot the NAS may use session ids again
    assert r.send(acct("start", "s9", "d@x", "100.64.0.3/32")).add
    assert r.send(acct("off", "")).remove == (net("100.64.0.3/32"),)


def test_expiry() -> None:
    r = Recorder(timeout=100)
    r.send(acct("start", "s1", "a@x", "100.64.0.1/32"), now=0)
    r.send(acct("start", "s2", "b@x", "100.64.0.2/32"), now=50)
    r.send(acct("interim", "s1", "a@x"), now=60)
    assert r.table.plan_expiry(149).put == {}
    p = r.table.plan_expiry(150)
    assert list(p.put) == [("bras1/192.0.2.1", "s2")]
    assert p.change == Change((), (net("100.64.0.2/32"),))
    assert len(r.table.plan_expiry(160).put) == 2


def test_failed_apply_changes_nothing() -> None:
    """The listener commits only after apply returned: a plan alone changes nothing."""
    r = Recorder()
    r.send(acct("start", "s1", USER, "100.64.0.5/32"))
    before = r.table.dump()
    r.table.plan(acct("stop", "s1"), "bras1/192.0.2.1", 1)
    r.table.plan(acct("on", ""), "bras1/192.0.2.1", 1)
    r.table.plan_expiry(1e9)
    assert r.table.dump() == before


def test_snapshot_round_trip(tmp_path: Path) -> None:
    r = Recorder()
    r.send(acct("start", "old", "a@x", "100.64.0.5/32", "2001:db8:1::/56"), now=1)
    r.send(acct("start", "new", "b@x", "100.64.0.5/32"), now=2)
    r.send(acct("stop", "gone"), now=3)
    path = tmp_path / "radius.msgpack"
    r.table.save(str(path))
    assert os.stat(path).st_mode & 0o077 == 0
    t = SessionTable.restore(str(path), 3600)
    assert t.sessions == r.table.sessions and t.owner == r.table.owner
    assert t.ended == r.table.ended
    assert SessionTable.restore(str(tmp_path / "absent"), 3600).sessions == {}
    path.write_bytes(b"\x93\x01\x02")
    with pytest.raises(ValueError, match="not a session snapshot"):
        SessionTable.restore(str(path), 3600)


_OPS = st.tuples(st.sampled_from(("start", "interim", "stop", "on", "off", "expire")),
                 st.sampled_from(("s1", "s2", "s3")), st.sampled_from(("a@x", "b@x")),
                 st.lists(st.sampled_from(("100.64.0.1/32", "100.64.0.2/32",
                                           "2001:db8:1::/56", "2001:db8:2::/64")),
                          max_size=3),
                 st.sampled_from(("bras1/192.0.2.1", "bras2/198.51.100.1")),
                 st.integers(0, 200))


@settings(max_examples=400, deadline=None)
@given(ops=st.lists(_OPS, max_size=25))
def test_table_and_maps_agree(ops: list) -> None:
    """Whatever the order of requests, the maps that replay the changes hold exactly the
    addresses the table says are owned, each with its owner's user, a change never
    removes what is not in the maps, and the snapshot records kept packed along the way
    are the ones a fresh packing of the table makes."""
    r = Recorder(timeout=300)
    maps: dict = {}
    now = 0.0
    for status, sid, user, nets, nas, dt in ops:
        now += dt
        if status == "expire":
            p = r.table.plan_expiry(now)
            change = p.change
            r.table.commit(p, now)
        else:
            change = r.send(acct(status, sid, user, *nets), nas=nas, now=now)
        for n in change.remove:
            assert n in maps
            del maps[n]
        maps.update(change.add)
        assert maps == {n: r.table.sessions[k].user for n, k in r.table.owner.items()}
        assert all(n in r.table.sessions[k].networks for n, k in r.table.owner.items())
    again = SessionTable.load(r.table.dump(), 300)
    assert again.dump() == r.table.dump()
    assert again.sessions == r.table.sessions and again.owner == r.table.owner


# --- rates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("10M/50M", (10000, 50000)),
    ("512k", (512, 512)),
    ("1000/2000000 2M/4M 1M/2M 10/10 8", (1, 2000)),
    ("0/0", (0, 0)),
    ("1G/1g", (1000000, 1000000)),
])
def test_mikrotik_rate(text: str, expected: tuple[int, int]) -> None:
    assert radius.mikrotik_rate(text) == expected


@pytest.mark.parametrize("text", ["", "10X/5M", "1/2/3", "-5M", "5.5M", "99999999999M",
                                  "１０M"])
def test_mikrotik_rate_refused(text: str) -> None:
    with pytest.raises(ValueError):
        radius.mikrotik_rate(text)


def test_cisco_rate() -> None:
    assert radius.cisco_rate("lcp:interface-config=rate-limit input 2000000 375000 750000 "
                             "conform-action transmit exceed-action drop") == ("up", 2000)
    assert radius.cisco_rate("ip:interface-config*rate-limit output 1500") == ("down", 2)
    for bad in ("subscriber:command=reauthenticate", "lcp:interface-config=rate-limit input",
                "lcp:interface-config=rate-limit sideways 1000"):
        with pytest.raises(ValueError):
            radius.cisco_rate(bad)


# --- secrets and config ---------------------------------------------------------------------


def test_secret_file_rules(tmp_path: Path) -> None:
    p = tmp_path / "bras1.secret"
    p.write_bytes(b"topsecret\n")
    p.chmod(0o600)
    assert read_secret(str(p), "k") == b"topsecret"
    p.chmod(0o644)
    with pytest.raises(SourceError) as info:
        read_secret(str(p), "radius.client 'bras1' secret_file")
    assert "mode 0644" in str(info.value) and "topsecret" not in str(info.value)
    link = tmp_path / "link"
    link.symlink_to(p)
    p.chmod(0o600)
    with pytest.raises(SourceError):
        read_secret(str(link), "k")
    with pytest.raises(SourceError, match="cannot open"):
        read_secret(str(tmp_path / "absent"), "k")
    assert "topsecret" not in repr(Client("bras1", (), b"topsecret"))


def test_config_radius() -> None:
    c = parse_config('[radius]\nlisten = "[::]:1813"\ncoa_listen = "0.0.0.0:3799"\n'
                     '[[radius.client]]\nname = "bras1"\nsource = ["192.0.2.0/28"]\n'
                     'secret_file = "/etc/xdpzoot/b1.secret"\n').radius
    assert c.listen == "[::]:1813" and c.client[0].source == (net("192.0.2.0/28"),)
    with pytest.raises(SourceError) as info:
        parse_config('[radius]\nlisten = "0.0.0.0"\nsession_timeout = 1\n'
                     '[[radius.client]]\nname = "b"\nsource = ["192.0.2.1/28"]\n'
                     'secret = "hunter2"\n', "x.toml")
    text = str(info.value)
    assert "x.toml: radius.listen: must be" in text
    assert "radius.session_timeout: must be an integer 10..604800" in text
    assert "[1].secret: unknown key" in text and "[1].secret_file: missing" in text
    with pytest.raises(SourceError, match="must be 1..64 letters"):
        parse_config('[[radius.client]]\nname = "bras1/x"\nsource = ["192.0.2.1"]\n'
                     'secret_file = "/s"\n')
    with pytest.raises(SourceError, match="no \\[\\[radius.client\\]\\] may send"):
        parse_config('[radius]\nlisten = "0.0.0.0:1813"\n')


# --- packets --------------------------------------------------------------------------------


def request(code: int = rp.AccountingRequest, secret: bytes = SECRET, ma: bool = False,
            **attrs) -> bytes:
    """A request as a NAS encodes it (pyrad), attributes as name=value with _ for -."""
    cls = rp.AcctPacket if code == rp.AccountingRequest else rp.CoAPacket
    p = cls(code=code, secret=secret, dict=radius.dictionary())
    for k, v in attrs.items():
        p.AddAttribute(k.replace("_", "-"), v)
    if ma:
        p.add_message_authenticator()
    return p.RequestPacket()


START = dict(Acct_Status_Type="Start", Acct_Session_Id="s1", User_Name=USER,
             NAS_IP_Address=BRAS1, Framed_IP_Address="100.64.0.5")


def resign(data: bytes, secret: bytes = SECRET) -> bytes:
    """``data`` with its Request Authenticator made again (so that only the change tested
    is wrong)."""
    auth = hashlib.md5(data[:4] + bytes(16) + data[20:] + secret).digest()
    return data[:4] + auth + data[20:]


def _set_len(data: bytes, n: int) -> bytes:
    return data[:2] + struct.pack("!H", n) + data[4:]


MALFORMED = {
    "short-header": lambda d: d[:19],
    "truncated": lambda d: d[:-3],
    "length-below-20": lambda d: resign(_set_len(d, 19)),
    "length-past-datagram": lambda d: resign(_set_len(d, len(d) + 4)),
    "length-over-4096": lambda d: resign(_set_len(d + bytes(4100 - len(d)), 4097)),
    "attribute-overrun": lambda d: resign(d[:21] + bytes([d[21] + 40]) + d[22:]),
    "attribute-length-1": lambda d: resign(d[:21] + b"\x01" + d[22:]),
    "attribute-header-cut": lambda d: resign(_set_len(d + b"\x01", len(d) + 1)),
    "message-authenticator-short": lambda d: resign(
        _set_len(d + b"\x50\x04\x00\x00", len(d) + 4)),
}


@pytest.mark.parametrize("how", list(MALFORMED))
def test_malformed_frames(how: str) -> None:
    data = MALFORMED[how](request(**START))
    with pytest.raises(Drop) as info:
        radius.verify(data, SECRET, False)
    assert info.value.cause == "malformed"


def test_verify() -> None:
    data = request(**START)
    assert radius.accounting(radius.verify(data, SECRET, False)).networks == (
        net("100.64.0.5/32"),)
    assert radius.verify(data + b"pad", SECRET, False)   # octets past Length are padding
    for got, cause in ((lambda: radius.verify(data, OTHER_SECRET, False), "authenticator"),
                       (lambda: radius.verify(data, SECRET, True), "message_authenticator"),
                       (lambda: radius.verify(b"\x01" + data[1:], SECRET, False), "code")):
        with pytest.raises(Drop) as info:
            got()
        assert info.value.cause == cause
    signed = request(ma=True, **START)
    assert radius.verify(signed, SECRET, True).message_authenticator
    # the Message-Authenticator is checked even when the Request Authenticator is right
    i = signed.index(b"\x50\x12") + 2
    forged = resign(signed[:i] + bytes(16) + signed[i + 16:])
    with pytest.raises(Drop, match="message_authenticator"):
        radius.verify(forged, SECRET, False)


@pytest.mark.parametrize("attrs, cause", [
    (dict(Acct_Session_Id="s1"), "missing_attribute"),
    (dict(Acct_Status_Type="Start"), "missing_attribute"),
    (dict(START, Framed_IP_Netmask="255.0.0.0"), "invalid_attribute"),
    (dict(START, Framed_IP_Netmask="255.0.255.0"), "invalid_attribute"),
    (dict(START, Framed_IP_Netmask="0.0.0.255"), "invalid_attribute"),
    (dict(START, Delegated_IPv6_Prefix="2001:db8::/16"), "invalid_attribute"),
    (dict(START, Framed_IPv6_Address="::ffff:192.0.2.9"), "invalid_attribute"),
])
def test_accounting_refused(attrs: dict, cause: str) -> None:
    with pytest.raises(Drop) as info:
        radius.accounting(radius.verify(request(**attrs), SECRET, False))
    assert info.value.cause == cause


def test_accounting_addresses() -> None:
    a = radius.accounting(radius.verify(request(
        **dict(START, Framed_IP_Netmask="255.255.255.248", Framed_IP_Address="100.64.0.9",
               Framed_IPv6_Prefix="2001:db8:1:2::/64", Delegated_IPv6_Prefix="2001:db8:99::/56",
               Framed_IPv6_Address="2001:db8:1:2::5", Class=b"\x00opaque")), SECRET, False))
    assert a.networks == (net("100.64.0.8/29"), net("2001:db8:1:2::/64"),
                          net("2001:db8:99::/56"), net("2001:db8:1:2::5/128"))
    assert a.cls == (b"\x00opaque",) and a.user == USER and a.nas == BRAS1
    pending = radius.accounting(radius.verify(request(
        **dict(START, Framed_IP_Address="255.255.255.254")), SECRET, False))
    assert pending.networks == ()


# --- the listener, in process ---------------------------------------------------------------


@dataclass
class Calls:
    """What the listener asked of the maps (``apply``) and of contracts (``act``); with a
    ``writer``, changes go on to it (real maps)."""

    changes: list[Change] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    fail: bool = False
    writer: Callable[[Change], None] | None = None

    def apply(self, c: Change) -> None:
        if self.fail:
            raise OSError("map full")
        if self.writer is not None:
            self.writer(c)
        self.changes.append(c)

    def act(self, a: Action) -> None:
        if self.fail:
            raise OSError("map full")
        self.actions.append(a)


def make_listener(calls: Calls, **kw) -> Listener:
    clients = [Client("bras1", (net(f"{BRAS1}/32"),), SECRET),
               Client("bras2", (net(f"{BRAS2}/32"),), OTHER_SECRET)]
    return Listener(clients, SessionTable(3600), calls.apply, calls.act, **kw)


def test_no_answer_before_the_write_and_none_after_a_failed_one() -> None:
    calls = Calls(fail=True)
    lst = make_listener(calls)
    assert lst.handle(request(**START), (BRAS1, 5000), "acct") is None
    assert lst.drops == {"apply_failed": 1} and len(lst.table) == 0
    calls.fail = False
    answer = lst.handle(request(**START), (BRAS1, 5000), "acct")
    assert answer is not None and answer[0] == rp.AccountingResponse
    assert len(calls.changes) == 1 and len(lst.table) == 1


def test_clients_by_source_and_requests_by_port() -> None:
    calls = Calls()
    lst = make_listener(calls)
    lst.clients.append(Client("bras6", (net("2001:db8:6::/64"),), SECRET))
    assert lst.client_of(BRAS1).name == "bras1"
    assert lst.client_of(f"::ffff:{BRAS2}").name == "bras2"   # from a dual-stack socket
    assert lst.client_of("2001:db8:6::1%lo").name == "bras6"
    assert lst.client_of("203.0.113.1") is None and lst.client_of("nonsense") is None
    # each port serves its own requests
    assert lst.handle(request(**START), (BRAS1, 1), "coa") is None
    dis = request(rp.DisconnectRequest, User_Name=USER)
    assert lst.handle(dis, (BRAS1, 1), "acct") is None
    assert lst.drops == {"code": 2} and calls.changes == [] and calls.actions == []


def test_one_client_cannot_touch_anothers_sessions() -> None:
    calls = Calls()
    lst = make_listener(calls)
    lst.handle(request(**START), (BRAS1, 5000), "acct")
    # bras2 claims to be bras1 (its NAS-IP-Address) and reboots
    on = request(secret=OTHER_SECRET, Acct_Status_Type="Accounting-On", NAS_IP_Address=BRAS1)
    assert lst.handle(on, (BRAS2, 5000), "acct") is not None
    assert len(lst.table) == 1 and len(calls.changes) == 1
    dis = request(rp.DisconnectRequest, OTHER_SECRET, User_Name=USER)
    answer = lst.handle(dis, (BRAS2, 5000), "coa")
    assert answer[0] == rp.DisconnectNAK and calls.actions == []


def test_listener_expiry_and_restart(tmp_path: Path) -> None:
    """Sessions without an Interim expire through apply; the table written at the end of
    serve() comes back, and a Stop after the restart removes exactly the session's entry."""
    now = [1000.0]
    calls = Calls()
    lst = make_listener(calls)
    lst.clock = lambda: now[0]
    lst.table.timeout = 100
    lst.handle(request(**START), (BRAS1, 1), "acct")
    lst.handle(request(**dict(START, Acct_Session_Id="s2", Framed_IP_Address="100.64.0.6")),
               (BRAS1, 1), "acct")
    now[0] += 60
    lst.handle(request(**dict(START, Acct_Status_Type="Interim-Update")), (BRAS1, 1), "acct")
    now[0] += 50
    calls.fail = True
    assert lst.expire() == 0 and lst.drops["apply_failed"] == 1 and len(lst.table) == 2
    calls.fail = False
    assert lst.expire() == 1
    assert calls.changes[-1] == Change((), (net("100.64.0.6/32"),))
    assert lst.stats()["requests"] == {"start": 2, "interim": 1, "expired": 1}

    path = str(tmp_path / "radius.msgpack")
    stop = asyncio.Event()
    stop.set()
    asyncio.run(lst.serve(None, None, stop, snapshot=str(tmp_path / "absent" / "x")))
    assert lst.stats()["errors"] == {"snapshot": 1}   # counted, nothing half-written
    assert os.listdir(tmp_path) == []
    asyncio.run(lst.serve(None, None, stop, snapshot=path))
    again = Listener(lst.clients, SessionTable.restore(path, 100), calls.apply)
    assert again.table.sessions == lst.table.sessions
    answer = again.handle(request(**dict(START, Acct_Status_Type="Stop")), (BRAS1, 1), "acct")
    assert answer is not None
    assert calls.changes[-1] == Change((), (net("100.64.0.5/32"),))


# --- radclient against the listener in a namespace ------------------------------------------

_names = itertools.count()
RADCLIENT = shutil.which("radclient")


def needs_radclient(test):
    """A test that talks to FreeRADIUS's radclient: `make setup` installs it
    (freeradius-utils); where it is missing the test fails, it is never skipped."""
    return pytest.mark.usefixtures("radclient_installed")(test)


@pytest.fixture
def radclient_installed() -> None:
    assert RADCLIENT, "radclient (freeradius-utils) is not installed: run `make setup`"


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace whose lo holds bras1's and bras2's addresses, deleted afterwards."""
    name = f"xzrad{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{BRAS1}/32", "dev", "lo"],
                    ["addr", "add", f"{BRAS2}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextmanager
def serving(ns: str, calls: Calls, **kw) -> Iterator[Listener]:
    """The listener on 0.0.0.0:1813 and :3799 inside ``ns``, on a loop in a thread."""
    lst = make_listener(calls, **kw)
    socks = []
    with in_netns(ns):
        for port in (ACCT, COA):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", port))
            s.setblocking(False)
            socks.append(s)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    t = threading.Thread(target=loop.run_until_complete,
                         args=(lst.serve(socks[0], socks[1], stop, every=3600),))
    t.start()
    try:
        yield lst
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(10)
        loop.close()


def radclient(ns: str, server: str, kind: str, secret: bytes, attrs: dict,
              timeout: int = 2) -> tuple[int, str]:
    """radclient's exit code and output for one request (one try)."""
    text = "\n".join(f"{k} = {v}" for k, v in attrs.items()) + "\n"
    port = ACCT if kind == "acct" else COA
    r = subprocess.run(["ip", "netns", "exec", ns, RADCLIENT, "-x", "-r", "1", "-t",
                        str(timeout), f"{server}:{port}", kind, secret.decode()],
                       input=text, capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout + r.stderr


def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def q(s: str) -> str:
    return f'"{s}"'


RC_START = {"Acct-Status-Type": "Start", "Acct-Session-Id": q("s1"), "User-Name": q(USER),
            "NAS-IP-Address": BRAS1, "Framed-IP-Address": "100.64.0.5"}


@needs_radclient
def test_radclient_session_life(netns: str) -> None:
    calls = Calls()
    with serving(netns, calls) as lst:
        rc, out = radclient(netns, BRAS1, "acct", SECRET, RC_START)
        assert rc == 0 and "Received Accounting-Response" in out, out
        assert calls.changes == [Change(((net("100.64.0.5/32"), USER),), ())]
        rc, out = radclient(netns, BRAS1, "acct", SECRET, dict(
            RC_START, **{"Acct-Status-Type": "Interim-Update",
                         "Delegated-IPv6-Prefix": "2001:db8:200::/56",
                         "Framed-IPv6-Prefix": "2001:db8:1:5::/64",
                         "Message-Authenticator": "0x00"}))
        assert rc == 0 and "Message-Authenticator = 0x" in out, out   # signed back
        assert calls.changes[1] == Change(((net("2001:db8:1:5::/64"), USER),
                                           (net("2001:db8:200::/56"), USER)), ())
        # a retransmitted Start (a new radclient request: new id) changes nothing
        rc, _ = radclient(netns, BRAS1, "acct", SECRET, RC_START)
        assert rc == 0 and len(calls.changes) == 2
        key = ("bras1/192.0.2.1", "s1")
        assert lst.table.sessions[key].networks == (
            net("100.64.0.5/32"), net("2001:db8:1:5::/64"), net("2001:db8:200::/56"))
        rc, _ = radclient(netns, BRAS1, "acct", SECRET,
                          dict(RC_START, **{"Acct-Status-Type": "Stop"}))
        assert rc == 0
        assert set(calls.changes[2].remove) == {
            net("100.64.0.5/32"), net("2001:db8:1:5::/64"), net("2001:db8:200::/56")}
        assert len(lst.table) == 0 and lst.table.owner == {}
        assert lst.requests == {"start": 2, "interim": 1, "stop": 1} and lst.drops == {}


@needs_radclient
def test_radclient_accounting_on(netns: str) -> None:
    calls = Calls()
    with serving(netns, calls) as lst:
        for i in range(3):
            radclient(netns, BRAS1, "acct", SECRET, dict(
                RC_START, **{"Acct-Session-Id": q(f"s{i}"), "User-Name": q(f"u{i}@x"),
                             "Framed-IP-Address": f"100.64.0.{10 + i}"}))
        radclient(netns, BRAS2, "acct", OTHER_SECRET, dict(
            RC_START, **{"NAS-IP-Address": BRAS2, "Framed-IP-Address": "100.64.9.9"}))
        assert len(lst.table) == 4
        rc, _ = radclient(netns, BRAS1, "acct", SECRET,
                          {"Acct-Status-Type": "Accounting-On", "NAS-IP-Address": BRAS1})
        assert rc == 0
        assert set(calls.changes[-1].remove) == {net(f"100.64.0.{10 + i}/32")
                                                 for i in range(3)}
        assert list(lst.table.owner) == [net("100.64.9.9/32")]


@needs_radclient
def test_radclient_wrong_secret_and_unknown_nas(netns: str) -> None:
    calls = Calls()
    with serving(netns, calls) as lst:
        rc, out = radclient(netns, BRAS1, "acct", b"wrong", RC_START, timeout=1)
        assert rc != 0 and "Received" not in out
        wait_for(lambda: lst.drops["authenticator"] == 1)
        # bras2's address with bras1's secret: the secret is the source's client's
        rc, out = radclient(netns, BRAS2, "acct", SECRET, RC_START, timeout=1)
        assert rc != 0
        wait_for(lambda: lst.drops["authenticator"] == 2)
        # from 127.0.0.1: no client's source
        rc, out = radclient(netns, "127.0.0.1", "acct", SECRET, RC_START, timeout=1)
        assert rc != 0 and "Received" not in out
        wait_for(lambda: lst.drops["unknown_client"] == 1)
        # CoA from an unknown source: no answer either
        rc, out = radclient(netns, "127.0.0.1", "disconnect", SECRET,
                            {"User-Name": q(USER)}, timeout=1)
        assert rc != 0
        wait_for(lambda: lst.drops["unknown_client"] == 2)
        assert calls.changes == [] and calls.actions == [] and len(lst.table) == 0


@needs_radclient
def test_radclient_message_authenticator_required(netns: str) -> None:
    calls = Calls()
    with serving(netns, calls, require_message_authenticator=True) as lst:
        rc, _ = radclient(netns, BRAS1, "acct", SECRET, RC_START, timeout=1)
        assert rc != 0
        wait_for(lambda: lst.drops["message_authenticator"] == 1)
        assert calls.changes == []
        rc, _ = radclient(netns, BRAS1, "acct", SECRET,
                          dict(RC_START, **{"Message-Authenticator": "0x00"}))
        assert rc == 0 and len(calls.changes) == 1


def udp(ns: str, source: str) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source, 0))
    s.settimeout(10)
    return s


@needs_radclient
def test_malformed_and_retransmitted_datagrams(netns: str) -> None:
    """Raw datagrams from bras1's address: the malformed get no answer and change nothing.
    Each is followed by a good request on the same socket; its answer shows the bad one was
    handled (one loop, in order)."""
    calls = Calls()
    with serving(netns, calls) as lst:
        s = udp(netns, BRAS1)
        good = request(**START)
        for i, how in enumerate(MALFORMED, 1):
            s.sendto(MALFORMED[how](good), (BRAS1, ACCT))
            s.sendto(good, (BRAS1, ACCT))
            answer = s.recv(4096)
            assert answer[0] == rp.AccountingResponse and answer[1] == good[1]
            assert lst.drops["malformed"] == i, how
        # the same datagram again and again: one change, the same answer each time
        assert len(calls.changes) == 1 and len(lst.table) == 1
        assert lst.requests["duplicate"] == len(MALFORMED) - 1
        s.sendto(good, (BRAS1, ACCT))
        assert s.recv(4096) == answer
        s.close()


def test_listener_from_config(netns: str, tmp_path: Path) -> None:
    """open_listener: the config's clients with their secrets, the snapshot restored, the
    sockets bound where the config says; a secret others may read stops it first."""
    secret = tmp_path / "bras1.secret"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    state = tmp_path / "radius.msgpack"
    r = Recorder()
    r.send(acct("start", "s1", USER, "100.64.0.5/32"))
    r.table.save(str(state))
    cfg = parse_config(f'''[radius]
listen = "{BRAS1}:{ACCT}"
coa_listen = "[::]:{COA}"
state = "{state}"
[[radius.client]]
name = "bras1"
source = ["{BRAS1}/32"]
secret_file = "{secret}"
''').radius
    calls = Calls()
    with in_netns(netns):
        lst, a, c = open_listener(cfg, calls.apply, calls.act)
    try:
        assert a.getsockname() == (BRAS1, ACCT) and c.getsockname()[:2] == ("::", COA)
        assert lst.clients == [Client("bras1", (net(f"{BRAS1}/32"),), SECRET)]
        assert lst.table.sessions == r.table.sessions
    finally:
        a.close()
        c.close()
    secret.chmod(0o640)
    with in_netns(netns), pytest.raises(SourceError, match="lets others read it"):
        open_listener(cfg, calls.apply, calls.act)


@needs_radclient
def test_radclient_coa_and_disconnect(netns: str) -> None:
    calls = Calls()
    with serving(netns, calls) as lst:
        radclient(netns, BRAS1, "acct", SECRET, RC_START)
        radclient(netns, BRAS1, "acct", SECRET, dict(
            RC_START, **{"Acct-Session-Id": q("s2"), "Framed-IP-Address": "100.64.0.6"}))
        rc, out = radclient(netns, BRAS1, "coa", SECRET, {
            "User-Name": q(USER), "Mikrotik-Rate-Limit": q("10M/50M")})
        assert rc == 0 and "Received CoA-ACK" in out, out
        assert calls.actions == [Action("rate", (USER,), 10000, 50000)]
        rc, out = radclient(netns, BRAS1, "coa", SECRET, {
            "Framed-IP-Address": "100.64.0.6", "WISPr-Bandwidth-Max-Up": "2000000",
            "WISPr-Bandwidth-Max-Down": "8000000"})
        assert rc == 0, out
        assert calls.actions[-1] == Action("rate", (USER,), 2000, 8000)
        rc, out = radclient(netns, BRAS1, "coa", SECRET, {
            "Acct-Session-Id": q("s1"),
            "Cisco-AVPair": q("lcp:interface-config=rate-limit output 30000000 5625000 "
                              "11250000 conform-action transmit exceed-action drop")})
        assert rc == 0 and calls.actions[-1] == Action("rate", (USER,), None, 30000)
        naks = [
            ({"User-Name": q("nobody@x"), "Mikrotik-Rate-Limit": q("1M")},
             "Session-Context-Not-Found"),
            ({"User-Name": q(USER)}, "Missing-Attribute"),
            ({"Mikrotik-Rate-Limit": q("1M")}, "Missing-Attribute"),
            ({"User-Name": q(USER), "Mikrotik-Rate-Limit": q("fast")},
             "Invalid-Attribute-Value"),
            ({"User-Name": q(USER), "Mikrotik-Rate-Limit": q("1M"),
              "WISPr-Bandwidth-Max-Up": "2000000"}, "Invalid-Attribute-Value"),
            ({"User-Name": q(USER), "Cisco-AVPair": q("subscriber:command=bounce")},
             "Unsupported-Attribute"),
            ({"User-Name": q(USER), "Session-Timeout": "60", "Mikrotik-Rate-Limit": q("1M")},
             "Unsupported-Attribute"),
            ({"User-Name": q(USER), "NAS-IP-Address": "203.0.113.1",
              "Mikrotik-Rate-Limit": q("1M")}, "NAS-Identification-Mismatch"),
        ]
        for attrs, cause in naks:
            rc, out = radclient(netns, BRAS1, "coa", SECRET, attrs)
            assert "Received CoA-NAK" in out and f"Error-Cause = {cause}" in out, (attrs, out)
        assert len(calls.actions) == 3
        before = lst.table.dump()
        rc, out = radclient(netns, BRAS1, "disconnect", SECRET,
                            {"Acct-Session-Id": q("s2"), "NAS-IP-Address": BRAS1})
        assert rc == 0 and "Received Disconnect-ACK" in out, out
        assert calls.actions[-1] == Action("suspend", (USER,))
        assert lst.table.dump() == before and len(calls.changes) == 2


@needs_radclient
def test_radclient_disconnect_ends_the_session(netns: str) -> None:
    calls = Calls()
    with serving(netns, calls, disconnect="session") as lst:
        radclient(netns, BRAS1, "acct", SECRET, RC_START)
        rc, out = radclient(netns, BRAS1, "disconnect", SECRET,
                            {"Framed-IP-Address": "100.64.0.5"})
        assert rc == 0 and "Disconnect-ACK" in out, out
        assert calls.changes[-1] == Change((), (net("100.64.0.5/32"),))
        assert len(lst.table) == 0 and calls.actions == []
        rc, out = radclient(netns, BRAS1, "disconnect", SECRET,
                            {"Framed-IP-Address": "100.64.0.5"})
        assert "Session-Context-Not-Found" in out


def map_writer(maps, contracts: dict[str, Entry], pool: Entry) -> Callable[[Change], None]:
    """A stand-in for the instance's apply: a session address becomes a host entry (a
    prefix: a trie entry) holding its contract's entry, or the pool's for an unknown user."""

    def write(c: Change) -> None:
        for n, user in c.add:
            e = contracts.get(user, pool)
            if tables.is_host(n):
                maps.set_host(tables.addr16(n.network_address), e)
            else:
                maps.set_prefix(tables.key_of(n), e)
        for n in c.remove:
            if tables.is_host(n):
                maps.del_host(tables.addr16(n.network_address))
            else:
                maps.del_prefix(tables.key_of(n))

    return write


def smtp_verdict(dp, src: str) -> str:
    dst = "2001:db8:ffff::25" if ":" in src else "198.51.100.25"
    frame = packets.frame(Packet("access", src, dst, P_TCP, 40000, 25))
    return {1: "drop", 2: "pass"}.get(dp.run("xdp", "access", frame).retval, "other")


@needs_radclient
def test_radclient_sessions_in_the_maps(netns: str, dp) -> None:
    """Sessions through real maps: the contract's entry on every address of its sessions
    (one state slot), OP25B on the new address, the old one gone at Stop, nothing else
    touched."""
    dynamic, static = schema.TYPES["dynamic"], schema.TYPES["static"]
    pool = Entry(9000, dynamic)
    contract = Entry(2001, dynamic, 0, 100000, 1000000, slot=5)
    other = Entry(7, static, 0, 0, 0, slot=6)
    pool_key = tables.key_of(net("100.64.0.0/24"))
    static_addr = tables.addr16(ipaddress.ip_address("203.0.113.10"))
    dp.maps.set_prefix(pool_key, pool)
    dp.maps.set_host(static_addr, other)
    dp.maps.write_dir(dirs.subscribers([static_addr], [pool_key])[0])
    dp.maps.set_control_flags(schema.C["XZ_C_LOADED"] | schema.C["XZ_C_OP25B"]
                              | schema.C["XZ_C_OP25B_V6"])

    def host(a: str) -> Entry | None:
        return dp.maps.get_host(tables.addr16(ipaddress.ip_address(a)))

    calls = Calls(writer=map_writer(dp.maps, {USER: contract}, pool))
    with serving(netns, calls):
        assert radclient(netns, BRAS1, "acct", SECRET, RC_START)[0] == 0
        assert host("100.64.0.5") == contract
        rc, _ = radclient(netns, BRAS1, "acct", SECRET, dict(
            RC_START, **{"Acct-Status-Type": "Interim-Update",
                         "Delegated-IPv6-Prefix": "2001:db8:200::/56"}))
        assert rc == 0
        key, e = dp.maps.match_prefix(tables.addr16(ipaddress.ip_address("2001:db8:200::9")))
        assert tables.net_of(key) == net("2001:db8:200::/56") and e == contract
        assert smtp_verdict(dp, "2001:db8:200::9") == "drop"
        # reconnect: Stop, then Start on a new address; the contract (slot 5) goes with it
        rc, _ = radclient(netns, BRAS1, "acct", SECRET,
                          dict(RC_START, **{"Acct-Status-Type": "Stop"}))
        assert rc == 0 and host("100.64.0.5") is None
        assert dp.maps.match_prefix(tables.addr16(
            ipaddress.ip_address("2001:db8:200::9"))) is None
        rc, _ = radclient(netns, BRAS1, "acct", SECRET, dict(
            RC_START, **{"Acct-Session-Id": q("s2"), "Framed-IP-Address": "100.64.0.9"}))
        assert rc == 0 and host("100.64.0.9") == contract
        assert smtp_verdict(dp, "100.64.0.9") == "drop"
        # a user in no row keeps the pool's treatment
        rc, _ = radclient(netns, BRAS1, "acct", SECRET, dict(
            RC_START, **{"Acct-Session-Id": q("s3"), "User-Name": q("stranger@x"),
                         "Framed-IP-Address": "100.64.0.10"}))
        assert rc == 0 and host("100.64.0.10") == pool
        # nothing else was touched
        hosts = {tables.ip_of(a): e for a, e in dp.maps.host_items()}
        assert hosts == {ipaddress.ip_address("203.0.113.10"): other,
                         ipaddress.ip_address("100.64.0.9"): contract,
                         ipaddress.ip_address("100.64.0.10"): pool}
        assert [(tables.net_of(k), e) for k, e in dp.maps.prefix_items()] == [
            (net("100.64.0.0/24"), pool)]


# --- fuzz -----------------------------------------------------------------------------------

_FUZZ_BASE = [
    request(**START),
    request(ma=True, **dict(START, Delegated_IPv6_Prefix="2001:db8:7::/56")),
    request(rp.CoARequest, User_Name=USER, Mikrotik_Rate_Limit="1M/2M"),
    request(rp.DisconnectRequest, Acct_Session_Id="s1"),
]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(_FUZZ_BASE)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(("flip", "cut", "insert", "length")))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif len(data) >= 4:
            data[2:4] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
    # half of them signed again: past the authenticator, into the attribute decoding
    return resign(bytes(data)) if draw(st.booleans()) and len(data) >= 20 else bytes(data)


def _attributes(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 20
    while pos < len(data):
        out.append((data[pos], data[pos + 2:pos + data[pos + 1]]))
        pos += data[pos + 1]
    return out


_ATTR_TYPES = st.one_of(st.sampled_from((1, 4, 8, 9, 25, 26, 32, 40, 44, 80, 95, 97, 101,
                                         123, 168)), st.integers(0, 255))


@st.composite
def well_formed(draw) -> bytes:
    """A request with its attributes changed (values, types, added, dropped, repeated) but
    a valid frame and authenticator: what a NAS with the secret could send."""
    base = draw(st.sampled_from(_FUZZ_BASE))
    attrs = _attributes(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("value", "type", "add", "drop", "repeat")))
        i = draw(st.integers(0, len(attrs) - 1)) if attrs else 0
        if op == "value" and attrs:
            attrs[i] = (attrs[i][0], draw(st.binary(max_size=24)))
        elif op == "type" and attrs:
            attrs[i] = (draw(_ATTR_TYPES), attrs[i][1])
        elif op == "add" or not attrs:
            attrs.insert(i, (draw(_ATTR_TYPES), draw(st.binary(max_size=24))))
        elif op == "drop":
            del attrs[i]
        else:
            attrs.insert(i, attrs[i])
    body = b"".join(bytes((t, len(v) + 2)) + v for t, v in attrs)
    return resign(base[:2] + struct.pack("!H", 20 + len(body)) + base[4:20] + body)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=300), mutated(), well_formed()))
def test_fuzz_listener(data: bytes) -> None:
    """No datagram makes the listener raise or fail inside, and a datagram that is not
    a well-formed request (answered or not) changes no session."""
    calls = Calls()
    lst = make_listener(calls)
    lst.handle(request(**START), (BRAS1, 1), "acct")
    for kind in ("acct", "coa"):
        before, changes = lst.table.dump(), len(calls.changes)
        answer = lst.handle(data, (BRAS1, 2), kind)
        assert lst.drops["internal"] == 0
        if answer is None:
            assert lst.table.dump() == before and len(calls.changes) == changes
        else:
            assert answer[1] == data[1]
