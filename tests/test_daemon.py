"""`xdpzoot run`, one tick at a time with an injected clock, against real pinned maps:
volume rules turn into throttles in the kernel and lines in the audit log, snapshots carry
them across restarts, a corrupt snapshot is a safe start, hand-set throttles expire, source
files are re-synced when they change; and the real process stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xdpzoot.bandwidth import accounting, store
from xdpzoot.bandwidth import rules as volume_rules
from xdpzoot.daemon import Congestion, Daemon, log_to_stderr
from xdpzoot.dataplane import kernel, layout, netlink, schema
from xdpzoot.lab import in_netns, wait_for

C = schema.C
T0 = 1_790_000_000.0   # 2026-09-21, any fixed instant
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


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def setup(bpffs, tmp_path):
    pin = os.path.join(bpffs, "daemon-" + tmp_path.name[-12:])
    (tmp_path / "rules.toml").write_text(RULES)
    (tmp_path / "subs.csv").write_text(SUBS)
    cfg = tmp_path / "xdpzoot.toml"
    cfg.write_text(f"""
[bandwidth]
rules = "{tmp_path}/rules.toml"
state = "{tmp_path}/state.msgpack"
audit = "{tmp_path}/audit.jsonl"
tick_seconds = 1
snapshot_seconds = 1
[sources]
subscribers = "{tmp_path}/subs.csv"
[limits]
hosts = 1024
prefixes = 1024
subscribers = 1024
csam_hosts = 1024
csam_prefixes = 1024
[metrics]
listen = ""   # `run` runs in the host's namespace here: no port of the host's
""")
    r = subprocess.run([sys.executable, "-m", "xdpzoot", "--config", str(cfg), "--pin-dir",
                        pin, "subscribers", "load", str(tmp_path / "subs.csv")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    yield cfg, pin, tmp_path
    kernel.unpin_all(pin)


def add_bytes(d: Daemon, slot: int, up: int) -> None:
    """Traffic as the data plane would count it."""
    m = d.inst.maps.state_map
    v = list(layout.STATE.unpack(m.lookup(layout.U32.pack(slot))))
    v[2] += up   # dir[0].bytes
    m.update(layout.U32.pack(slot), layout.STATE.pack(*v))


def daemon(cfg, pin, clock) -> Daemon:
    d = Daemon(str(cfg), pin, clock=clock)
    d.start()
    return d


def test_rule_throttles_releases_audits_and_survives_restart(setup):
    cfg, pin, tmp = setup
    clock = Clock(T0)
    d = daemon(cfg, pin, clock)
    slot = next(iter(d.inst.owners()))
    d.tick()                                   # first sight of the counters
    clock.t += 60
    add_bytes(d, slot, 25_000_000)             # 25 MB up in a minute: over 20 MB/h
    acts = d.tick()
    assert [(a.action, a.subscriber, a.rate_kbps) for a in acts] == [("throttle", 200, 2000)]
    assert d.inst.get_throttle(slot) == (2000, 2000)
    lines = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
    assert lines[-1]["action"] == "throttle" and lines[-1]["subscriber"] == 200
    assert "flow" not in json.dumps(lines) and "198.51.100" not in json.dumps(lines)
    # A restart (a new process) resumes from the snapshot: the throttle stays ...
    clock.t += 60
    d2 = daemon(cfg, pin, clock)
    assert d2.tick() == []
    assert d2.inst.get_throttle(slot) == (2000, 2000)
    # ... and is released when the rolling hour no longer holds 20 MB.
    clock.t += 2 * 3600
    acts = d2.tick()
    assert [a.action for a in acts] == ["release"]
    assert d2.inst.get_throttle(slot) == (0, 0)


def test_throttles_in_force_are_kept_exact(setup):
    """The tick looks only at slots with a throttle in force, yet a stray one (in the map
    before the daemon started, wanted by nobody) goes at its first tick, and a rule's
    throttle lifted by `unthrottle` comes back at the next."""
    cfg, pin, _ = setup
    clock = Clock(T0)
    d = daemon(cfg, pin, clock)
    slot = next(iter(d.inst.owners()))
    with d.inst.locked():
        d.inst.maps.set_throttle(slot, 700, 700)
    d.tick()
    assert d.inst.get_throttle(slot) == (0, 0)
    clock.t += 60
    add_bytes(d, slot, 25_000_000)
    d.tick()
    assert d.inst.get_throttle(slot) == (2000, 2000)
    d.inst.unthrottle(slot)
    clock.t += 1
    d.tick()
    assert d.inst.get_throttle(slot) == (2000, 2000)


def test_snapshot_cadence_and_a_crash_between_snapshots(setup):
    """A snapshot every snapshot_seconds, and at once after a decision; a crash between two
    loses no byte: the restarted daemon counts the bytes since the snapshot from the
    kernel's counters (at its first tick) and decides on them."""
    cfg, pin, tmp = setup
    cfg.write_text(cfg.read_text().replace("snapshot_seconds = 1", "snapshot_seconds = 60"))
    state = tmp / "state.msgpack"

    def on_disk() -> int:   # subscriber 200's bytes in the rolling hour, as the snapshot says
        acct = accounting.Accounting.restore(state.read_bytes(), volume_rules.load_rules(
            str(tmp / "rules.toml")))
        return acct.usage(200, clock.t)[0]["bytes"]

    clock = Clock(T0)
    d = daemon(cfg, pin, clock)
    slot = next(iter(d.inst.owners()))
    d.tick()
    clock.t += 10
    add_bytes(d, slot, 5_000_000)
    assert d.tick() == [] and not state.exists()   # nothing decided, 10 s: no snapshot
    clock.t += 50
    d.tick()
    assert on_disk() == 5_000_000                  # 60 s
    clock.t += 10
    add_bytes(d, slot, 10_000_000)
    d.tick()
    assert on_disk() == 5_000_000                  # not yet: 15 MB in memory only
    del d                                          # a crash: no stop, no last snapshot
    d2 = daemon(cfg, pin, clock)
    clock.t += 10
    add_bytes(d2, slot, 6_000_000)
    assert [a.action for a in d2.tick()] == ["throttle"]   # 5 + 10 + 6 MB > 20 MB
    assert on_disk() == 21_000_000                 # decided: written at once
    assert accounting.Accounting.restore(state.read_bytes(), volume_rules.load_rules(
        str(tmp / "rules.toml"))).throttle_rate(200, clock.t) == 2000


