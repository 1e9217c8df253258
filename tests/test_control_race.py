"""Fault test: every writer of the shared control value at once, in separate processes, on
real pinned maps.

xz_control holds the switches, the parameters and the CSAM generation word in one value; a
change is a read, a change and a write back. Four processes change it for a few hundred
rounds: CSAM list swaps (what `blocklist load` runs), the daemon's tick as fast as it goes
with congestion ``auto`` flipping every tick (and its throttle switch), `throttle` /
`unthrottle`, and `congestion on/off/auto`. After each completed load the list in force must
be the file just loaded (meta sha256 of the generation in force), and again after the daemon
ticked; after each switch change, once the daemon ticked, the switch must be as its writer
set it; at the end, each value is what its last writer set.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xdpzoot.dataplane import kernel, schema

C = schema.C
LOADS = 300            # list swaps; the other writers run as long as they go
TICK_WAIT_S = 30       # a daemon that stops ticking fails the test, it does not hang it
SUBS = "subscriber,address,type,up_kbps,down_kbps\n200,198.51.100.8/29,static,50000,50000\n"
LIST_X = b"# x\n192.0.2.66\n198.18.0.0/15\n2001:db8:bad::/48\n"
LIST_Y = b"# y\n192.0.2.67\n203.0.113.0/28\n2001:db8:bad:1::1\n"


def _quiet() -> None:
    sys.stderr = open(os.devnull, "w")   # the daemon logs every congestion flip


def _wait_ticks(ticks, n: int = 2) -> None:
    """Until the daemon has ended ``n`` more ticks (the event the checks wait for)."""
    start, deadline = ticks.value, time.monotonic() + TICK_WAIT_S
    while ticks.value < start + n:
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon stopped ticking")
        time.sleep(0.0002)


def _save(out: str, res: dict) -> None:
    Path(out).write_text(json.dumps(res))


def swapper(pin: str, paths: list[str], ticks, loads_done, out: str) -> None:
    """Alternate the two lists; after each load, and again after two ticks, the generation
    in force must hold the file just loaded."""
    from xdpzoot.dataplane.instance import Instance

    _quiet()
    res = {"loads": 0, "wrong_after_load": 0, "wrong_after_ticks": 0, "last": None,
           "error": None}
    try:
        with Instance(pin) as inst:
            for i in range(LOADS):
                data = Path(paths[i % 2]).read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                inst.load_csam(data, paths[i % 2])
                res["loads"], res["last"] = i + 1, sha
                res["wrong_after_load"] += inst.csam_status()["sha256"] != sha
                _wait_ticks(ticks)
                res["wrong_after_ticks"] += inst.csam_status()["sha256"] != sha
    except Exception as e:  # noqa: BLE001 - reported to the test
        res["error"] = repr(e)
    finally:
        loads_done.set()
        _save(out, res)


def throttler(pin: str, ticks, loads_done, ops_done, out: str) -> None:
    """`throttle` and `unthrottle` in turn on the subscriber's slot until the loads are
    done, then a last `throttle`; after each, once the daemon ticked twice, the throttle in
    force (and the switch the data plane reads it by) must be as set."""
    from xdpzoot.dataplane.instance import Instance

    _quiet()
    res = {"rounds": 0, "lost": 0, "last": None, "slot": None, "error": None}
    try:
        with Instance(pin) as inst:
            _, slot = inst.subscriber_slot(200, "200")
            res["slot"] = slot

            def step(rate: int) -> None:
                if rate:
                    inst.throttle(slot, rate, 0)
                else:
                    inst.unthrottle(slot)
                res["last"] = rate
                _wait_ticks(ticks)
                m = inst.maps
                if rate:
                    ok = (m.get_throttle(slot) == (rate, rate)
                          and m.manual_throttles().get(slot) == (rate, 0)
                          and m.control_flags() & C["XZ_C_THROTTLES"])
                else:
                    ok = m.get_throttle(slot) == (0, 0) and slot not in m.manual_throttles()
                res["lost"] += not ok
                res["rounds"] += 1

            while not loads_done.is_set():
                step(1000 + res["rounds"] if res["rounds"] % 2 == 0 else 0)
            step(777)
    except Exception as e:  # noqa: BLE001
        res["error"] = repr(e)
    finally:
        with ops_done.get_lock():
            ops_done.value += 1
        _save(out, res)


def operator(pin: str, ticks, loads_done, ops_done, out: str) -> None:
    """`congestion on`, `auto`, `off`, `auto`, ... until the loads are done, then `off`;
    after on or off (the daemon must leave the switch alone), once the daemon ticked
    twice, the switch must be as set."""
    from xdpzoot.dataplane.instance import Instance

    _quiet()
    res = {"rounds": 0, "lost": 0, "last": None, "error": None}
    modes = ("on", "auto", "off", "auto")
    try:
        with Instance(pin) as inst:

            def step(mode: str) -> None:
                inst.congestion(mode)
                res["last"] = mode
                _wait_ticks(ticks)
                if mode != "auto":
                    res["lost"] += inst.congestion(None) != (mode, mode == "on")
                res["rounds"] += 1

            while not loads_done.is_set():
                step(modes[res["rounds"] % 4])
            step("off")
    except Exception as e:  # noqa: BLE001
        res["error"] = repr(e)
    finally:
        with ops_done.get_lock():
            ops_done.value += 1
        _save(out, res)


def ticker(cfg: str, pin: str, ticks, ops_done, n_ops: int, out: str) -> None:
    """The daemon's tick as fast as it goes, the congestion measure flipping every tick
    (mode auto switches it every time), until the other writers are done."""
    from xdpzoot.daemon import Daemon

    _quiet()
    res = {"ticks": 0, "error": None}
    try:
        d = Daemon(cfg, pin)
        d.start()
        flip = [False]

        def feed(now: float, total: int) -> bool:
            flip[0] = not flip[0]
            return flip[0]

        d.congestion.feed = feed
        deadline = time.monotonic() + 600
        while ops_done.value < n_ops and time.monotonic() < deadline:
            d.tick()
            ticks.value += 1
        d.tick()   # once more after the last writer: the end state has seen a tick
        res["ticks"] = ticks.value
    except Exception as e:  # noqa: BLE001
        res["error"] = repr(e)
    finally:
        _save(out, res)


@pytest.fixture
def instance(bpffs, tmp_path):
    """A new instance with one subscriber, congestion mode auto."""
    pin = os.path.join(bpffs, f"race-{secrets.token_hex(4)}")
    (tmp_path / "subs.csv").write_text(SUBS)
    cfg = tmp_path / "xdpzoot.toml"
    cfg.write_text(f"""
