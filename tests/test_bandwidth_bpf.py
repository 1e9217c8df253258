"""Bandwidth control in the kernel through BPF_PROG_TEST_RUN: the rate limiter's
arithmetic (admit within burst, drop beyond, refill by elapsed time), throttles, volume
counters per subscriber and direction, pool addresses, and bulk flows in congestion mode.

Rates here are tiny (a few kbit/s) and bursts long. Where a test sends many frames, what it
asserts is the limiter's contract for the time the sends took (at most the burst plus rate x
elapsed, :func:`most_admitted`), not a count that assumes a fast machine: under emulation a
test run costs milliseconds, and the bucket refills meanwhile. Waits are for refill only,
never for synchronisation.
"""

from __future__ import annotations

import array
import collections
import ipaddress
import os
import time

import packets
import pytest

from xdpzoot import sync, tables
from xdpzoot.dataplane import kernel, layout, schema
from xdpzoot.dataplane.layout import Entry
from xdpzoot.model import Packet

C = schema.C
DYN, STA = schema.TYPES["dynamic"], schema.TYPES["static"]
SUB4, INET4 = "198.51.100.9", "203.0.113.10"
POOL4 = "100.64.1.10"


@pytest.fixture(scope="session")
def tick():
    """ns per jiffy of this kernel, as the control plane times it."""
    return kernel.tick_ns()


def setup(dp, kbps=8, burst_ms=1000, flags=0, bulk_share=50, tick_ns=0):
    dp.reset()
    m = dp.maps
    for s in (1, 2):
        m.clear_state([s])
    m.pool_state.delete_many(m.pool_state.keys())
    m.map("xz_flows").delete_many(m.map("xz_flows").keys())
    m.set_prefix(tables.key_of(ipaddress.ip_network("198.51.100.8/29")),
                 Entry(200, STA, 0, kbps, kbps, slot=1))
    m.set_prefix(tables.key_of(ipaddress.ip_network("100.64.1.0/24")), Entry(100, DYN, 0, 0, 0))
    m.set_control_params(burst_us=burst_ms * 1000, bulk_kbps=1, bulk_ms=0,
                         bulk_share=bulk_share, bulk_floor_kbps=0, tick_ns=tick_ns)
    m.set_control_flags(C["XZ_C_RATES"] | C["XZ_C_OP25B"] | flags)


def ip_len(frame: bytes) -> int:
    """What rates and volumes count: the IP packet (these frames: Ethernet, no tags)."""
    return len(frame) - 14


def up(sport=40000, dport=443, src=SUB4):
    return packets.frame(Packet("access", src, INET4, 6, sport, dport))


def down(dport=40000):
    return packets.frame(Packet("core", INET4, SUB4, 6, 443, dport))


def send(dp, frame, n, hook="xdp", role="access"):
    return [dp.verdict(hook, role, frame)[0] for _ in range(n)]


def timed_send(dp, frame, n, hook="xdp", role="access") -> tuple[list[str], float]:
    """The verdicts of ``n`` frames, and the seconds from before the first to after the
    last."""
    t0 = time.monotonic()
    v = send(dp, frame, n, hook, role)
    return v, time.monotonic() - t0


def most_admitted(kbps: int, frame: bytes, burst_s: float, elapsed_s: float) -> int:
    """The most frames of ``frame``'s size a fresh bucket of ``kbps`` may admit within
    ``elapsed_s``: one at once, then one per frame cost, up to ``burst_s`` ahead (GCRA)."""
    cost = ip_len(frame) * 8 / (kbps * 1000)
    return int((burst_s + elapsed_s) / cost) + 1