@pytest.mark.parametrize("content", [b"", b"\x93garbage", b"xdpzoot" * 3],
                         ids=["empty", "corrupt", "foreign"])
def test_corrupt_snapshot_is_a_safe_start(setup, content, capsys):
    cfg, pin, tmp = setup
    clock = Clock(T0)
    d = daemon(cfg, pin, clock)
    slot = next(iter(d.inst.owners()))
    with d.inst.locked():   # a throttle in force from before the crash
        d.inst.maps.set_throttle(slot, 2000, 2000)
    (tmp / "state.msgpack").write_bytes(content)
    d2 = daemon(cfg, pin, clock)
    assert "starting afresh" in capsys.readouterr().err
    d2.tick()
    assert d2.inst.get_throttle(slot) == (2000, 2000)   # enforcement continues from the maps
    assert d2.inst.manual_throttles()[slot] == (2000, 0)


def test_hand_set_throttle_expires(setup):
    cfg, pin, _ = setup
    clock = Clock(T0)
    d = daemon(cfg, pin, clock)
    slot = next(iter(d.inst.owners()))
    d.inst.throttle(slot, 1000, int(T0) + 600)
    d.tick()
    assert d.inst.get_throttle(slot) == (1000, 1000)
    assert d.inst.control_flags() & C["XZ_C_THROTTLES"]   # the data plane looks it up
    clock.t += 601
    d.tick()
    assert d.inst.get_throttle(slot) == (0, 0) and not d.inst.manual_throttles()
    assert not d.inst.control_flags() & C["XZ_C_THROTTLES"]   # none: no lookup


