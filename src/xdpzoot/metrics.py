"""Prometheus metrics of ``xdpzoot run``: a collector that reads the maps at scrape time.

Nothing is copied into Python between scrapes but what only the daemon knows (its own
counters, :class:`Stats`) and counts of what the subscriber maps hold (:class:`Census`),
which the daemon's tick takes from the columns it reads anyway: a million-entry map is
never walked for a scrape. What a scrape reads, through an :class:`Instance` of its own
(no lock: each map value is read whole):

- the per-CPU counters (xz_counters, xz_fast, xz_csam_hits: one batch read each), the
  control value, the CSAM list's meta (its counts, digest and load time, written with the
  list);
- the maps' capacities (their info, taken when they are opened);
- the configured interfaces only, from the kernel (netlink): our program there, their
  counters.

Labels take values from closed lists only: roles, verdicts and reasons from
bpf/xdpzoot.h (dataplane/schema.py), table names, subscriber types, the configured
interfaces and volume rules, the RADIUS listener's causes. No subscriber, address or list
entry is ever a label or a value: the CSAM list shows as counts and a digest prefix.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xdpzoot import __version__, tables
from xdpzoot.dataplane import kernel, schema
from xdpzoot.dataplane.layout import class_word

if TYPE_CHECKING:
    import numpy as np

    from xdpzoot.dataplane.instance import Instance

log = logging.getLogger("xdpzoot.metrics")
C = schema.C
SHA_PREFIX = 16          # hex digits of the list's SHA-256 shown (xdpzoot_csam_list_info)
LRU_EVERY_S = 60.0       # how often the tick counts the data plane's LRU tables
FAMILIES = ("ipv4", "ipv6")
CONGESTION = {v: k for k, v in tables.CONGESTION.items()}
# Where each byte of class_word (type, flags, pool_bits) sits in its 32-bit word.
_SHIFT = {k: class_word(*v).bit_length() - 1
          for k, v in {"type": (1, 0, 0), "flags": (0, 1, 0), "pool_bits": (0, 0, 1)}.items()}


# ---- what the daemon keeps -----------------------------------------------------------------


@dataclass
class Stats:
    """The daemon's counts of its own work. The scrape's thread reads them while the tick
    writes: numbers are replaced whole, and a Counter is copied with ``dict()``, one step
    under the interpreter lock (no Python code runs in it)."""

    ticks: int = 0
    tick_failures: int = 0
    tick_seconds: float = 0.0        # every tick's duration, added up
    last_tick_seconds: float = 0.0
    last_tick: float | None = None   # when the last successful tick ended (unix time)
    syncs: Counter = field(default_factory=Counter)           # source -> loads applied
    sync_failures: Counter = field(default_factory=Counter)   # source -> loads refused
    decisions: Counter = field(default_factory=Counter)       # (rule, action) -> count
    snapshots: int = 0
    snapshot_failures: int = 0
    last_snapshot: float | None = None
    audit_failures: int = 0

    def ticked(self, ok: bool, seconds: float, now: float) -> None:
        if not ok:
            self.tick_failures += 1
            return
        self.tick_seconds += seconds
        self.last_tick_seconds = seconds
        self.last_tick = now
        self.ticks += 1


def census(hosts: np.ndarray, prefixes: np.ndarray, owners: np.ndarray,
           contracts: np.ndarray | None = None) -> dict:
    """Counts of what the subscriber maps hold, from their values (rows of struct
    xz_class, kernel.Maps.class_columns), the slots' owners (owner_ids) and the RADIUS
    contracts' values (their state slots are in use without a session too): entries,
    session entries, pools, IPv4 pool addresses with state of their own, state slots in
    use, subscribers (a state slot) by type, and those suspended (a subscriber, or a pool
    or pool address). Numbers only; vectorised, a few ms at a million entries."""
    import numpy as np

    def field_of(rows: np.ndarray, name: str) -> np.ndarray:
        return (rows[:, 1] >> _SHIFT[name]) & 0xFF

    used = owners != 0
    type_of = np.zeros(len(owners), dtype=np.uint8)
    out = {"hosts": len(hosts), "prefixes": len(prefixes), "contracts": 0,
           "session_entries": 0, "suspended": 0, "pools": 0, "pool_addresses": 0}
    if contracts is not None:
        contracts = contracts[field_of(contracts, "type") != 0]   # not the count at key 0
        contracts = contracts[contracts[:, 4] < len(owners)]
        used[contracts[:, 4]] = True
        type_of[contracts[:, 4]] = field_of(contracts, "type")
        out["contracts"] = len(contracts)
    used[0] = False   # the pool addresses' slot
    suspended_slots = []
    for rows, is_prefix in ((hosts, False), (prefixes, True)):
        flags, bits, slot = field_of(rows, "flags"), field_of(rows, "pool_bits"), rows[:, 4]
        pooled = (slot == 0) | (bits != 0)
        type_of[slot[~pooled]] = field_of(rows, "type")[~pooled]
        out["session_entries"] += int(np.count_nonzero(flags & C["XZ_F_SESSION"]))
        held = (flags & C["XZ_F_SUSPENDED"]) != 0
        suspended_slots.append(slot[held & ~pooled])
        out["suspended"] += int(np.count_nonzero(held & pooled))
        if is_prefix:
            out["pools"] = int(np.count_nonzero(pooled))
            out["pool_addresses"] = int((1 << bits[bits != 0].astype(np.int64)).sum())
    out["suspended"] += int(np.unique(np.concatenate(suspended_slots)).size)
    by_type = np.bincount(type_of[used], minlength=256)
    out["subscriber_slots"] = int(np.count_nonzero(used))
    out["subscribers"] = {name: int(by_type[t]) for name, t in schema.TYPES.items()}
    return out


class Census:
    """Counts of what the maps hold, for the metrics, taken by the daemon's tick: the
    subscriber maps' from the columns the tick reads anyway (census()), the contracts'
    when a load has written the maps (their count moves only then), the allow-list's at
    every tick (a few entries), and the data plane's LRU tables (flows, pool addresses
    without an owner) every LRU_EVERY_S (a walk of up to their size; the flow table's only
    when congestion mode was on since the last count: no packet adds a flow otherwise).
    ``counts`` is replaced whole: the scrape's thread reads one tick's counts."""

    def __init__(self) -> None:
        self.counts: dict = {}
        self.throttled: dict[str, int] = {}   # by cause: rule, hand (the tick's)
        self._contracts: tuple[int, np.ndarray] | None = None   # (loads seen, values)
        self._lru: tuple[float, dict[str, int]] | None = None   # (when, counts)
        self._congested = True   # congestion mode was on since the flows were counted

    def take(self, inst: Instance, columns: tuple[np.ndarray, np.ndarray],
             owners: np.ndarray, now: float) -> None:
        loads = inst.subscriber_loads()
        if self._contracts is None or self._contracts[0] != loads:
            self._contracts = (loads, inst.contract_columns())
        counts = census(*columns, owners, self._contracts[1])
        counts["allow"] = inst.entries("allow")
        self._congested |= bool(inst.control_flags() & C["XZ_C_CONGESTION"])
        if self._lru is None or not 0 <= now - self._lru[0] < LRU_EVERY_S:
            lru = {"pool_lru": inst.entries("pool_lru")}
            lru["flows"] = inst.entries("flows") if self._congested else \
                self._lru[1]["flows"]
            self._lru, self._congested = (now, lru), False
        self.counts = {**counts, **self._lru[1]}


# ---- the collector -------------------------------------------------------------------------


class Collector:
    """The metrics of one daemon (xdpzoot.daemon.Daemon), read at each scrape. Scrapes
    run one at a time (an HTTP server thread each): the collector's Instance is its own,
    used by no other thread."""

    def __init__(self, daemon):
        self.d = daemon
        self._lock = threading.Lock()
        self._inst: Instance | None = None
        self._failed: str | None = None   # the last map read's error, logged once

    def describe(self) -> list:
        return []   # no collect() at registration: that would read the maps

    def collect(self) -> list:
        with self._lock:
            out = list(self._daemon()) + list(self._radius())
            try:
                maps = list(self._maps(self._instance()))
                if self._failed:
                    log.warning("metrics: the maps are read again")
                self._failed = None
            except (kernel.KernelError, OSError) as e:
                if str(e) != self._failed:
                    log.warning("metrics: maps not read: %s", e)
                self._failed, maps = str(e), []
            out.append(_gauge("xdpzoot_dataplane_loaded", "1 when the instance's maps "
                              "were read for this scrape (pinned, of this build's layout).",
                              value=0 if self._failed else 1))
            return out + maps

    def _instance(self) -> Instance:
        from xdpzoot.dataplane.instance import Instance

        if self._inst is None:
            self._inst = Instance(self.d.pin_dir, self.d.cfg.defines())
        return self._inst

    def close(self) -> None:
        with self._lock:
            if self._inst is not None:
                self._inst.close()
                self._inst = None

    # -- the maps ---------------------------------------------------------------------------
    def _maps(self, inst: Instance) -> Iterator:
        cfg = self.d.cfg
        slots = inst.counter_slots()
        pk = _counter("xdpzoot_packets", "Packets by interface role, verdict and reason "
                      "(the data plane's per-CPU counters).", ["role", "verdict", "reason"])
        by = _counter("xdpzoot_bytes", "Bytes by interface role, verdict and reason, as "
                      "the hook sees the frame.", ["role", "verdict", "reason"])
        for role in schema.ROLES:
            for verdict in schema.VERDICTS:
                for reason in schema.REASONS:
                    p, b = slots[schema.counter_index(role, verdict, reason)]
                    pk.add_metric([role, verdict, reason], p)
                    by.add_metric([role, verdict, reason], b)
        yield pk
        yield by
        fp = _counter("xdpzoot_fast_path_packets", "Packets the fast path (XDP or TC) "
                      "forwarded (reason forwarded) or handed to the kernel, by reason.",
                      ["reason"])
        fb = _counter("xdpzoot_fast_path_bytes", "Bytes of xdpzoot_fast_path_packets_total.",
                      ["reason"])
        for reason, (p, b) in inst.fast_counters().items():
            fp.add_metric([reason], p)
            fb.add_metric([reason], b)
        yield fp
        yield fb

        control = inst.control_params()
        sw = _gauge("xdpzoot_switch_enabled", "The data plane's global switches, 1 when "
                    "on (bypass: everything passes; monitor: nothing is dropped).",
                    ["switch"])
        for name, on in tables.control_names(control["flags"]).items():
            sw.add_metric([name], int(on))
        yield sw
        mode = _gauge("xdpzoot_congestion_mode", "1 for the congestion mode set (off, on, "
                      "auto).", ["mode"])
        for value, name in CONGESTION.items():
            mode.add_metric([name], int(control["congestion"] == value))
        yield mode
        yield _gauge("xdpzoot_congestion_active", "1 while congestion mode is in force "
                     "(bulk flows get a share of their subscriber's rate).",
                     value=int(bool(control["flags"] & C["XZ_C_CONGESTION"])))
        yield _counter("xdpzoot_trace_events_lost", "Drop events of `xdpzoot trace` the "
                       "ring buffer had no room for (the packets were dropped all the same).",
                       value=inst.trace_lost())

        csam = inst.csam_status()
        yield from self._interfaces(inst, cfg)
        yield from self._csam(csam)
        yield from self._tables(inst, csam)

    def _interfaces(self, inst: Instance, cfg) -> Iterator:
        roles = {n: "access" for n in cfg.interfaces.access} | \
            {n: "core" for n in cfg.interfaces.core}
        try:
            found = inst.interfaces(list(roles))
        except (kernel.KernelError, OSError) as e:   # the maps' metrics still go out
            log.warning("metrics: interfaces not read: %s", e)
            found = {}
            roles = {}
        att = _gauge("xdpzoot_interface_attached", "1 when this instance's program (XDP or "
                     "TC) is attached to the configured interface.", ["interface", "role"])
        names = {"rx_packets": ("receive_packets", "Packets the interface received (the "
                                "kernel's counter)."),
                 "rx_bytes": ("receive_bytes", "Bytes the interface received."),
                 "tx_packets": ("transmit_packets", "Packets the interface sent."),
                 "tx_bytes": ("transmit_bytes", "Bytes the interface sent.")}
        fams = {k: _counter(f"xdpzoot_interface_{n}", doc, ["interface", "role"])
                for k, (n, doc) in names.items()}
        hooks, modes = set(), set()
        for name, role in roles.items():
            a, stats = found.get(name, (None, None))
            att.add_metric([name, role], int(a is not None))
            if a is not None:
                hooks.add(a.hook)
                modes.add(a.mode)
            for k, fam in fams.items():
                if stats is not None:
                    fam.add_metric([name, role], stats[k])
        yield att
        yield from fams.values()
        yield _info("xdpzoot_build", "Version, the hook and mode the programs run at on "
                    "the configured interfaces, and the kernel.",
                    {"version": __version__, "hook": ",".join(sorted(hooks)) or "none",
                     "mode": ",".join(sorted(modes)) or "none",
                     "kernel": os.uname().release})

    def _csam(self, st: dict) -> Iterator:
        yield _gauge("xdpzoot_csam_generation", "The CSAM list generation in force (0 or "
                     "1; it changes at every load of a new list).", value=st["generation"])
        ent = _gauge("xdpzoot_csam_entries", "Entries of the CSAM list in force, by kind "
                     "and family (counts only, never an entry).", ["kind", "family"])
        for kind, key in (("host", "hosts"), ("prefix", "prefixes")):
            for fam in FAMILIES:
                ent.add_metric([kind, fam], st[key + fam[-1]])
        yield ent
        hits = _counter("xdpzoot_csam_hits", "Packets that hit the CSAM list, by family "
                        "(both generations; nothing finer is counted).", ["family"])
        for fam in FAMILIES:
            hits.add_metric([fam], st["hits"][f"gen0_{fam}"] + st["hits"][f"gen1_{fam}"])
        yield hits
        for key, name, text in (
                ("filter_fill", "xdpzoot_csam_filter_fill_ratio", "Share of the bits set in "
                 "the CSAM list's filter in force, by family: the share of unlisted addresses "
                 "still looked up (no sample: the filter is off, all are)."),
                ("filter_bits", "xdpzoot_csam_filter_bits", "Bits of the CSAM list's filter "
                 "in force, by family: 2^20 hashed, 2^24 the exact IPv4 one of a list that "
                 "touches more /24s than that (no sample: off).")):
            g = _gauge(name, text, ["family"])
            for fam in FAMILIES:
                if st[key][fam] is not None:
                    g.add_metric([fam], st[key][fam])
            yield g
        loaded = st["loaded"]   # None: no list was ever loaded (no sample, below)
        yield _info("xdpzoot_csam_list", "The CSAM list in force: the first "
                    f"{SHA_PREFIX} hex digits of its file's SHA-256.",
                    {"sha256": st["sha256"][:SHA_PREFIX]} if loaded else None)
        yield _gauge("xdpzoot_csam_loaded_timestamp_seconds", "When the CSAM list in force "
                     "was loaded (unix time).", value=loaded)
        yield _gauge("xdpzoot_csam_age_seconds", "Seconds since the CSAM list in force was "
                     "loaded.", value=max(0.0, time.time() - loaded) if loaded else None)

    def _tables(self, inst: Instance, st: dict) -> Iterator:
        counts = self.d.census.counts
        cap = _gauge("xdpzoot_table_capacity", "Entries a table can hold (a CSAM table's: "
                     "per generation).", ["table"])
        ent = _gauge("xdpzoot_table_entries", "Entries a table holds (the subscriber "
                     "tables' as of the daemon's last tick; the LRU tables' counted every "
                     f"{LRU_EVERY_S:g} s; the CSAM tables' as loaded).", ["table"])
        held = {**counts, "csam_hosts": st["hosts4"] + st["hosts6"],
                "csam_prefixes": st["prefixes4"] + st["prefixes6"],
                "manual_throttles": self.d.census.throttled.get("hand"),
                "uniform_classes": inst.uniform_classes(),
                "hosted_slash24s": inst.hosted_slash24s(),
                "ipv6_prefix_lengths": inst.ipv6_prefix_lengths()}
        for table, n in inst.capacities().items():
            cap.add_metric([table], n)
            if held.get(table) is not None:
                ent.add_metric([table], held[table])
        yield cap
        yield ent
        if not counts:   # before the first tick: the families without samples
            counts = {"subscribers": {}, "pools": None, "session_entries": None,
                      "suspended": None}
        subs = _gauge("xdpzoot_subscribers", "Subscribers with a state slot of their own "
                      "(a static row, a dynamic host, a RADIUS contract), by type; a pool "
                      "counts in xdpzoot_subscriber_pools.", ["type"])
        for t, n in counts["subscribers"].items():
            subs.add_metric([t], n)
        yield subs
        yield _gauge("xdpzoot_subscriber_pools", "Dynamic pools (each address its own "
                     "subscriber, without a slot).", value=counts["pools"])
        yield _gauge("xdpzoot_session_entries", "Host and prefix entries made from RADIUS "
                     "sessions.", value=counts["session_entries"])
        yield _gauge("xdpzoot_subscribers_suspended", "Subscribers suspended (and pools or "
                     "pool addresses suspended, each counted once).",
                     value=counts["suspended"])
        thr = _gauge("xdpzoot_subscribers_throttled", "Subscribers with a throttle in force, "
                     "by cause: a volume rule's, one set by hand (xdpzoot throttle), or "
                     "rates a RADIUS CoA set (since the listener started and until the "
                     "subscriber file is loaded again). One may have several.", ["cause"])
        throttled = {**self.d.census.throttled,
                     "coa": len(self.d.radius.rated) if self.d.radius is not None else 0}
        for cause in ("rule", "hand", "coa"):
            if cause in throttled:
                thr.add_metric([cause], throttled[cause])
        yield thr

    # -- the daemon -------------------------------------------------------------------------
    def _daemon(self) -> Iterator:
        d, s = self.d, self.d.stats
        yield _counter("xdpzoot_ticks", "Ticks of the daemon that completed.", value=s.ticks)
        yield _counter("xdpzoot_tick_failures", "Ticks that failed (logged; the next one "
                       "tries again).", value=s.tick_failures)
        yield _counter("xdpzoot_tick_seconds", "Time spent in ticks, added up.",
                       value=s.tick_seconds)
        yield _gauge("xdpzoot_tick_duration_seconds", "How long the last tick took.",
                     value=s.last_tick_seconds)
        yield _gauge("xdpzoot_tick_interval_seconds", "The configured tick period "
                     "(bandwidth.tick_seconds).", value=d.cfg.bandwidth.tick_seconds)
        yield _gauge("xdpzoot_last_tick_timestamp_seconds", "When the last tick that "
                     "completed ended (unix time).", value=s.last_tick)
        syncs = _counter("xdpzoot_source_syncs", "Changed source files loaded by the "
                         "daemon.", ["source"])
        fails = _counter("xdpzoot_source_sync_failures", "Changed source files the daemon "
                         "did not load (invalid, too short, too large: logged).", ["source"])
        done, failed = dict(s.syncs), dict(s.sync_failures)
        for source in ("subscribers", "csam"):
            syncs.add_metric([source], done.get(source, 0))
            fails.add_metric([source], failed.get(source, 0))
        yield syncs
        yield fails
        dec = _counter("xdpzoot_decisions", "Decisions of the volume and abuse rules (and "
                       "of congestion auto), by rule and action.", ["rule", "action"])
        for (rule, action), n in sorted(dict(s.decisions).items()):
            dec.add_metric([rule, action], n)
        yield dec
        yield _counter("xdpzoot_snapshot_writes", "State snapshots written.",
                       value=s.snapshots)
        yield _counter("xdpzoot_snapshot_write_failures", "State snapshots that could not "
                       "be written (retried every tick).", value=s.snapshot_failures)
        yield _gauge("xdpzoot_last_snapshot_timestamp_seconds", "When the last snapshot "
                     "was written (unix time).", value=s.last_snapshot)
        yield _counter("xdpzoot_audit_write_failures", "Audit log writes that failed (the "
                       "records stay queued and are retried).", value=s.audit_failures)
        yield _gauge("xdpzoot_core_utilisation_ratio", "The core interfaces' traffic over "
                     "bandwidth.capacity_kbps, as congestion auto last measured it.",
                     value=d.congestion.utilisation if d.congestion else None)

    def _radius(self) -> Iterator:
        """The listener's counters; without a listener, the families without samples."""
        r = self.d.radius
        c = r.listener.counters() if r is not None else \
            {"sessions": None, "addresses_held": None, "requests": {}, "drops": {},
             "answers": {}, "errors": {}}
        yield _gauge("xdpzoot_radius_sessions", "RADIUS sessions held.",
                     value=c["sessions"])
        yield _gauge("xdpzoot_radius_session_addresses", "Addresses and prefixes the "
                     "RADIUS sessions hold.", value=c["addresses_held"])
        for key, name, label, doc in (
                ("requests", "requests", "kind", "RADIUS requests by kind (accounting "
                 "status, coa, disconnect, duplicate; expired: sessions timed out)."),
                ("drops", "drops", "cause", "RADIUS requests dropped unanswered, by cause."),
                ("answers", "answers", "answer", "RADIUS answers sent, by kind."),
                ("errors", "errors", "error", "RADIUS listener errors not about one request "
                 "(the session snapshot).")):
            fam = _counter(f"xdpzoot_radius_{name}", doc, [label])
            for k, n in sorted(c[key].items()):
                fam.add_metric([k], n)
            yield fam
        writes = _counter("xdpzoot_radius_session_writes", "Session entries written into "
                          "the maps or removed, and those not written (unknown: no "
                          "contract; conflict: the subscriber file's entry is there).",
                          ["result"])
        for k, n in sorted(dict(r.counts if r is not None else {}).items()):
            writes.add_metric([k], n)
        yield writes