[bandwidth]
state = "{tmp_path}/state.msgpack"
audit = "{tmp_path}/audit.jsonl"
congestion = "auto"
[sources]
subscribers = "{tmp_path}/subs.csv"
[limits]
hosts = 1024
prefixes = 1024
subscribers = 1024
csam_hosts = 1024
csam_prefixes = 1024
""")
    xdpzoot = os.path.join(os.path.dirname(sys.executable), "xdpzoot")
    for args in (["subscribers", "load", str(tmp_path / "subs.csv")], ["congestion", "auto"]):
        r = subprocess.run([xdpzoot, "--config", str(cfg), "--pin-dir", pin, *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    try:
        yield str(cfg), pin, tmp_path
    finally:
        kernel.unpin_all(pin)


def test_no_write_of_the_control_value_is_lost(instance):
    cfg, pin, tmp = instance
    paths = [str(tmp / "x.txt"), str(tmp / "y.txt")]
    Path(paths[0]).write_bytes(LIST_X)
    Path(paths[1]).write_bytes(LIST_Y)
    ctx = multiprocessing.get_context("spawn")
    ticks, ops_done, loads_done = ctx.Value("q", 0), ctx.Value("i", 0), ctx.Event()
    out = {n: str(tmp / f"{n}.json") for n in ("swapper", "throttler", "operator", "ticker")}
    procs = [ctx.Process(target=ticker, args=(cfg, pin, ticks, ops_done, 2, out["ticker"])),
             ctx.Process(target=swapper, args=(pin, paths, ticks, loads_done, out["swapper"])),
             ctx.Process(target=throttler, args=(pin, ticks, loads_done, ops_done,
                                                 out["throttler"])),
             ctx.Process(target=operator, args=(pin, ticks, loads_done, ops_done,
                                                out["operator"]))]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(900)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    res = {n: json.loads(Path(f).read_text()) for n, f in out.items()}
    print(json.dumps(res, indent=1))
    assert all(r["error"] is None for r in res.values()), res
    sw, th, op = res["swapper"], res["throttler"], res["operator"]
    assert sw["loads"] == LOADS and th["rounds"] > 0 and op["rounds"] > 0
    assert res["ticker"]["ticks"] >= 2 * LOADS
    # During the run: nothing any writer set was put back by another.
    assert (sw["wrong_after_load"], sw["wrong_after_ticks"], th["lost"], op["lost"]) == \
        (0, 0, 0, 0), res
    # At the end: each value as its last writer set it.
    with kernel.Maps(pin) as m:
        gen = m.word()[1] & C["XZ_CSAM_GEN"]
        assert m.read_meta(gen)["sha256"] == sw["last"]
        flags, params = m.control_flags(), m.control_params()
        assert params["congestion"] == C[f"XZ_CONGESTION_{op['last'].upper()}"]
        assert bool(flags & C["XZ_C_CONGESTION"]) == (op["last"] == "on")
        slot, rate = th["slot"], th["last"]
        assert m.get_throttle(slot) == (rate, rate)
        assert m.manual_throttles().get(slot) == ((rate, 0) if rate else None)
        assert bool(flags & C["XZ_C_THROTTLES"]) == bool(rate)


def test_a_shared_write_without_the_lock_fails(instance):
    """The Instance's maps refuse a write of a shared value unless its lock is held."""
    from xdpzoot.dataplane.instance import Instance

    _, pin, _ = instance
    with Instance(pin) as inst:
        before = inst.maps.control_value()
        for write in (lambda: inst.maps.set_control_flags(0),
                      lambda: inst.maps.set_word(before.csam ^ 1),
                      lambda: inst.maps.set_manual(1, 100, 0),
                      lambda: inst.maps.set_throttle(1, 100, 100)):
            with pytest.raises(kernel.KernelError, match="without the lock"):
                write()
        assert inst.maps.control_value() == before
        with inst.locked():
            inst.maps.set_switch(C["XZ_C_MONITOR"], True)
        assert inst.control_flags() & C["XZ_C_MONITOR"]