def test_source_file_change_is_synced_and_a_bad_one_is_not(setup, capsys):
    cfg, pin, tmp = setup
    d = daemon(cfg, pin, Clock(T0))
    subs = tmp / "subs.csv"
    subs.write_text(SUBS + "300,198.51.100.16/29,static,,\n")
    os.utime(subs, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    d.tick()
    assert len(list(d.inst.maps.prefix_items())) == 2
    d.tick()
    assert 300 in d.acct.subscribers()
    subs.write_text(SUBS + "300,not-an-address,static,,\n")
    os.utime(subs, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    d.tick()
    assert "not applied" in capsys.readouterr().err
    assert len(list(d.inst.maps.prefix_items())) == 2       # unchanged
    subs.write_text(SUBS)                               # subscriber 300's contract ended
    os.utime(subs, ns=(time.time_ns(), time.time_ns() + 3_000_000))
    d.tick()                                            # synced: the engine forgets 300
    assert 300 not in d.acct.subscribers() and 200 in d.acct.subscribers()


ABUSE = """
[signals]
window_seconds = 60
[[abuse]]
name = "scan-notice"
signal = "scans"
threshold = 50
action = "notify"
[[abuse]]
name = "scan"
signal = "scans"
threshold = 500
for = "2m"
action = "suspend"
[[abuse]]
name = "spam-notice"
signal = "smtp_blocked"
threshold = 10
action = "notify"
"""


def add_signals(d: Daemon, slot: int, scans: int, smtp: int = 0) -> None:
    """What the data plane would count in the window in force: ``scans`` distinct
    destinations (the sketch's estimate), ``smtp`` more blocked SMTP attempts."""
    m = d.inst.maps.state_map
    v = list(layout.STATE.unpack(m.lookup(layout.U32.pack(slot))))
    epoch = d.inst.control_params()["scan_epoch"]
    v[layout.SCAN_COUNT] = scans << C["XZ_SCAN_FRAC"] << C["XZ_SCAN_EST_SHIFT"] | epoch
    v[layout.OP25B] += smtp
    m.update(layout.U32.pack(slot), layout.STATE.pack(*v))


def test_abuse_rules_notify_and_suspend(setup):
    """A scan over the notice's threshold is audited and counted, nothing more; over the
    suspension's for two windows (for = 2m) the subscriber is suspended; blocked SMTP
    attempts count per window; `top --by scans` shows the window's estimate."""
    cfg, pin, tmp = setup
    cfg.write_text(cfg.read_text() + ABUSE)
    clock = Clock(T0)
    d = daemon(cfg, pin, clock)
    slot = next(iter(d.inst.owners()))
    assert d.tick() == []                       # the first window starts (none judged)
    assert d.inst.control_params()["scan_epoch"] == int(T0)
    add_signals(d, slot, 100, smtp=20)
    clock.t += 30
    assert d.tick() == []                       # the window is not over yet
    clock.t += 30
    acts = d.tick()
    assert sorted((a.rule, a.action, a.values["value"]) for a in acts) == [
        ("scan-notice", "notify", 100), ("spam-notice", "notify", 20)]
    assert not d.inst.subscriber_state(200)["suspended"]
    add_signals(d, slot, 1000)                  # the next window: a scan, no more SMTP
    top = subprocess.run([sys.executable, "-m", "xdpzoot", "--config", str(cfg), "--pin-dir",
                          pin, "top", "--by", "scans", "--json"], capture_output=True,
                         text=True, check=True)
    assert [(r["subscriber"], r["scans"]) for r in json.loads(top.stdout)] == [(200, 1000)]
    clock.t += 60
    assert d.tick() == []                       # notice given in this run; 1 window of 2
    add_signals(d, slot, 1000)
    clock.t += 60
    acts = d.tick()
    assert [(a.rule, a.action) for a in acts] == [("scan", "suspend")]
    assert d.inst.subscriber_state(200)["suspended"]
    assert {k: n for k, n in d.stats.decisions.items() if k[0] != "up-20mb"} == {
        ("scan-notice", "notify"): 1, ("spam-notice", "notify"): 1, ("scan", "suspend"): 1}
    lines = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
    assert [(x["rule"], x["action"], x["subscriber"]) for x in lines] == [
        ("scan-notice", "notify", 200), ("spam-notice", "notify", 200),
        ("scan", "suspend", 200)]
    assert lines[-1]["values"]["until"] == "resume"


def test_blocked_smtp_read_back_by_a_few_is_not_a_cleared_slot(setup):
    """A subscriber's blocked SMTP attempts read less than in the window before by no more
    than the CPUs' batches hold (attempts noted at the last read and added to the counter
    after this read of it) count nothing in the window, not all over again; the next
    window counts them."""
    cfg, pin, _ = setup
    cfg.write_text(cfg.read_text() + ABUSE)
    clock = Clock(T0)
    d = daemon(cfg, pin, clock)
    slot = next(iter(d.inst.owners()))
    assert d.tick() == []
    add_signals(d, slot, 0, smtp=20)
    clock.t += 60
    assert [a.rule for a in d.tick()] == ["spam-notice"]
    add_signals(d, slot, 0, smtp=-3)            # the counter read 3 behind
    clock.t += 60
    assert d.tick() == []                       # not 17 attempts: no notice
    add_signals(d, slot, 0, smtp=3 + 12)        # the 3 again, and 12 more
    clock.t += 60
    acts = d.tick()
    assert [(a.rule, a.values["value"]) for a in acts] == [("spam-notice", 15)]


def test_congestion_auto_with_hysteresis():
    c = Congestion(capacity_kbps=1000, share=80, seconds=10, hysteresis=10)
    total, t = 0, 0.0
    seen = []
    for kbps in [500] * 5 + [900] * 15 + [750] * 15 + [600] * 15:
        t += 1
        total += kbps * 1000 // 8
        seen.append(c.feed(t, total))
    assert not any(seen[:14])                  # 10 s above 80% before on ...
    assert all(seen[14:35])                    # ... and 75% is inside the hysteresis
    assert seen[43] and not seen[44]           # 60% for 10 s: off
    assert not seen[-1]                        # 60% for 10 s: off


def test_fast_path_interfaces_follow_their_links(setup, capsys):
    """The fast path's devmap and MAC table as the links are, tick by tick: written at the
    first tick, again after an interface's MAC address changed (it was written at attach
    only: every frame through the kernel afterwards), emptied when the interfaces go."""
    cfg, pin, tmp = setup
    ns = f"xzdl{os.getpid()}"
    links = tmp / "links.toml"
    links.write_text(cfg.read_text() + '\n[interfaces]\naccess = ["xzl-a"]\ncore = ["xzl-c"]\n')

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, timeout=10)

    def table(d: Daemon) -> dict[int, bytes]:
        macs = d.inst.maps.fast_macs()
        return {i: macs[i][0][0] for i in d.inst.maps.fast_ifs()}

    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        ip("link", "add", "xzl-a", "address", "02:00:00:00:0a:01", "type", "veth", "peer",
           "name", "xzl-c", "address", "02:00:00:00:0c:01")
        with in_netns(ns):
            d = daemon(links, pin, Clock(T0))
            assert table(d) == {}   # nothing attached: nothing written yet
            d.tick()
            idx = {n: link.index for n, link in netlink.link_table(["xzl-a", "xzl-c"]).items()}
            mac_a, mac_c = bytes.fromhex("02000000" "0a01"), bytes.fromhex("02000000" "0c01")
            assert table(d) == {idx["xzl-a"]: mac_a, idx["xzl-c"]: mac_c}
            ip("link", "set", "xzl-a", "address", "02:00:00:00:0a:02")
            d.tick()
            assert table(d) == {idx["xzl-a"]: bytes.fromhex("020000000a02"), idx["xzl-c"]: mac_c}
            assert "fast path: xzl-a changed" in capsys.readouterr().err
            ip("link", "del", "xzl-a")   # both ends
            d.tick()
            assert table(d) == {}
            assert "fast path: xzl-a gone, xzl-c gone" in capsys.readouterr().err
            assert d.inst.maps.fast_macs_map.lookup(layout.U32.pack(idx["xzl-a"])) == bytes(
                layout.FAST_MAC.size)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=10)