def _counter(name: str, doc: str, labels: list[str] | None = None,
             value: float | None = None):
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, value=value, labels=labels)


def _gauge(name: str, doc: str, labels: list[str] | None = None, value: float | None = None):
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value, labels=labels)


def _info(name: str, doc: str, value: dict[str, str]):
    from prometheus_client.core import InfoMetricFamily

    return InfoMetricFamily(name, doc, value=value)


# ---- the endpoint --------------------------------------------------------------------------


def registry(collector: Collector):
    """A registry with ``collector`` and the process's own metrics (CPU time, memory,
    open files: process_*)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ProcessCollector(registry=reg)
    return reg


class Server:
    """The HTTP exposition of ``listen`` ("HOST:PORT"), served by prometheus-client on
    threads of its own (one per scrape) until :meth:`close`."""

    def __init__(self, daemon, listen: str):
        from prometheus_client import start_http_server

        from xdpzoot.config import listen_address
        from xdpzoot.dataplane import netlink  # noqa: F401 (imported now, not at a scrape)

        host, port = listen_address(listen)
        self.listen = listen
        self.collector = Collector(daemon)
        self.registry = registry(self.collector)
        try:
            self.httpd, self.thread = start_http_server(port, host, self.registry)
        except OSError as e:
            raise OSError(f"metrics.listen {listen}: {e.strerror or e}") from e

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
        self.collector.close()
