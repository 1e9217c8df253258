"""Drop events (bpf/trace.h) through BPF_PROG_TEST_RUN, read from the ring buffer as
`xdpzoot trace` reads it (kernel.RingBuffer, layout.Event).

A drop with the trace on makes one event with the packet's fields, at both hooks; none
for a CSAM drop or a packet to or from a listed address, none with the flag off, its
lease run out or its reason not asked for; the rate limiter caps the events; a full ring
buffer loses events (counted), never packets.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import packets
import pytest
from bpfcases import (
    C_,
    DNS,
    DYN4,
    DYN_SMTP4,
    DYN_SMTP6,
    HOOKS,
    MAIL4,
    OP,
    REJ,
    SUSP4,
    A,
    flags_of,
    load,
    model_tables,
    run_one,
    tcp,
    udp,
)

from xdpzoot import tables
from xdpzoot.dataplane import kernel, layout, schema
from xdpzoot.dataplane.instance import TRACE_LEASE_S, Instance
from xdpzoot.dataplane.layout import Event
from xdpzoot.sources import csam

C = schema.C
TRACE, ADDRS = C["XZ_C_TRACE"], C["XZ_C_TRACE_ADDRS"]
# Subscriber ids of bpfcases.SUBS (their position, from 1).
POOL4, SUSPENDED4, POOL6 = 1, 5, 7
LISTED4 = "192.0.2.66"   # put on the CSAM list by the tests that need one
# What the ring holds: records of the event and an 8-byte header, short of the whole ring
# (the kernel refuses a record that would fill it to the last byte).
RING_EVENTS = C["XZ_TRACE_RING_BYTES"] // (layout.EVENT.size + 8) - 1


@pytest.fixture
def ring(dp) -> Iterator[kernel.RingBuffer]:
    """The emptied data plane's ring buffer, emptied, and the events' limiter reset."""
    dp.maps.trace_state.update(layout.ZERO_KEY, bytes(layout.TRACE_STATE.size))
    with kernel.RingBuffer(dp.maps.trace_ring) as rb:
        rb.drain()
        yield rb


def trace_on(dp, rate: int = 1000, reasons=schema.TRACE_REASONS, addresses: bool = False,
             lease: int = 60, tick_ns: int = 0) -> None:
    """The trace's switch and parameters as Instance.trace writes them."""
    c = dp.maps.control_value()
    dp.maps.write_control(c._replace(
        flags=c.flags | TRACE | (ADDRS if addresses else 0),
        trace_until=int(time.monotonic()) + lease, trace_rate=rate, tick_ns=tick_ns,
        trace_reasons=sum(1 << schema.REASONS.index(r) for r in reasons)))


def events(rb: kernel.RingBuffer) -> list[Event]:
    return [Event.unpack(r) for r in rb.drain()]


def lost(dp) -> int:
    return dp.maps.trace_lost()


def list_address(dp, addr: str) -> None:
    """``addr`` on the CSAM list: an exact entry of generation 0, in force."""
    dp.maps.csam_hosts[0].update(tables.addr16(addr), csam.LISTED)
    dp.maps.set_word(C["XZ_CSAM_HOSTS"])


# (id, packet, switches, role, verdict, reason, subscriber)
FIELDS = [
    ("op25b-v4", DYN_SMTP4, OP, A, "drop", "op25b", POOL4),
    ("op25b-v6-reject", DYN_SMTP6, REJ, A, "reject", "op25b", POOL6),
    ("ip53b-core", udp(C_, MAIL4, DYN4, 53), DNS, C_, "drop", "ip53b", POOL4),
    ("suspended", tcp(A, SUSP4, MAIL4, 443), (), A, "drop", "suspended", SUSPENDED4),
    ("monitor", DYN_SMTP4, (*OP, "monitor"), A, "monitor", "op25b", POOL4),
]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("case", FIELDS, ids=[c[0] for c in FIELDS])
def test_a_drop_makes_one_event(dp, ring, hook, case):
    _, pkt, switches, role, verdict, reason, sub = case
    load(dp, model_tables(), flags_of(switches))
    trace_on(dp)
    run_one(dp, hook, role, packets.frame(pkt), verdict, reason)
    (e,) = events(ring)
    assert e == Event(e.ts, sub, reason, verdict, role, hook, pkt.family, pkt.proto, pkt.sport,
                      pkt.dport, bytes(16), bytes(16))   # no addresses unless asked for
    assert 0 < time.monotonic_ns() - e.ts < 10**9
    assert lost(dp) == 0


@pytest.mark.parametrize("pkt", [DYN_SMTP4, DYN_SMTP6], ids=["v4", "v6"])
def test_addresses_only_when_asked(dp, ring, pkt):
    load(dp, model_tables(), flags_of(OP))
    trace_on(dp, addresses=True)
    run_one(dp, "xdp", A, packets.frame(pkt), "drop", "op25b")
    (e,) = events(ring)
    assert (e.src, e.dst) == (tables.addr16(pkt.src), tables.addr16(pkt.dst))