def test_a_vrrp_virtual_mac_joins_the_fast_path_while_up(setup, capsys):
    """[interfaces] vmacs: a macvlan on an access interface (keepalived's use_vmac) adds its
    MAC address to its lower interface's in the fast path's table while it is up, tick by
    tick: made after the attach, brought up, down, and gone."""
    cfg, pin, tmp = setup
    ns = f"xzdv{os.getpid()}"
    links = tmp / "vmacs.toml"
    links.write_text(cfg.read_text() + '\n[interfaces]\naccess = ["xzv-a"]\ncore = ["xzv-c"]\n'
                     'vmacs = ["xzv-vrrp"]\n')
    mac_a, vmac = bytes.fromhex("020000000a01"), bytes.fromhex("00005e000133")

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, timeout=10)

    def macs(d: Daemon, i: int) -> list[tuple[bytes, int, int]]:
        return d.inst.maps.fast_macs().get(i, [])

    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        ip("link", "add", "xzv-a", "address", "02:00:00:00:0a:01", "type", "veth", "peer",
           "name", "xzv-c")
        with in_netns(ns):
            d = daemon(links, pin, Clock(T0))
            d.tick()
            a = netlink.link_table(["xzv-a"])["xzv-a"].index
            assert macs(d, a) == [(mac_a, 0, 0)]   # no such interface yet
            ip("link", "add", "xzv-vrrp", "link", "xzv-a", "address", "00:00:5e:00:01:33",
               "type", "macvlan", "mode", "private")
            d.tick()
            assert macs(d, a) == [(mac_a, 0, 0)]   # down: the kernel drops what comes to it
            ip("link", "set", "xzv-vrrp", "up")
            d.tick()
            # its frames routed as the macvlan's (from its ifindex), as the kernel does
            v = netlink.link_table(["xzv-vrrp"])["xzv-vrrp"].index
            assert macs(d, a) == [(mac_a, 0, 0), (vmac, v, 0)]
            assert "fast path: xzv-vrrp changed" in capsys.readouterr().err
            ip("link", "set", "xzv-vrrp", "down")
            d.tick()
            assert macs(d, a) == [(mac_a, 0, 0)]
            ip("link", "set", "xzv-vrrp", "up")
            d.tick()
            assert macs(d, a) == [(mac_a, 0, 0), (vmac, v, 0)]
            # its rp_filter switched on (strict): the fast path checks sources as it would
            Path("/proc/sys/net/ipv4/conf/xzv-vrrp/rp_filter").write_text("1")
            d.tick()
            assert macs(d, a) == [(mac_a, 0, 0), (vmac, v, 1)]
            assert "fast path: xzv-vrrp changed" in capsys.readouterr().err
            ip("link", "del", "xzv-vrrp")
            d.tick()
            assert macs(d, a) == [(mac_a, 0, 0)]
            assert "fast path: xzv-vrrp gone" in capsys.readouterr().err
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=10)