def test_the_kernel_tick_is_timed(tick):
    assert tick in {1_000_000_000 // hz for hz in kernel.KNOWN_HZ}


@pytest.mark.parametrize("clock", ["fine", "jiffies"])
@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_admit_within_burst_then_drop_then_refill(dp, hook, clock, tick):
    # 1 kbit/s = 125 bytes/s: a 44-byte IP packet costs 352 ms of the bucket. With a 1 s burst
    # the first three frames pass at once, then nothing does until the bucket refilled.
    # (Slow enough that no stall of the test process, nor a tick of the jiffies clock
    # used for long bursts, can change an outcome.)
    setup(dp, kbps=1, burst_ms=1000, tick_ns=tick if clock == "jiffies" else 0)
    f = up()
    cost = ip_len(f) * 8 / 1000         # seconds per frame
    burst_frames = int(1.0 / cost) + 1  # admitted while the bucket is within its burst
    start = time.monotonic()
    verdicts = send(dp, f, 20, hook)
    # On a fast machine exactly the burst passes, then nothing; on a slow one the bucket
    # may refill by a frame or so while the 20 runs take their time (and by no more).
    passed = verdicts.count("pass")
    assert verdicts[:burst_frames] == ["pass"] * burst_frames and "drop" in verdicts
    assert passed <= most_admitted(1, f, 1.0, time.monotonic() - start)
    assert dp.counters()[("access", "drop", "rate")] == 20 - passed
    # The bucket is passed * cost ahead of the first frame (it never ran dry), and admits
    # while at most 1 s ahead: ((passed + 1/2) * cost - 1) seconds after the first frame
    # one more frame passes, with half a frame cost (~0.18 s) to spare: the refill is what
    # is tested, the sleep is not a wait for an event.
    time.sleep(max(0.0, start + (passed + 0.5) * cost - 1.0 - time.monotonic()))
    again = send(dp, f, 20, hook)
    assert again[0] == "pass" and "drop" in again
    assert passed + again.count("pass") <= most_admitted(1, f, 1.0, time.monotonic() - start)
    vol = dp.maps.volumes([1])[1]
    total = passed + again.count("pass")
    assert vol.up_packets == total
    assert vol.up_bytes == total * ip_len(f)
    assert vol.down_packets == 0


@pytest.mark.parametrize("first", ["fine", "jiffies"])
def test_a_bucket_survives_a_change_of_clock(dp, tick, first):
    # The two clocks differ in origin by months: a bucket emptied on one must not hold
    # back, nor wave through, the subscriber on the other (the burst crossed 50 ms).
    fine_burst, jiffies_burst = (20, 0), (1000, tick)
    a, b = (fine_burst, jiffies_burst) if first == "fine" else (jiffies_burst, fine_burst)
    setup(dp, kbps=1, burst_ms=a[0], tick_ns=a[1])
    assert send(dp, up(), 5)[-1] == "drop"
    dp.maps.set_control_params(burst_us=b[0] * 1000, tick_ns=b[1])
    v = send(dp, up(), 5)
    assert v[0] == "pass" and v[-1] == "drop"


def test_directions_have_their_own_bucket(dp):
    # 1 kbit/s: a frame costs 352 ms. Upstream until its bucket refuses (an event, not a
    # count of frames that assumes how fast they go), then downstream at once.
    setup(dp, kbps=1, burst_ms=1000)
    for _ in range(40):
        if dp.verdict("xdp", "access", up())[0] == "drop":
            break
    else:
        raise AssertionError("the upstream bucket never refused a frame")
    assert dp.verdict("xdp", "core", down())[0] == "pass"
    vol = dp.maps.volumes([1])[1]
    assert vol.down_packets == 1 and vol.down_bytes == ip_len(down())


def test_all_addresses_of_a_subscriber_share_its_budget(dp):
    setup(dp, kbps=8, burst_ms=1000)
    t0 = time.monotonic()
    a = send(dp, up(src="198.51.100.9"), 30).count("pass")   # ~23 pass: empty
    vb, took_b = timed_send(dp, up(src="198.51.100.10"), 20)
    b = vb.count("pass")
    # One budget: both addresses together within the burst and what the time refilled.
    assert a + b <= most_admitted(8, up(), 1.0, time.monotonic() - t0)
    assert b <= 1 + int(took_b / (ip_len(up()) * 8 / 8000)) + 1


def test_throttle_below_contract_counts_as_throttle(dp):
    setup(dp, kbps=800, burst_ms=1000)     # 100 kB/s contract: 40 packets pass
    assert send(dp, up(), 40).count("pass") == 40
    setup(dp, kbps=800, burst_ms=1000)
    dp.maps.set_throttle(1, 8, 8)           # throttled to 1 kB/s
    assert dp.maps.control_flags() & C["XZ_C_THROTTLES"]   # switched on by set_throttle
    v, took = timed_send(dp, up(), 40)
    assert v.count("pass") <= most_admitted(8, up(), 1.0, took)
    assert dp.counters()[("access", "drop", "throttle")] == v.count("drop")
    dp.maps.set_throttle(1, 0, 0)


def test_unlimited_counts_volume_only(dp):
    setup(dp, kbps=0)
    assert set(send(dp, up(), 50)) == {"pass"}
    assert dp.maps.volumes([1])[1].up_packets == 50


def test_rates_switch_off(dp):
    setup(dp, kbps=8, burst_ms=1)
    dp.maps.set_control_flags(0)
    assert set(send(dp, up(), 20)) == {"pass"}
    assert dp.maps.volumes([1])[1].up_packets == 0


def test_pool_address_has_state_of_its_own(dp):
    setup(dp)
    dp.maps.set_prefix(tables.key_of(ipaddress.ip_network("100.64.1.0/24")),
                       Entry(100, DYN, 0, 100_000, 100_000))   # a rate for each address
    send(dp, up(src=POOL4), 3)
    send(dp, up(src="100.64.1.11"), 2)
    vols = {str(tables.ip_of(a)): v.up_packets for a, v in dp.maps.pool_volumes().items()}
    assert vols == {POOL4: 3, "100.64.1.11": 2}


def test_ipv6_pool_addresses_count_by_their_64(dp):
    """An IPv6 pool's addresses without an owner share state by /64 (one customer's
    devices and privacy addresses): one budget, one volume; another /64 has its own."""
    setup(dp)
    dp.maps.set_prefix(tables.key_of(ipaddress.ip_network("2001:db8:4::/48")),
                       Entry(101, DYN, 0, 1, 1))   # 1 kbit/s, a 1 s burst: 125 bytes

    def up6(src: str) -> bytes:
        return packets.frame(Packet("access", src, "2001:db8:ffff::9", 6, 40000, 443))

    first = send(dp, up6("2001:db8:4:1::a"), 8)
    assert "pass" in first and "drop" in first
    assert set(send(dp, up6("2001:db8:4:1:7:7:7:7"), 4)) == {"drop"}   # the same budget
    assert send(dp, up6("2001:db8:4:2::a"), 1) == ["pass"]   # another /64: its own
    vols = {tables.pool_unit(a): v.up_packets for a, v in dp.maps.pool_volumes().items()}
    assert vols == {"2001:db8:4:1::/64": first.count("pass"), "2001:db8:4:2::/64": 1}


def test_suspending_an_ipv6_pool_address_suspends_its_64(dp):
    """``suspend ADDRESS`` of an IPv6 pool address cuts off its /64 (the customer, whose
    next privacy address would otherwise pass), and ``resume`` gives it back."""
    setup(dp)
    m = dp.maps
    m.set_prefix(tables.key_of(ipaddress.ip_network("2001:db8:4::/48")), Entry(101, DYN))

    def verdicts() -> list[str]:
        return [dp.verdict("xdp", "access", packets.frame(
            Packet("access", src, "2001:db8:ffff::9", 6, 40000, 443)))[0]
            for src in ("2001:db8:4:1::a", "2001:db8:4:1:7:7:7:7", "2001:db8:4:2::a")]

    assert sync.set_suspended(m, tables.addr16("2001:db8:4:1::a"), True) == [
        "2001:db8:4:1::/64 (pool 2001:db8:4::/48)"]
    assert verdicts() == ["drop", "drop", "pass"]
    assert dp.counters()[("access", "drop", "suspended")] == 2
    assert sync.set_suspended(m, tables.addr16("2001:db8:4:1:7:7:7:7"), False) == [
        "2001:db8:4:1::/64 (pool 2001:db8:4::/48)"]
    assert verdicts() == ["pass"] * 3
    assert "2001:db8:4:1::/64" not in {str(tables.net_of(k)) for k, _ in m.prefix_items()}


@pytest.mark.parametrize("flags", [0, C["XZ_C_CONGESTION"]])
def test_pool_address_without_a_rate_has_no_state(dp, flags):
    # Nothing to enforce (no rate, no bulk floor): no LRU entry for each pool address.
    setup(dp, flags=flags)
    assert set(send(dp, up(src=POOL4), 3)) == {"pass"}
    assert dp.maps.pool_volumes() == {}


def test_pool_address_gets_state_for_a_bulk_floor(dp):
    setup(dp, flags=C["XZ_C_CONGESTION"])
    dp.maps.set_control_params(bulk_floor_kbps=1000)
    send(dp, up(src=POOL4), 2)
    assert {str(tables.ip_of(a)) for a in dp.maps.pool_volumes()} == {POOL4}


def test_op25b_attempts_are_counted_per_subscriber(dp):
    setup(dp)
    for _ in range(3):
        assert dp.verdict("xdp", "access", up(src=POOL4, dport=25))[0] == "drop"
    assert {str(tables.ip_of(a)): v.op25b for a, v in dp.maps.pool_volumes().items()} == {
        POOL4: 3}


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_bulk_flow_gets_a_share_in_congestion(dp, hook):
    # bulk_kbps=1, bulk_ms=0: a flow is bulk once one 100 ms window was above 1 kbit/s.
    # The subscriber's rate is 80 Mbit/s (10 kB per 1 ms burst); bulk flows share 1% of
    # it: 100 bytes per burst, so back-to-back packets of a bulk flow are dropped.
    setup(dp, kbps=80000, burst_ms=1, flags=C["XZ_C_CONGESTION"], bulk_share=1)
    bulk, short = up(sport=41000), up(sport=42000)
    assert send(dp, bulk, 3, hook) == ["pass"] * 3     # first window: not bulk yet
    # The sleeps below are the time under test (a window closing, a bucket refilling),
    # not waits for an event.
    time.sleep(0.15)
    send(dp, bulk, 1, hook)                            # window closes: bulk from now on
    # 20 back to back, in one test_run: a loaded machine does not space them out (20 calls
    # of ours, the other test worker busy, once took longer than the share refills).
    dp.run(hook, "access", bulk, repeat=20)
    assert 0 < dp.counters()[("access", "drop", "bulk")] < 20
    time.sleep(0.01)
    assert dp.verdict(hook, "access", short)[0] == "pass"   # a new, short flow is not slowed
    # Without congestion mode the same flow is not held to the share.
    dp.maps.set_control_flags(C["XZ_C_RATES"])
    time.sleep(0.01)
    assert dp.verdict(hook, "access", bulk)[0] == "pass"


def test_indexed_pool_addresses_have_state_of_their_own(dp):
    """A pool loaded as `subscribers load` does gets a block of the pool-address array:
    each address its own entry, found by index (no LRU entry), its SMTP attempts counted
    there; an address suspended on its own shares the entry."""
    setup(dp)
    m = dp.maps
    hosts, prefixes = layout.ClassTable(), layout.ClassTable()
    prefixes.append(layout.LPM_KEY.pack(*tables.key_of(ipaddress.ip_network("100.64.1.0/24"))),
                    Entry(100, DYN, 0, 100_000, 100_000))
    sync.apply_subscribers(m, hosts, prefixes)
    (_, pool), = m.prefix_items()
    assert pool.pool_bits == 8
    m.clear_pool_blocks([(pool.slot, 256)])
    send(dp, up(src=POOL4), 3)
    send(dp, up(src="100.64.1.11"), 2)
    assert dp.verdict("xdp", "access", up(src=POOL4, dport=25))[0] == "drop"
    assert m.pool_state.keys() == []
    vols = m.pool_volumes()
    assert {str(tables.ip_of(a)): (v.up_packets, v.op25b) for a, v in vols.items()} == {
        POOL4: (3, 1), "100.64.1.11": (2, 0)}
    sync.set_suspended(m, tables.addr16(POOL4), True)
    assert m.get_host(tables.addr16(POOL4)).slot == pool.slot
    m.set_control_flags(C["XZ_C_RATES"] | C["XZ_C_OP25B"])
    assert dp.verdict("xdp", "access", up(src=POOL4))[0] == "drop"   # suspended
    sync.set_suspended(m, tables.addr16(POOL4), False)
    send(dp, up(src=POOL4), 1)
    assert m.pool_volumes()[tables.addr16(POOL4)].up_packets == 4


def test_smtp_attempts_are_added_a_batch_at_a_time(dp):
    """An SMTP attempt of a pool address or of a subscriber's address (one a RADIUS
    session holds: a host entry with its contract's slot) is noted in its CPU's batch, and
    the batch's last attempt adds them all to their counters (from both hooks: one batch a
    CPU): the counters hold whole batches, and what `top` reads (pool_volumes, volumes)
    every attempt, before, at and after the end of a batch."""
    setup(dp)
    m, batch = dp.maps, C["XZ_OP25B_BATCH"]
    hosts, prefixes = layout.ClassTable(), layout.ClassTable()
    prefixes.append(layout.LPM_KEY.pack(*tables.key_of(ipaddress.ip_network("100.64.1.0/24"))),
                    Entry(100, DYN, 0, 0, 0))
    sync.apply_subscribers(m, hosts, prefixes)
    (_, pool), = m.prefix_items()
    m.clear_pool_blocks([(pool.slot, 256)])
    session = "100.64.1.200"
    m.set_host(tables.addr16(session), Entry(300, DYN, 0, 0, 0, slot=2))
    addrs = [f"100.64.1.{i}" for i in range(1, 5)] + [session]
    sent: collections.Counter[str] = collections.Counter()
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})   # test_run runs where we do: one CPU, one batch
    try:
        for n in range(2 * batch + 3):
            hook = ("xdp", "tc")[n % 2]
            assert dp.verdict(hook, "access", up(src=addrs[n % 5], dport=25))[0] == "drop"
            sent[addrs[n % 5]] += 1
            if n in (batch - 2, batch - 1, batch, 2 * batch + 2):
                seen = {str(tables.ip_of(a)): v.op25b for a, v in m.pool_volumes().items()}
                seen[session] = m.volumes([2])[2].op25b
                assert seen == sent, n
                added = sum(m.pool_op25b.view("I")[pool.slot:pool.slot + 256])
                added += layout.STATE.unpack(m.state_map.lookup(layout.U32.pack(2)))[
                    layout.OP25B]
                assert added == (n + 1) // batch * batch, n
                assert sum(sum(c.values()) for c in m.noted_op25b()) == (n + 1) % batch, n
    finally:
        os.sched_setaffinity(0, cpus)


def test_clearing_a_block_keeps_its_neighbours_attempts(dp):
    """The SMTP attempts of XZ_OP25B_PER addresses share a value of xz_pool_op25b: a block
    cleared for another pool zeroes its own counters, in place, and none beside them."""
    m = dp.maps
    per = C["XZ_OP25B_PER"]
    attempts = m.pool_op25b.view("I")
    first = per + 5                           # a block inside one value, and one across two
    attempts[first - 1:first + per + 1] = array.array("I", range(1, per + 3))
    m.clear_pool_blocks([(first, 3), (first + 6, per - 6)])
    assert list(attempts[first - 1:first + per + 1]) == [
        1, 0, 0, 0, 5, 6, 7, *[0] * (per - 6), per + 2]
    m.clear_pool_blocks([(first - 1, per + 2)])
    assert not any(attempts[first - 1:first + per + 1])
