"""`xdpzoot run`: the controller's loop.

On a tick it reads the per-subscriber volume counters, lets the accounting decide
(throttle, release, notify, suspend) for the subscribers whose counters moved, writes the
rates in force into the maps, expires throttles set by hand, switches congestion mode in
``auto``, re-syncs the source files when they change, writes the fast path's interfaces
(devmap, MAC addresses) again when a link changed, writes the audit log, and snapshots
its state atomically (every ``snapshot_seconds``, and after any tick that decided
something) so that a restart (or a crash) resumes windows and throttles. Every
``[signals] window_seconds`` it starts a new window of the abuse signals (scan sketch,
blocked SMTP) and lets the ``[[abuse]]`` rules judge the one that ended. SIGTERM stops
it cleanly (the data plane keeps enforcing); SIGHUP rereads the config and the rules,
and the RADIUS listener takes its new [radius] section (started or stopped if it turned
on or off). It serves Prometheus metrics on ``[metrics] listen`` (metrics.py), read at
each scrape on a thread of the HTTP server's.

Time and sleep are parameters: the tests run a month in milliseconds.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from xdpzoot import metrics, tables
from xdpzoot.bandwidth import abuse as abuse_rules
from xdpzoot.bandwidth import accounting, store
from xdpzoot.bandwidth import rules as volume_rules
from xdpzoot.config import load_config
from xdpzoot.dataplane import kernel, layout, schema
from xdpzoot.dataplane.instance import Instance
from xdpzoot.sources import csam
from xdpzoot.sources.files import SourceError
from xdpzoot.sources.subscribers import read_plans

C = schema.C


def log(msg: str) -> None:
    """One line to stderr (the journal, under systemd)."""
    print(f"xdpzoot: {msg}", file=sys.stderr, flush=True)


def log_to_stderr() -> logging.Handler:
    """The lines of the RADIUS listener and the metrics endpoint (loggers under "xdpzoot",
    warnings and errors) to stderr as log() writes its own: "xdpzoot: " first. Without it
    Python printed them bare. Returns the handler (once per process)."""
    lg = logging.getLogger("xdpzoot")
    for h in lg.handlers:
        if getattr(h, "xdpzoot", False):
            return h
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("xdpzoot: %(message)s"))
    h.xdpzoot = True
    lg.addHandler(h)
    lg.setLevel(logging.WARNING)
    return h


@dataclass
class Congestion:
    """Congestion mode ``auto``: on when utilisation stays above ``share`` percent of
    ``capacity_kbps`` for ``seconds``, off when it stays below share - hysteresis."""

    capacity_kbps: int
    share: int
    seconds: int
    hysteresis: int
    active: bool = False
    _last: tuple[float, int] | None = None
    _since: float | None = None   # since when the level is on the other side
    utilisation: float | None = None   # the last measure, a share of capacity_kbps

    def feed(self, now: float, total_bytes: int) -> bool:
        """Take the interfaces' byte counter; returns whether congestion mode is on."""
        last, self._last = self._last, (now, total_bytes)
        if last is None or now <= last[0] or self.capacity_kbps <= 0:
            return self.active
        kbps = max(0, total_bytes - last[1]) * 8 / 1000 / (now - last[0])
        self.utilisation = kbps / self.capacity_kbps
        pct = 100 * self.utilisation
        crossing = pct < self.share - self.hysteresis if self.active else pct > self.share
        if not crossing:
            self._since = None
        elif self._since is None:
            self._since = last[0]
        elif now - self._since >= self.seconds:
            self.active, self._since = not self.active, None
        return self.active


