"""Faults an edge router meets, each with a count of what was lost.

``kill -9`` of the real commands at chosen points (tests/killpoint.py wraps a function of
the product in the child process and sends SIGKILL there): `blocklist load`, `subscribers
load` and `xdpzoot run` mid-tick and mid-snapshot. A full disk and a read-only state
directory under `xdpzoot run`, made inside the daemon's own mount namespace (``unshare -m``),
never in the host's. Every wait is on an event (a file, a log line, a map value) and bounded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import os
import secrets
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import packets
import pytest
from conftest import make_dataplane
from test_bpf import tcp

from xdpzoot import tables
from xdpzoot.bandwidth import accounting
from xdpzoot.bandwidth import rules as volume_rules
from xdpzoot.config import load_config
from xdpzoot.dataplane import blocklist, dirs, kernel, layout, schema

C = schema.C
XDPZOOT = str(Path(sys.executable).with_name("xdpzoot"))
KILLPOINT = str(Path(__file__).with_name("killpoint.py"))
DEFINES = {"hosts": 4096, "prefixes": 1024, "subscribers": 4096, "csam_hosts": 262144,
           "csam_prefixes": 1024, "flows": 1024}
LIMITS = "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in DEFINES.items())
STRANGER6 = "2001:db8:ffff:1::77"   # a source that is nobody's: the CSAM step still drops
KILLED = -9


def wait_for(what: str, cond: Callable[[], object], timeout: float = 60) -> object:
    """Poll ``cond`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def inst(bpffs, tmp_path_factory):
    """One instance with its programs loaded (for verdicts), and a config that matches it."""
    pin = os.path.join(bpffs, f"faults-{secrets.token_hex(3)}")
    cfg = tmp_path_factory.mktemp("faults") / "xdpzoot.toml"
    cfg.write_text(LIMITS)
    dp = make_dataplane(pin, load_config(str(cfg)).defines())
    dp.maps.set_control_flags(C["XZ_C_LOADED"])
    try:
        yield dp, cfg
    finally:
        dp.bpf.cleanup()
        kernel.unpin_all(pin)


def run(cfg, pin: str, *args: str, kill: dict | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI; with ``kill``, under killpoint.py (which must kill it)."""
    argv = [XDPZOOT] if kill is None else [sys.executable, KILLPOINT]
    env = {**os.environ, "XZ_KILL": json.dumps(kill)} if kill else None
    r = subprocess.run([*argv, "--config", str(cfg), "--pin-dir", pin, *args],
                       capture_output=True, text=True, timeout=timeout, env=env)
    if kill:
        assert r.returncode == KILLED, f"not killed at {kill}: {r.returncode} {r.stderr}"
    elif check:
        assert r.returncode == 0, r.stderr
    return r


# ---- kill -9 of `blocklist load` -----------------------------------------------------------

def hosts6(n: int, net: str) -> list[str]:
    base = int(ipaddress.ip_address(net))
    return [str(ipaddress.ip_address(base + i)) for i in range(1, n + 1)]


OLD_LIST = ["192.0.2.66", "203.0.113.7", "2001:db8:ffff:66::66", "198.51.100.128/25",
            "2001:db8:bad::/48", *hosts6(3000, "2001:db8:c5a::")]
# Three batches of hosts to write (BATCH is 65536), some of the old list gone.
NEW_LIST = ["192.0.2.67", "2001:db8:ffff:66::66", "198.51.100.0/26", "2001:db8:bad:1::/64",
            *hosts6(131_100, "2001:db8:c5b::"), *hosts6(1500, "2001:db8:c5a::")]


def text(entries: list[str], tag: str) -> bytes:
    return (f"# {tag}\n" + "\n".join(entries) + "\n").encode()


@functools.cache
def listed(which: str) -> tables.Tables:
    """The OLD or NEW list as the reference model holds it."""
    nets = [ipaddress.ip_network(e) for e in (OLD_LIST if which == "old" else NEW_LIST)]
    return tables.Tables(
        csam_hosts={tables.addr16(n.network_address) for n in nets if tables.is_host(n)},
        csam_prefixes={tables.key_of(n) for n in nets if not tables.is_host(n)})


@functools.cache
def sample(which: str) -> list[str]:
    """Addresses that the list holds: hosts and the first address of each prefix, spread."""
    entries = OLD_LIST if which == "old" else NEW_LIST
    addrs = [e.split("/")[0] for e in entries]
    return sorted(set(addrs[:6] + addrs[6::len(addrs) // 20]))


def reset_csam(pin: str) -> None:
    """Both generations empty and never loaded, generation 0 in force: a fresh instance."""
    with kernel.Maps(pin) as m:
        for t in (*m.csam_hosts, *m.csam_prefixes):
            t.delete_many(t.keys())
        for g in (0, 1):
            m.meta.update(struct.pack("=I", g), bytes(layout.META.size))
            m.write_csam_v4(g, bytes(dirs.FILTER4_BYTES))
            m.write_csam_v6(g, bytes(dirs.FILTER_BYTES))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(m.text_path(g))
        m.set_word(0)


def csam_verdict(dp, addr: str) -> str:
    return dp.verdict("xdp", "access", packets.frame(tcp("access", STRANGER6 if ":" in addr
                                                          else "100.64.1.10", addr, 443)))[0]


def assert_in_force(dp, cfg, data: bytes, which: str) -> None:
    """The list in force is exactly ``data``'s (the OLD or NEW list), whole: its meta digest,
    its keys, `blocklist check` and BPF verdicts on a sample; addresses that only the other
    list holds are not listed."""
    pin, want = dp.pin_dir, listed(which)
    with kernel.Maps(pin) as m:
        assert blocklist.in_force(m, data)
        _, word = m.word()
        gen = word & C["XZ_CSAM_GEN"]
        assert set(m.csam_hosts[gen].keys()) == want.csam_hosts
        assert set(map(layout.LPM_KEY.unpack, m.csam_prefixes[gen].keys())) == want.csam_prefixes
    status = json.loads(run(cfg, pin, "blocklist", "status", "--json").stdout)
    assert status["sha256"] == hashlib.sha256(data).hexdigest()
    for a in sample(which)[:2]:   # the command says so too (each run costs a start-up)
        assert json.loads(run(cfg, pin, "blocklist", "check", a, "--json").stdout)["listed"]
    for a in sample(which):
        assert csam_verdict(dp, a) == "drop"
    other = "new" if which == "old" else "old"
    for a in sample(other):
        if not want.csam(tables.addr16(a)):
            assert csam_verdict(dp, a) == "pass"


BATCH_UPDATE = "xdpzoot.dataplane.kernel:_libbpf.bpf_map_update_batch"
CSAM_KILLS = {
    "1st-batch": {"target": BATCH_UPDATE, "when": "after", "n": 1},
    "2nd-batch": {"target": BATCH_UPDATE, "when": "after", "n": 2},
    "before-text": {"target": "xdpzoot.dataplane.kernel:pin_blob", "when": "before", "n": 1},
    "after-text": {"target": "xdpzoot.dataplane.kernel:pin_blob", "when": "after", "n": 1},
    "before-switch": {"target": "xdpzoot.dataplane.kernel:Maps.set_word",
                      "when": "before", "n": 1},
    "after-switch": {"target": "xdpzoot.dataplane.kernel:Maps.set_word",
                     "when": "after", "n": 1},
}


@pytest.mark.parametrize("first", [True, False], ids=["first-load", "later-load"])
@pytest.mark.parametrize("point", list(CSAM_KILLS))
def test_killed_blocklist_load(inst, tmp_path, point, first):
    """Killed anywhere, a load leaves the old list in force, whole (or, killed after the
    switch, the new one, whole); the idle generation is trusted only if it is whole; the
    next load completes and is exact."""
    dp, cfg = inst
    pin = dp.pin_dir
    reset_csam(pin)
    old, new = text(OLD_LIST, "old"), text(NEW_LIST, "new")
    (tmp_path / "old.txt").write_bytes(old)
    (tmp_path / "new.txt").write_bytes(new)
    if first:   # the old list is what a fresh instance has: none
        old = None
    else:
        run(cfg, pin, "blocklist", "load", str(tmp_path / "old.txt"))
    run(cfg, pin, "blocklist", "load", str(tmp_path / "new.txt"), kill=CSAM_KILLS[point])
    switched = point == "after-switch"
    if switched:
        assert_in_force(dp, cfg, new, "new")
    elif old is not None:
        assert_in_force(dp, cfg, old, "old")
    else:
        with kernel.Maps(pin) as m:
            assert m.word()[1] == 0 and m.read_meta(0)["sha256"] is None
        assert all(csam_verdict(dp, a) == "pass" for a in sample("new"))
    with kernel.Maps(pin) as m:   # the idle generation: trusted only when whole
        idle = 1 - (m.word()[1] & C["XZ_CSAM_GEN"])
        held = blocklist.held(m, idle)
        if held is not None:
            assert held.text in (old, new)
            assert set(m.csam_hosts[idle].keys()) == listed(
                "new" if held.text == new else "old").csam_hosts
    r = json.loads(run(cfg, pin, "blocklist", "load", str(tmp_path / "new.txt"),
                       "--json").stdout)
    assert r["switched"] != switched
    assert_in_force(dp, cfg, new, "new")


# ---- kill -9 of `subscribers load` ---------------------------------------------------------

def subscriber_file(old: bool) -> str:
    """Hosts, prefixes (IPv4 and IPv6) and a dynamic pool; the new file changes rates,
    removes some entries of each kind and adds others."""
    rows = ["subscriber,address,type,up_kbps,down_kbps", "9000,100.65.0.0/24,dynamic,,"]
    hosts = range(1, 201) if old else range(1, 151)
    rows += [f"{1000 + i},100.64.1.{i},static,{1000 if old or i > 50 else 2000},1000"
             for i in hosts]
    rows += [f"{1000 + i},100.64.2.{i - 200},static,3000,3000" for i in
             ([] if old else range(201, 261))]
    nets = range(0, 50) if old else range(25, 75)
    rows += [f"{2000 + i},100.64.{16 + i // 32}.{(i % 32) * 8}/29,static,5000,5000"
             for i in nets]
    rows += [f"{3000 + i},2001:db8:100:{i:x}::/64,static,{7000 if old else 8000},7000"
             for i in range(20)]
    return "\n".join(rows) + "\n"


def subscriber_maps(pin: str) -> dict[tuple, layout.Entry]:
    with kernel.Maps(pin) as m:
        return ({("host", a): e for a, e in m.host_items()}
                | {("prefix", k): e for k, e in m.prefix_items()})


SUB = "xdpzoot.dataplane.kernel:Maps."
SUBSCRIBER_KILLS = {   # the steps of sync.apply_plan
    "after-union-dir": {"target": SUB + "write_dir", "when": "after", "n": 1},
    "after-prefixes": {"target": SUB + "write", "when": "after", "n": 1},
    "after-hosts": {"target": SUB + "write", "when": "after", "n": 2},
    "after-host-deletes": {"target": SUB + "delete", "when": "after", "n": 1},
    "before-final-dir": {"target": SUB + "write_dir", "when": "before", "n": 2},
    "before-free-slots": {"target": SUB + "clear_state", "when": "before", "n": 1},
}


@pytest.mark.parametrize("point", list(SUBSCRIBER_KILLS))
def test_killed_subscribers_load(inst, tmp_path, point):
    """Killed between any two steps, a load leaves each entry old or new (an address that
    stays in the file never without its class); the next load converges to the file."""
    dp, cfg = inst
    pin = dp.pin_dir
    (tmp_path / "old.csv").write_text(subscriber_file(old=True))
    (tmp_path / "new.csv").write_text(subscriber_file(old=False))
    run(cfg, pin, "subscribers", "load", str(tmp_path / "old.csv"))
    old = subscriber_maps(pin)
    run(cfg, pin, "subscribers", "load", str(tmp_path / "new.csv"),
        kill=SUBSCRIBER_KILLS[point])
    mid = subscriber_maps(pin)
    run(cfg, pin, "subscribers", "load", str(tmp_path / "new.csv"))
    new = subscriber_maps(pin)
    torn = [k for k, e in mid.items() if e not in (old.get(k), new.get(k))]
    lost = [k for k in old.keys() & new.keys() if k not in mid]
    assert (len(torn), len(lost)) == (0, 0)
    assert mid != old or point == "after-union-dir"   # the kill came after some writes
    _, hosts, prefixes, _ = tables.read_subscribers(str(tmp_path / "new.csv"))
    assert {a for kind, a in new if kind == "host"} == set(hosts.keys)
    assert {layout.LPM_KEY.pack(*k) for kind, k in new if kind == "prefix"} == set(prefixes.keys)
    diff = json.loads(run(cfg, pin, "subscribers", "diff", str(tmp_path / "new.csv"),
                          "--json").stdout)
    assert (diff["added"], diff["changed"], diff["removed"]) == (0, 0, 0)


# ---- kill -9 of `xdpzoot run` --------------------------------------------------------------

RULES = """\
[[rule]]
name = "up-20mb"
direction = "up"
window = "rolling:1h"
threshold = "20MB"
action = "throttle"
rate = "2Mbit"
start = "now"
duration = "until-below"
"""
SUBS = "subscriber,address,type,up_kbps,down_kbps\n200,198.51.100.8/29,static,50000,50000\n"
MB = 1_000_000


class Daemon:
    """`xdpzoot run` as a process of its own, its log in a file; ``argv`` says how it is
    started (plain, under killpoint.py, or in a mount namespace of its own)."""

    def __init__(self, inst, tmp_path: Path, state_dir: Path):
        self.dp, _ = inst
        self.tmp, self.dir = tmp_path, state_dir
        state_dir.mkdir(exist_ok=True)
        (tmp_path / "rules.toml").write_text(RULES)
        (tmp_path / "subs.csv").write_text(SUBS)
        self.cfg = tmp_path / "xdpzoot.toml"
        self.cfg.write_text(LIMITS + f"""
[metrics]
listen = ""   # the daemon runs in the host's namespace here: no port of the host's
[bandwidth]
rules = "{tmp_path}/rules.toml"
state = "{state_dir}/state.msgpack"
audit = "{state_dir}/audit.jsonl"
tick_seconds = 1
snapshot_seconds = 1   # a snapshot on every tick: the faults hit one
""")
        # --force: the module's instance may hold a larger table from the tests before
        run(self.cfg, self.dp.pin_dir, "subscribers", "load", "--force", str(tmp_path / "subs.csv"))
        m = self.dp.maps
        self.slot = next(s for s, sid in m.owners().items() if sid == 200)
        m.manual.delete_many(m.manual.keys())
        m.set_throttle(self.slot, 0, 0)
        m.set_throttles_switch(False)
        self.rules = volume_rules.load_rules(str(tmp_path / "rules.toml"))
        self.proc: subprocess.Popen | None = None
        self.log = tmp_path / "daemon.log"
        self.root = ""   # where the daemon's view of the files is seen from here

    def start(self, kill: dict | None = None, prefix: list[str] | None = None,
              setup: str = "") -> None:
        argv = [XDPZOOT] if kill is None else [sys.executable, KILLPOINT]
        argv += ["--config", str(self.cfg), "--pin-dir", self.dp.pin_dir, "run"]
        if setup:   # shell commands first, in a mount namespace of the daemon's own
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    setup + " && exec " + " ".join(argv)]
        env = {**os.environ, "XZ_KILL": json.dumps(kill)} if kill else None
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(argv, stderr=log, env=env)
        self.root = f"/proc/{self.proc.pid}/root" if setup else ""

    def path(self, name: str) -> str:
        return self.root + str(self.dir / name)

    def log_lines(self, text: str) -> list[str]:
        return [x for x in self.log.read_text().splitlines() if text in x]

    def wait_log(self, text: str, count: int = 1) -> None:
        wait_for(f"{count} log lines with {text!r}", lambda: self.alive_or_done() and
                 len(self.log_lines(text)) >= count)

    def alive_or_done(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        return True

    def snapshot(self) -> accounting.Accounting | None:
        """The snapshot on disk, restored (it must be whole), or None if there is none."""
        try:
            data = Path(self.path("state.msgpack")).read_bytes()
        except FileNotFoundError:
            return None
        return accounting.Accounting.restore(data, self.rules)

    def snapshot_says(self, cond: Callable[[accounting.Accounting], bool]) -> bool:
        acct = self.snapshot()
        return acct is not None and cond(acct)

    def audit(self) -> list[dict]:
        """Every record of the audit log (each line must be one)."""
        try:
            return [json.loads(x) for x in Path(self.path("audit.jsonl")).read_text()
                    .splitlines()]
        except FileNotFoundError:
            return []

    def throttled(self, acct: accounting.Accounting) -> bool:
        return bool(acct.throttle_rate(200, time.time()))

    def used(self, acct: accounting.Accounting) -> int:
        return acct.usage(200, time.time())[0]["bytes"]

    def add_up(self, n: int) -> None:
        """Upload as the data plane counts it."""
        key = struct.pack("=I", self.slot)
        v = list(layout.STATE.unpack(self.dp.maps.state_map.lookup(key)))
        v[2] += n   # up.bytes
        self.dp.maps.state_map.update(key, layout.STATE.pack(*v))

    def killed(self) -> None:
        assert self.proc.wait(timeout=60) == KILLED, self.log.read_text()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                assert self.proc.wait(timeout=30) == 0, self.log.read_text()
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(timeout=10)


@pytest.fixture
def daemon(inst, tmp_path) -> Iterator[Daemon]:
    d = Daemon(inst, tmp_path, tmp_path / "state")
    try:
        yield d
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=10)


def restart_resumes(d: Daemon, ticked: Callable[[accounting.Accounting], bool]) -> None:
    """A plain restart reads the last whole snapshot (never the torn one), resumes the
    windows and keeps the throttle the rules decided; its first snapshot (``ticked`` says
    which) replaces the torn temp file."""
    d.log.write_text("")
    d.start()
    d.wait_log("resumed from")
    assert not d.log_lines("starting afresh")
    wait_for("a snapshot of the restarted daemon",
             lambda: d.alive_or_done() and d.snapshot_says(ticked))
    assert not os.path.exists(d.path(".state.msgpack.tmp"))
    assert d.dp.maps.get_throttle(d.slot) == (2000, 2000)
    assert d.slot not in d.dp.maps.manual_throttles()   # resumed, not adopted by hand
    d.stop()


def test_kill_mid_snapshot(daemon):
    """Killed with the new snapshot written but not renamed: the maps keep enforcing, the
    old snapshot is whole, and the restart resumes from it; bytes counted since are not
    lost (the kernel's counters carry them)."""
    d = daemon
    arm = d.tmp / "arm"
    d.start(kill={"target": "os:replace", "when": "before", "n": 1,
                  "match": "state.msgpack", "arm": str(arm)})
    wait_for("the first snapshot", lambda: d.alive_or_done() and d.snapshot())
    d.add_up(25 * MB)
    wait_for("the throttle in a snapshot", lambda: d.alive_or_done()
             and d.snapshot_says(d.throttled))
    assert d.dp.maps.get_throttle(d.slot) == (2000, 2000)
    d.add_up(1 * MB)
    arm.touch()
    d.killed()
    assert os.path.exists(d.path(".state.msgpack.tmp"))   # the snapshot it was writing
    assert d.dp.maps.get_throttle(d.slot) == (2000, 2000)  # enforcement continues
    assert d.dp.maps.control_flags() & C["XZ_C_THROTTLES"]
    before = d.snapshot()
    assert d.throttled(before) and d.used(before) == 25 * MB
    restart_resumes(d, lambda a: d.used(a) == 26 * MB)      # the window went on counting
    assert [r["action"] for r in d.audit()] == ["throttle"]


def test_kill_mid_tick(daemon):
    """Killed right after the tick wrote a new throttle into the map, before the audit log
    and the snapshot took it: the throttle stays in force, and the restarted daemon decides
    it again from the counters (so the audit log has it, once)."""
    d = daemon
    d.start(kill={"target": "xdpzoot.dataplane.kernel:Maps.set_throttle", "when": "after",
                  "n": 1, "match": ", 2000, 2000)"})
    wait_for("the first snapshot", lambda: d.alive_or_done() and d.snapshot())
    d.add_up(25 * MB)
    d.killed()
    assert d.dp.maps.get_throttle(d.slot) == (2000, 2000)
    assert not d.throttled(d.snapshot()) and not d.audit()   # neither took it
    restart_resumes(d, d.throttled)
    assert d.used(d.snapshot()) == 25 * MB
    assert [r["action"] for r in d.audit()] == ["throttle"]


# ---- a full disk, a read-only state directory ----------------------------------------------

def fill(path: str) -> None:
    """Write ``path`` until the file system is full, to the last byte."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError as e:
                assert e.errno == 28, e   # ENOSPC


def remount(d: Daemon, opts: str) -> None:
    """Remount the state directory in the daemon's own mount namespace (not the host's)."""
    subprocess.run(["nsenter", "-t", str(d.proc.pid), "-m", "mount", "-o", opts, str(d.dir)],
                   check=True, timeout=10)


FAULTS = {   # name: (mount made before the start, how to break it, how to heal it, error)
    "disk-full": ("mount -t tmpfs -o size=256k,mode=0700 xzfull {dir}",
                  lambda d: fill(d.path("filler")),
                  lambda d: os.unlink(d.path("filler")), "No space left on device"),
    "read-only": ("mount --bind {dir} {dir}",
                  lambda d: remount(d, "remount,bind,ro"),
                  lambda d: remount(d, "remount,bind,rw"), "Read-only file system"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_state_directory_fault(daemon, fault):
    """The snapshot and the audit log cannot be written: one log line per condition (not
    one per tick), the tick goes on writing throttles into the maps, the old snapshot stays
    whole, the audit log holds only whole records; healed, both are written again and the
    actions of the meantime reach the audit log (nothing lost)."""
    d = daemon
    setup, brk, heal, error = FAULTS[fault]
    d.start(setup=setup.format(dir=d.dir))
    wait_for("the first snapshot", lambda: d.alive_or_done() and d.snapshot())
    assert not d.audit()
    brk(d)
    d.add_up(25 * MB)
    wait_for("the throttle in the map",
             lambda: d.alive_or_done() and d.dp.maps.get_throttle(d.slot) == (2000, 2000))
    d.wait_log(f"snapshot {d.dir}/state.msgpack not written: {error}")
    d.wait_log(f"audit log {d.dir}/audit.jsonl not written: {error}")
    for i in range(1, 3):   # more ticks, seen by a throttle set by hand that expires
        d.dp.maps.set_manual(d.slot, 1000, int(time.time()) + 1)
        d.wait_log("expired", count=i)
    assert len(d.log_lines("not written")) == 2        # once per condition
    assert d.dp.maps.get_throttle(d.slot) == (2000, 2000)
    assert not d.throttled(d.snapshot())               # the old one, whole
    assert not d.audit()                               # no torn record
    assert not os.path.exists(d.path(".state.msgpack.tmp"))
    heal(d)
    d.wait_log(f"snapshot {d.dir}/state.msgpack written again")
    d.wait_log(f"audit log {d.dir}/audit.jsonl written again")
    assert d.throttled(d.snapshot()) and d.used(d.snapshot()) == 25 * MB
    assert [r["action"] for r in d.audit()] == ["throttle"]
    assert len(d.log_lines("not written")) == 2
    d.stop()


TORN_WRITE = """
import resource, signal, sys
from xdpzoot.bandwidth.accounting import Action
from xdpzoot.bandwidth.store import AuditLog
log = AuditLog(sys.argv[1], 86400)
log.write([Action(1.79e9, 200, "up-20mb", "throttle", 2000, {})])
size = len(open(sys.argv[1], "rb").read())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, size + 100))
try:
    log.write([Action(1.79e9 + i, 200 + i, "up-20mb", "throttle", 2000, {}) for i in range(9)])
except OSError as e:
    print(e.strerror)
"""


def test_a_failed_audit_write_leaves_no_torn_record(tmp_path):
    """A write that stops part-way (here at a file size limit: the first 100 bytes go in,
    then EFBIG) is cut back to the last whole record, and the error is raised."""
    path = tmp_path / "audit.jsonl"
    r = subprocess.run([sys.executable, "-c", TORN_WRITE, str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "File too large"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["subscriber"], x["action"]) for x in records] == [(200, "throttle")]
    assert path.read_text().endswith("\n")