@pytest.mark.parametrize("hook", HOOKS)
def test_never_for_the_csam_list(dp, ring, hook):
    """No event for a CSAM drop, nor for a packet to a listed address that another rule
    dropped first (suspension, OP25B); the same rules to an unlisted address make one."""
    load(dp, model_tables(), flags_of(OP))
    list_address(dp, LISTED4)
    trace_on(dp, addresses=True)
    run_one(dp, hook, A, packets.frame(tcp(A, DYN4, LISTED4, 443)), "drop", "csam")
    dp.maps.clear_counters()
    run_one(dp, hook, A, packets.frame(tcp(A, SUSP4, LISTED4, 443)), "drop", "suspended")
    dp.maps.clear_counters()
    run_one(dp, hook, A, packets.frame(tcp(A, DYN4, LISTED4, 25)), "drop", "op25b")
    assert events(ring) == []
    dp.maps.clear_counters()
    run_one(dp, hook, A, packets.frame(tcp(A, SUSP4, MAIL4, 443)), "drop", "suspended")
    dp.maps.clear_counters()
    run_one(dp, hook, A, packets.frame(DYN_SMTP4), "drop", "op25b")
    assert [e.reason for e in events(ring)] == ["suspended", "op25b"]


@pytest.mark.parametrize("state", ["flag-off", "lease-out", "reason-not-asked"])
def test_no_event(dp, ring, state):
    load(dp, model_tables(), flags_of(OP))
    trace_on(dp, lease=-1 if state == "lease-out" else 60,
             reasons=["ip53b"] if state == "reason-not-asked" else schema.TRACE_REASONS)
    if state == "flag-off":
        dp.maps.set_switch(TRACE, False)
    run_one(dp, "xdp", A, packets.frame(DYN_SMTP4), "drop", "op25b")
    assert events(ring) == [] and lost(dp) == 0


def test_passed_packets_make_none(dp, ring):
    load(dp, model_tables(), flags_of(OP))
    trace_on(dp)
    run_one(dp, "xdp", A, packets.frame(tcp(A, DYN4, MAIL4, 587)), "pass", "ok")
    assert events(ring) == []


@pytest.mark.parametrize("clock", ["fine", "jiffies"])
def test_rate_limit_caps_events(dp, ring, clock):
    """1,000 drops in one test run (well under a millisecond) at 100 events a second: a
    burst of 100 ms of the rate, plus the first, gets through."""
    load(dp, model_tables(), flags_of(OP))
    trace_on(dp, rate=100, tick_ns=kernel.tick_ns() if clock == "jiffies" else 0)
    r = dp.run("xdp", A, packets.frame(DYN_SMTP4), repeat=1000)
    assert r.retval == 1   # XDP_DROP
    assert dp.counters() == {(A, "drop", "op25b"): 1000}
    assert 11 <= len(events(ring)) <= 12   # 12: a tick or 10 ms passed during the run
    assert lost(dp) == 0


def test_full_ring_loses_events_not_packets(dp, ring):
    """Nobody reading, every drop with a token: the ring takes what it holds, the rest is
    counted as lost, and every packet is still dropped."""
    load(dp, model_tables(), flags_of(OP))
    trace_on(dp, rate=100_000)   # a 100 ms burst: 10,001 tokens
    n = RING_EVENTS + 500
    r = dp.run("tc", A, packets.frame(DYN_SMTP4), repeat=n)
    assert r.retval == 2   # TC_ACT_SHOT
    assert dp.counters() == {(A, "drop", "op25b"): n}
    assert len(events(ring)) == RING_EVENTS
    assert lost(dp) == n - RING_EVENTS


# ---- the command: the switch and its lease ----------------------------------------------------

XDPZOOT = str(Path(sys.executable).with_name("xdpzoot"))


def start_trace(pin_dir: str) -> subprocess.Popen:
    """`xdpzoot trace` on the session's data plane, once it says the switch is on."""
    p = subprocess.Popen([XDPZOOT, "--pin-dir", pin_dir, "trace", "--seconds", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = p.stderr.readline()
    if "tracing drops" not in banner:
        p.kill()
        pytest.fail(banner + p.communicate()[1])
    return p


def test_sigterm_switches_it_off(dp):
    p = start_trace(dp.pin_dir)
    try:
        c = dp.maps.control_value()
        assert c.flags & TRACE and not c.flags & ADDRS
        assert c.trace_rate == 1000 and c.trace_until > time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert "0 events" in out
    assert not dp.maps.control_flags() & TRACE


def test_a_killed_trace_lets_go_when_its_lease_runs_out(dp):
    p = start_trace(dp.pin_dir)
    p.kill()
    p.wait()
    c = dp.maps.control_value()
    assert c.flags & TRACE and c.trace_until <= time.monotonic() + TRACE_LEASE_S
    # While its lease runs, another trace is refused (the clocks say when, not the machine's
    # pace: a CLI started here may take longer than the lease in a slow VM).
    within, later = c.trace_until - 0.5, c.trace_until + 0.5
    with Instance(dp.pin_dir) as inst, pytest.raises(kernel.KernelError,
                                                     match="a trace runs already"):
        with inst.trace(10, ["ip53b"], clock=lambda: within):
            pass
    # and so is the CLI, told on stderr, with a lease that outlasts any machine's pace
    dp.maps.write_control(c._replace(trace_until=int(time.monotonic()) + 3600))
    r = subprocess.run([XDPZOOT, "--pin-dir", dp.pin_dir, "trace", "--seconds", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "a trace runs already" in r.stderr
    dp.maps.write_control(c)
    with Instance(dp.pin_dir) as inst:
        with inst.trace(10, ["ip53b"], clock=lambda: later):
            c = dp.maps.control_value()
            assert c.trace_until == int(later) + TRACE_LEASE_S and c.trace_rate == 10
        assert not dp.maps.control_flags() & TRACE