@dataclass
class Daemon:
    """One controller for one xdpzoot instance (its pin directory)."""

    config_path: str | None
    pin_dir: str
    clock: Callable[[], float] = time.time
    cfg: object = None
    inst: Instance | None = None
    acct: accounting.Accounting | None = None
    audit: store.AuditLog | None = None
    congestion: Congestion | None = None
    watched: dict[str, tuple[int, int]] = field(default_factory=dict)
    plans: dict[int, str] = field(default_factory=dict)   # subscriber id -> service plan
    reload_wanted: bool = False
    stop_wanted: bool = False
    _last_purge: float = 0.0
    unaudited: list = field(default_factory=list)   # actions the audit log has not taken yet
    _failing: dict[str, tuple] = field(default_factory=dict)   # what -> (errno, message)
    plans_changed: bool = True   # the engine has not been given self.plans yet
    # The last tick's view of the maps: subscriber id and bytes (up, down) per state slot,
    # and the slot of each subscriber.
    _owners: np.ndarray | None = None
    _bytes: np.ndarray | None = None
    _slot_of: dict[int, int] = field(default_factory=dict)
    _throttled: set[int] | None = None   # slots with a throttle after the last tick
    _saved: tuple[float, int] = (0.0, -1)   # the last snapshot: when, acct.decisions then
    radius: object = None   # radius_service.RadiusService, on a thread of its own
    stats: metrics.Stats = field(default_factory=metrics.Stats)   # for the metrics
    census: metrics.Census = field(default_factory=metrics.Census)
    server: metrics.Server | None = None   # the metrics endpoint, while run() runs
    abuse: abuse_rules.Abuse | None = None   # the [[abuse]] rules' runs
    _op25b: np.ndarray | None = None   # blocked SMTP attempts per slot at the window's start
    _links: dict | None = None   # the interfaces' (ifindex, MAC) the fast path's maps were given

    # -- setup ------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the instance, read config and rules, resume from the snapshot."""
        self.cfg = load_config(self.config_path)
        self.inst = Instance(self.pin_dir, self.cfg.defines())
        if not self.inst.loaded():
            raise kernel.KernelError(kernel.NOT_LOADED.format(self.pin_dir))
        self._load_rules(resume=True)
        self._watch_init()
        if self.cfg.radius.listen or self.cfg.radius.coa_listen:
            from xdpzoot.radius_service import RadiusService

            self.radius = RadiusService(self.cfg, self.pin_dir).start_thread()
        if self.cfg.sources.subscribers:
            try:
                self.plans = read_plans(self.cfg.sources.subscribers,
                                        self.cfg.limits.source_bytes)
            except SourceError as e:
                log(f"plans not read: {e}")
        self._saved = (self.clock(), self.acct.decisions)   # what was read is on disk

    def _load_rules(self, resume: bool) -> None:
        b = self.cfg.bandwidth
        rules = volume_rules.load_rules(b.rules, self.cfg.limits.source_bytes) if b.rules else []
        old = self.acct
        self.acct = accounting.Accounting(rules)
        if resume:
            try:
                data = store.load_snapshot(b.state, self.cfg.limits.source_bytes)
                if data is not None:
                    self.acct = accounting.Accounting.restore(data, rules)
                    log(f"resumed from {b.state}")
            except (accounting.SnapshotError, SourceError, OSError) as e:
                log(f"warning: {b.state}: {e}; starting afresh (the maps keep enforcing)")
                self._adopt_throttles()
        elif old is not None:
            self.acct = accounting.Accounting.restore(old.snapshot(), rules)
        self.plans_changed = True
        self.abuse = abuse_rules.Abuse(self.cfg.abuse)   # runs start afresh with new rules
        self.audit = store.AuditLog(b.audit, b.audit_retention_days * 86400)
        self.congestion = Congestion(b.capacity_kbps, b.congestion_share,
                                     b.congestion_seconds, b.hysteresis,
                                     active=bool(self.inst.control_flags()
                                                 & C["XZ_C_CONGESTION"]))

    def _adopt_throttles(self) -> None:
        """Without a usable snapshot the rules' history is gone: throttles in force in the
        kernel are kept, as if set by hand, until `unthrottle` lifts them."""
        self.inst.adopt_throttles()

    def reload(self) -> None:
        """SIGHUP: reread the config and the rules; windows and throttles are kept. Then
        the RADIUS listener's part (:meth:`_reload_radius`); the metrics endpoint moves
        when ``[metrics] listen`` changed."""
        self.cfg = load_config(self.config_path)
        self.inst.configure(self.cfg)
        self._load_rules(resume=False)
        log("config and rules reloaded")
        self._reload_radius()
        if (self.server.listen if self.server else "") != self.cfg.metrics.listen:
            try:
                self._serve_metrics()
            except OSError as e:
                log(f"metrics not served: {e}")

    def _reload_radius(self) -> None:
        """Start the listener if [radius] listen or coa_listen turned on (or it had
        stopped on an error), stop it (its session snapshot written) if both turned off,
        else let it take the new section and secret files while serving. If that fails
        the listener goes on as it was."""
        from xdpzoot.radius_service import RadiusService

        r = self.cfg.radius
        if self.radius is not None and not self.radius.serving():
            self.radius = None   # stopped on an error (logged then): started anew
        try:
            if self.radius is None and (r.listen or r.coa_listen):
                self.radius = RadiusService(self.cfg, self.pin_dir).start_thread()
                log(f"radius: started, {len(self.radius.listener.table)} sessions restored")
            elif self.radius is not None and not (r.listen or r.coa_listen):
                self.radius.stop()
                self.radius = None
                log("radius: stopped, its session entries stay in the maps")
            elif self.radius is not None:
                what = self.radius.reload(self.cfg)
                if what:
                    log(f"radius: reloaded: {what}")
        except (SourceError, OSError, kernel.KernelError, RuntimeError) as e:
            log(f"radius: not started: {e}" if self.radius is None else
                f"radius: reload failed, keeping the old config: {e}")

    def _serve_metrics(self) -> None:
        """Serve ``[metrics] listen`` (none when it is ""), closing what was served."""
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.cfg.metrics.listen:
            self.server = metrics.Server(self, self.cfg.metrics.listen)

    # -- the tick ---------------------------------------------------------------------------
    def tick(self) -> list:
        """One round: count, decide, enforce, persist. Returns the actions taken.

        The cycle collector waits meanwhile: a tick makes and keeps up to millions of small
        objects (a million subscribers' windows), which it would walk again and again as
        they are made (two thirds of a first tick at 1M). What the tick made is walked once
        at its end; the whole heap hourly (_persist)."""
        gc.disable()
        t0, ok = time.perf_counter(), False
        try:
            actions = self._tick()
            ok = True
            return actions
        finally:
            gc.collect(1)
            gc.enable()
            self.stats.ticked(ok, time.perf_counter() - t0, self.clock())

    def _tick(self) -> list:
        now = self.clock()
        words = self.inst.state_words()
        window = self.inst.next_scan_window(now, self.cfg.signals.window_seconds)
        columns = self.inst.class_columns()
        counters = self._counters(columns, words)
        self.census.take(self.inst, columns, self._owners, now)
        del columns
        plans, self.plans_changed = (self.plans if self.plans_changed else None), False
        actions = self.acct.observe(now, counters, plans)
        if window:
            actions += self._abuse(window, words)
        suspend: dict[int, bool] = {}   # in time order: the last action per subscriber
        for a in actions:
            self.stats.decisions[(a.rule, a.action)] += 1
            if a.action in ("suspend", "unsuspend"):
                # Another rule may still hold the subscriber suspended.
                suspend[a.subscriber] = bool(a.values.get("suspended", a.action == "suspend"))
        if suspend:
            self.inst.suspend_ids(suspend)
        self._enforce_rates(now)
        self._congestion(now)
        self._watch_sources()
        self._watch_links()
        self.unaudited.extend(actions)
        self._persist(now)
        return actions

    def _counters(self, columns, words: np.ndarray) -> dict[int, tuple[int, int]]:
        """Subscriber -> (bytes up, bytes down) so far, for the slots whose counters moved
        since the last tick; for every owned slot when the owners changed (a load, a slot
        given to another subscriber), so that a new subscriber's first counter, its
        baseline, is seen at once. ``columns``: the subscriber maps' values
        (Instance.class_columns), which say who owns each slot; ``words``: the state array
        as read at the tick's start."""
        owners, counts = self.inst.owner_ids(columns), self.inst.byte_counters(words)
        if self._owners is None or not np.array_equal(owners, self._owners):
            moved = owners != 0
            slots = np.flatnonzero(moved)
            self._owners = owners
            self._slot_of = dict(zip(owners[slots].tolist(), slots.tolist(), strict=True))
        else:
            moved = (counts != self._bytes).any(axis=1) & (owners != 0)
        self._bytes = counts
        slots = np.flatnonzero(moved)
        return dict(zip(owners[slots].tolist(), map(tuple, counts[slots].tolist()),
                        strict=True))

    def _abuse(self, window: tuple[int, int], words: np.ndarray) -> list:
        """The [[abuse]] rules on the window that ended, from the state array read just
        before it did (what came between the read and the new window is lost to both: at
        most the read's time, ~0.3 s at 1M slots). A window much longer than configured
        (the daemon was stopped) is not judged."""
        start, end = window
        op25b = words[:, layout.OP25B].copy()
        for slot, n in self.inst.maps.noted_op25b()[1].items():   # and those not added yet
            if slot < len(op25b):
                op25b[slot] += n
        base, self._op25b = self._op25b, op25b
        if not self.abuse.rules or end - start > 2 * self.cfg.signals.window_seconds:
            return []
        scans = layout.state_scans(words, start)
        # Less than the last window's: a slot cleared, which counts anew; or by a few, the
        # attempts noted then and added since, after this read of their counter (a lag,
        # counted in the next window).
        lag = schema.C["XZ_OP25B_BATCH"] * kernel.possible_cpus()
        smtp = np.zeros_like(op25b) if base is None or len(base) != len(op25b) else \
            np.where(op25b >= base, op25b - base, np.where(base - op25b <= lag, 0, op25b))
        over = np.zeros(len(op25b), dtype=bool)   # the rules see only who is over one
        for name, value in (("scans", scans), ("smtp_blocked", smtp)):
            low = self.abuse.lowest(name)
            if low is not None:
                over |= value > low
        owners = self._owners
        slots = np.flatnonzero(over & (owners != 0))
        values = dict(zip(owners[slots].tolist(),
                          zip(scans[slots].tolist(), smtp[slots].tolist(), strict=True),
                          strict=True))
        return self.abuse.observe(start, end, values)

    def _persist(self, now: float, snapshot: bool = False) -> None:
        """The audit log, and the snapshot when ``snapshot_seconds`` have passed since the
        last, when the accounting decided something since (a crash must not make it decide
        again), or when ``snapshot`` (at the stop); each written whole or not at all
        (store.py). What cannot be written (a full disk, a read-only directory) is retried
        on the next tick: the actions stay queued, and each snapshot holds the whole state."""
        b = self.cfg.bandwidth
        if self.unaudited:
            if self._write("audit log", b.audit, lambda: self.audit.write(self.unaudited)):
                self.unaudited = []
            else:
                self.stats.audit_failures += 1
        if now - self._last_purge >= 3600:
            self._write("audit log", b.audit, lambda: self.audit.purge(now))
            self._last_purge = now
            gc.collect()
        when, decisions = self._saved
        if (snapshot or "snapshot" in self._failing or decisions != self.acct.decisions
                or not 0 <= now - when < b.snapshot_seconds):
            decisions = self.acct.decisions
            if self._write("snapshot", b.state,
                           lambda: store.save_snapshot(b.state, self.acct.snapshot())):
                self._saved = (now, decisions)
                self.stats.snapshots += 1
                self.stats.last_snapshot = now
            else:
                self.stats.snapshot_failures += 1

    def _write(self, what: str, path: str, write: Callable[[], object]) -> bool:
        """One write to the state directory. A failure is logged once per condition (not
        on every tick), and its end once; the maps keep enforcing either way."""
        try:
            write()
        except OSError as e:
            if self._failing.get(what) != (e.errno, e.strerror):
                self._failing[what] = (e.errno, e.strerror)
                log(f"{what} {path} not written: {e.strerror}; enforcement continues, "
                    "retried every tick")
            return False
        if self._failing.pop(what, None) is not None:
            log(f"{what} {path} written again")
        return True

    def _enforce_rates(self, now: float) -> None:
        """The throttle in force per slot: the lowest of the rules' and the hand-set one
        (written by the instance under its lock, hand-set ones read there). Every throttle
        is written through the instance (the daemon's or by hand), so after the first tick
        only the slots with one in force need a look, not a million."""
        want = {self._slot_of[sid]: rate for sid, rate in self.acct.throttles(now).items()
                if sid in self._slot_of}
        if self._throttled is None:   # the first tick: whatever is in force, from anyone
            held = self.inst.throttle_rates().any(axis=1) & (self._owners != 0)
            self._throttled = set(np.flatnonzero(held).tolist())
        expired, self._throttled, by_hand = self.inst.enforce_rates(now, want, self._throttled)
        self.census.throttled = {"rule": len(want), "hand": by_hand}
        for slot in expired:
            log(f"throttle set by hand on slot {slot} expired")

    def _congestion(self, now: float) -> None:
        if self.inst.control_params()["congestion"] != C["XZ_CONGESTION_AUTO"]:
            return
        from xdpzoot.dataplane import netlink

        on = self.congestion.feed(now, netlink.link_bytes(list(self.cfg.interfaces.core)))
        if self.inst.congestion_auto(on):
            log(f"congestion mode {'on' if on else 'off'} (auto)")
            self.unaudited.append(accounting.Action(now, 0, "congestion", "congestion",
                                                    None, {"on": on}))
            self.stats.decisions[("congestion", "on" if on else "off")] += 1

    # -- the fast path's interfaces ---------------------------------------------------------
    def _watch_links(self) -> None:
        """The fast path's egress interfaces and the MAC address each one's frames are
        addressed to, as the links are now (loader.set_egress, as at attach): an address
        changed by hand or by a bond since the attach sent every frame that came in by the
        interface through the kernel (``other_host``), unnoticed; an interface gone left
        the devmap. With them the VRRP virtual MACs of [interfaces] vmacs, which keepalived
        may make, bring up and down at any time, and each one's rp_filter. Asked by name
        each tick; written when it differs from the last."""
        names = list(self.cfg.interfaces.access) + list(self.cfg.interfaces.core)
        if not names:
            return
        from xdpzoot.dataplane import loader, netlink

        vmacs = list(self.cfg.interfaces.vmacs)
        found = netlink.link_table(names + vmacs)
        links = {n: found.get(n) for n in names + vmacs}
        if links == self._links:
            return
        changed = [f"{n} {'gone' if links[n] is None else 'changed'}" for n in links
                   if self._links is not None and links[n] != self._links.get(n)]
        with self.inst.locked():
            loader.set_egress(self.inst.maps, names, vmacs)
        self._links = links
        if changed:
            log(f"fast path: {', '.join(changed)} (ifindex, MAC address, state or rp_filter): "
                "its egress and addresses written again")

    # -- source files -----------------------------------------------------------------------
    def _sources(self) -> list[str]:
        s = self.cfg.sources
        return [p for p in (s.subscribers, s.csam) if p]

    def _stamp(self, path: str) -> tuple[int, int]:
        try:
            st = os.stat(path)
            return st.st_mtime_ns, st.st_size
        except OSError:
            return (0, 0)

    def _watch_init(self) -> None:
        self.watched = {p: self._stamp(p) for p in self._sources()}

    def _watch_sources(self) -> None:
        limit = self.cfg.limits.source_bytes
        for path in self._sources():
            stamp = self._stamp(path)
            if self.watched.get(path) == stamp:
                continue
            self.watched[path] = stamp
            source = "subscribers" if path == self.cfg.sources.subscribers else "csam"
            try:
                with self.inst.locked():
                    if path == self.cfg.sources.subscribers:
                        _, hosts, prefixes, users = tables.read_subscribers(path, False, limit)
                        # never forced: a file cut short keeps the maps as they are
                        c = self.inst.load_subscribers(hosts, prefixes,
                                                       max_shrink=self.cfg.sources.max_shrink,
                                                       path=path, contracts=users)
                        # Gone from the file: the contract ended (not merely maps still
                        # empty at start-up, when the windows of a snapshot must stay).
                        left = self.acct.subscribers() - set(self.inst.owners().values())
                        for sid in left:
                            self.acct.forget(sid)
                        self.plans = read_plans(path, limit)
                        self.plans_changed = True
                        log(f"{path}: {c.added} added, {c.changed} changed, "
                            f"{c.removed} removed")
                    else:
                        data, _ = csam.read_list(path, False, limit)
                        r = self.inst.load_csam(data, path, max_shrink=self.cfg.csam.max_shrink)
                        log(f"CSAM list reloaded: generation {r['generation']}")
                self.stats.syncs[source] += 1
            except (SourceError, kernel.KernelError, OSError) as e:
                log(f"not applied: {e}")   # the maps keep what they had
                self.stats.sync_failures[source] += 1

    # -- loop -------------------------------------------------------------------------------
    def run(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Tick until SIGTERM; a tick that fails is logged and the next one tries again."""
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_wanted", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stop_wanted", True))
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "reload_wanted", True))
        self._serve_metrics()
        log(f"running: {self.pin_dir}, tick {self.cfg.bandwidth.tick_seconds} s, "
            + (f"metrics on http://{self.cfg.metrics.listen}/metrics" if self.server
               else "no metrics endpoint"))
        while not self.stop_wanted:
            if self.reload_wanted:
                self.reload_wanted = False
                try:
                    self.reload()
                except (SourceError, OSError, kernel.KernelError) as e:
                    log(f"reload failed, keeping the old config: {e}")
            try:
                self.tick()
            except (kernel.KernelError, OSError) as e:
                log(f"tick failed: {e}")
            deadline = self.clock() + self.cfg.bandwidth.tick_seconds
            while not self.stop_wanted and not self.reload_wanted and self.clock() < deadline:
                sleep(min(0.5, max(0.0, deadline - self.clock())))
        self._persist(self.clock(), snapshot=True)
        if self.radius is not None:
            self.radius.stop()
        if self.server is not None:
            self.server.close()
        log("stopped; the data plane keeps enforcing")