def test_run_stops_cleanly_on_sigterm_and_reloads_on_sighup(setup):
    cfg, pin, tmp = setup
    p = subprocess.Popen([str(Path(sys.executable).with_name("xdpzoot")), "--config", str(cfg),
                          "--pin-dir", pin, "run"], stderr=subprocess.PIPE, text=True)
    try:
        def ticked() -> bool:
            assert p.poll() is None, p.stderr.read()
            return (tmp / "state.msgpack").exists()

        wait_for(ticked, 60, "the first tick's snapshot")
        p.send_signal(signal.SIGHUP)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read()
    assert "stopped; the data plane keeps enforcing" in err
    assert store.load_snapshot(str(tmp / "state.msgpack"))
    assert kernel.pinned(pin)


def test_the_listeners_lines_go_to_stderr_as_the_daemons(capsys):
    """`run` and `radius` send the RADIUS listener's and the metrics endpoint's warnings
    to stderr with the daemon's own "xdpzoot: " (Python printed them bare), once."""
    h = log_to_stderr()
    try:
        logging.getLogger("xdpzoot.radius").error("radius: users not read: %s", "gone")
        logging.getLogger("xdpzoot.metrics").info("not a warning: not printed")
        assert capsys.readouterr().err == "xdpzoot: radius: users not read: gone\n"
        assert log_to_stderr() is h
    finally:
        logging.getLogger("xdpzoot").removeHandler(h)
