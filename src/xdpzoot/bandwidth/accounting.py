"""Volume-based bandwidth control: byte windows, thresholds, and the actions they lead to.

An ISP may throttle, notify or suspend a contract whose transferred volume in a period exceeds
a disclosed threshold (``/work/shared/domain.md`` section 3). The policy is data: a TOML list
of rules (:func:`parse_rules`, example in ``maps/bandwidth.toml``). The data plane keeps
monotonic per-subscriber byte counters; a daemon calls :meth:`Accounting.observe` on a tick
with the current counters and gets back :class:`Action` records to apply to the kernel maps and
to append to the :class:`AuditLog`.

Everything here is plain Python: no kernel access and no clock. Every function that needs the
time takes ``now`` (unix seconds, float); calendar windows are cut in a time zone given to the
engine (default: the local zone). Only aggregate byte counts per subscriber are kept, never
flows or destinations (secrecy of communications, domain.md section 6).

How traffic is counted
    The bytes a counter grew by since the previous tick are attributed to the tick's ``now``:
    to the calendar window containing ``now`` and to the rolling bucket containing ``now``.
    A counter that went down was reset (data plane reloaded): its new value is the delta. The
    first counter value seen for a subscriber is a baseline, not traffic, because nothing says
    when those bytes were sent (restore a snapshot across daemon restarts to keep continuity).

Thresholds
    A window is *over* when its bytes are strictly greater than the threshold ("over 1 TB"),
    and *below* otherwise. A calendar rule fires at most once per window; a rolling rule fires
    once per crossing (below to over) and can fire again only after the sum went below.

Rolling windows
    Per subscriber, a ring of at most 48 buckets of width ``window / 48`` (30 min for 24 h).
    The rolling sum at ``now`` is the sum of the buckets that *start* after ``now - window``,
    so it covers between ``window - width`` and ``window`` of the most recent traffic: it never
    reports an excess that the exact sliding sum does not have, and it falls below the
    threshold at most one bucket width earlier than the exact sum would.

Enforcements (throttle, suspend)
    Every firing of a throttle or suspend rule is one enforcement with its own start and
    planned end, decided at the crossing. One that starts later ("next-window:N") is only
    *scheduled*: no action is returned at the decision (see :meth:`Accounting.scheduled` and
    :meth:`Accounting.usage`); its "throttle"/"suspend" action comes from the first tick at or
    after its start, dated at the start, and its "release"/"unsuspend" likewise at its end.
    Enforcements overlap freely, also of the same rule: a January and a February excess of the
    monthly rule give a March and an April throttle; at 1 April the new one starts before the
    old one ends, so the rate never lapses. "N windows" from a window start ends N calendar
    windows later; from mid-window (start "now") it lasts the calendar length of the window it
    starts in (and the next N-1). Early release ends an enforcement at the end of the first
    whole window inside it whose bytes were not over the threshold (rolling: at the first tick
    at least one window length after its start with the rolling sum not over).

Which subscribers a tick visits
    Only those whose counters are given (they moved), those with an enforcement (decided or in
    force) or a rolling rule fired, and those whose plan changed; every subscriber on the first
    tick of an engine (new or restored: the rules may have changed). For the others nothing can
    happen: a calendar window with no new bytes cannot cross a threshold, and a rolling sum
    that only shrinks matters only to a fired rule (watched) or an enforcement (watched). Their
    window moves (a calendar window closing, rolling buckets falling out) are made when they
    are next visited, with the same result; a new subscriber's meters start at its first bytes.
    The decisions are those of visiting everyone on every tick (tests/test_accounting.py
    compares both).

Actions
    :meth:`Accounting.observe` returns actions sorted by time; a time can be earlier than the
    tick's ``now`` (a start, an end or a window boundary that fell between two ticks), never
    earlier than the previous tick. ``rate_kbps`` of "throttle" and "release" is the rate in
    force after the action (the lowest of the subscriber's throttles, None = none): write it.
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, NamedTuple

import msgpack

from xdpzoot.bandwidth.rules import (
    _DIRECTION_CODE,
    BUCKETS,
    ROLLING,
    Rule,
    _window_index,
    _window_label,
    _window_start,
    local_zone,
)

# --- engine ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Action:
    """Something the daemon must do, and write to the audit log.

    ``action`` is "throttle", "release", "notify", "suspend" or "unsuspend". For "throttle"
    and "release", ``rate_kbps`` is the rate that must be in force for the subscriber *after*
    this action (the lowest of its throttles in force), ``None`` = no throttle: the daemon
    writes it as is. The rule's own rate is in ``values["rule_rate_kbps"]``. For "suspend" and
    "unsuspend", ``values["suspended"]`` tells whether the subscriber stays suspended after
    it (another rule may still suspend it). ``time`` is when it takes effect; it may be
    earlier than the ``now`` of the tick that returned it (a boundary between two ticks).
    """

    time: float
    subscriber: int
    rule: str
    action: str
    rate_kbps: int | None
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Enforcement:
    """A throttle or suspension decided by a rule, scheduled or in force."""

    subscriber: int
    rule: str
    action: str  # "throttle" | "suspend"
    rate_kbps: int | None  # the rule's rate (throttle)
    since: float
    until: float | None  # planned end; None = until the rolling sum is below the threshold
    decided: float  # the tick at which the threshold was found exceeded
    window: str  # the window whose excess decided it
    bytes: int  # bytes in that window at the decision
    threshold: int
    early_release: bool


class _Enf:
    """The engine's mutable record of an enforcement."""

    # The snapshot row, in order; "ending" is transient (not saved).
    FIELDS = ("id", "sub", "rule", "action", "rate", "since", "until", "decided", "window",
              "bytes", "threshold", "early", "started")
    __slots__ = (*FIELDS, "ending")

    def __init__(self, *fields: Any) -> None:
        for name, value in zip(self.FIELDS, fields, strict=True):
            setattr(self, name, value)
        self.ending = False  # an end transition is queued in the current tick

    def row(self) -> list[Any]:
        """The snapshot form."""
        return [getattr(self, name) for name in self.FIELDS]

    def public(self) -> Enforcement:
        """The read-only view handed to callers."""
        return Enforcement(
            self.sub,
            self.rule,
            self.action,
            self.rate,
            self.since,
            self.until,
            self.decided,
            self.window,
            self.bytes,
            self.threshold,
            self.early,
        )

    def in_force(self, now: float) -> bool:
        """Whether it applies at ``now`` by its times."""
        return self.since <= now and (self.until is None or now < self.until)


class _Sub:
    """Per-subscriber state: last counters, plan, window meters, fired rules, enforcements."""

    __slots__ = ("up", "down", "plan", "rules", "mlist", "meters", "fired", "enf", "packed")

    def __init__(self) -> None:
        self.up: int | None = None  # None: no counter seen yet (the first one is a baseline)
        self.down = 0
        self.plan: str | None = None
        self.rules: list[_Compiled] | None = None  # rules covering it; None = recompute
        # The meters it keeps (its rules' and its enforcements' rules'): (index, kind, direction)
        self.mlist: list[tuple[int, str, int]] = []
        # meter index -> calendar [window index, bytes] | rolling [deque of [bucket, bytes], sum]
        self.meters: dict[int, list[Any]] = {}
        self.fired: dict[str, int] = {}  # rule -> calendar window index fired, or 1 = over
        self.enf: list[_Enf] = []
        self.packed: bytes | None = None  # its snapshot record; None: changed since packed


class _Compiled(NamedTuple):
    """A rule with the index of the meter that counts for it (a tuple: unpacked per tick)."""

    name: str
    meter: int
    rolling: bool
    threshold: int
    rule: Rule


_START, _END, _NOTIFY = 1, 2, 0  # ordering of simultaneous events: no gap between throttles
SNAPSHOT_MAGIC = "xdpzoot-accounting"
SNAPSHOT_VERSION = 1


class SnapshotError(Exception):
    """A snapshot cannot be used: corrupt, truncated, empty or of another version."""


class Accounting:
    """The volume accounting engine: feed it counters on a tick, apply the actions it returns.

    Not thread-safe: one daemon thread owns it. ``tz`` cuts calendar windows (default: the
    local zone, see :func:`local_zone`).
    """

    def __init__(self, rules: list[Rule], tz: tzinfo | None = None) -> None:
        """Set up meters for the rules; no subscriber is known yet."""
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        self.tz: tzinfo = tz if tz is not None else local_zone()
        self.rules = list(rules)
        self._by_name = {r.name: r for r in rules}
        # One meter per (window, direction): rules counting the same traffic share it.
        self._meter_keys: list[tuple[str, int, str]] = []
        self._compiled: list[_Compiled] = []
        for r in rules:
            key = (r.window.kind, r.window.seconds, r.direction)
            if key not in self._meter_keys:
                self._meter_keys.append(key)
            mi = self._meter_keys.index(key)
            self._compiled.append(_Compiled(r.name, mi, not r.window.calendar, r.threshold, r))
        self._meter_of = {c.name: c.meter for c in self._compiled}
        self._meter_names = [f"{k}:{s}:{d}" for k, s, d in self._meter_keys]
        self._rolling = {c.name for c in self._compiled if c.rolling}
        self._listed = frozenset().union(*(r.subscribers for r in rules))
        self._by_plan: dict[str | None, tuple[list[_Compiled], list[tuple[int, str, int]]]] = {}
        self._subs: dict[int, _Sub] = {}
        self._heap: list[tuple[float, int, int, _Enf]] = []
        self._seq = 0  # enforcement ids and heap tie-breaks, persisted
        self._now: float | None = None  # the last tick
        self._orphans: list[_Enf] = []  # until-below enforcements whose rule is gone (restore)
        self._cal: dict[str, tuple[int, float, float]] = {}  # kind -> (index, start, end)
        # Visited on every tick: an enforcement, or a rolling rule fired (module doc).
        self._watch: set[int] = set()
        self._all = True  # the next tick visits everyone
        # Grows with every decision and every change the counters cannot redo (a rule
        # fired or re-armed, an enforcement started or ended, a subscriber forgotten): the
        # daemon snapshots when it moved.
        self.decisions = 0

    # --- windows ---

    def _calendar(self, kind: str, now: float) -> tuple[int, float, float]:
        """(index, start, end) of the calendar window of ``kind`` containing ``now``, cached."""
        c = self._cal.get(kind)
        if c is not None and c[1] <= now < c[2]:
            return c
        i = _window_index(kind, now, self.tz)
        c = (i, _window_start(kind, i, self.tz), _window_start(kind, i + 1, self.tz))
        self._cal[kind] = c
        return c

    def _context(self, now: float) -> list[tuple[int, float, float]]:
        """Per meter at ``now``: calendar (index, start, end); rolling (bucket, lowest kept, -)."""
        ctx = []
        for kind, seconds, _ in self._meter_keys:
            if kind == ROLLING:
                width = seconds / BUCKETS
                # A bucket is in the window when it starts after now - window.
                lowest = math.floor((now - seconds) / width) + 1
                ctx.append((math.floor(now / width), lowest, 0.0))
            else:
                ctx.append(self._calendar(kind, now))
        return ctx

    def _label(self, rule: Rule, index: int | None) -> str:
        """The window id of a rule's window (calendar) or its spec (rolling)."""
        if rule.window.kind == ROLLING or index is None:
            return rule.window.spec
        return _window_label(rule.window.kind, index)

    def _iso(self, t: float | None) -> str | None:
        """An instant as ISO-8601 in the engine's zone, for action values."""
        return None if t is None else datetime.fromtimestamp(t, self.tz).isoformat()

    # --- subscribers ---

    def _rules_of(self, sid: int, sub: _Sub) -> list[_Compiled]:
        """The rules covering a subscriber; meters and fired states of other rules are dropped."""
        if not (sub.meters or sub.fired or sub.enf or sid in self._listed):
            # Nothing to drop, and the rules depend on the plan alone: shared per plan.
            cached = self._by_plan.get(sub.plan)
            if cached is None:
                rules = [c for c in self._compiled if c.rule.covers(sid, sub.plan)]
                mlist = [(m, self._meter_keys[m][0], _DIRECTION_CODE[self._meter_keys[m][2]])
                         for m in sorted({c.meter for c in rules})]
                cached = self._by_plan[sub.plan] = (rules, mlist)
            sub.rules, sub.mlist = cached
            return sub.rules
        rules = [c for c in self._compiled if c.rule.covers(sid, sub.plan)]
        keep = {c.meter for c in rules}
        keep.update(self._meter_of[e.rule] for e in sub.enf if e.rule in self._meter_of)
        for m in [m for m in sub.meters if m not in keep]:
            del sub.meters[m]
        names = {c.name for c in rules}
        for name in [n for n in sub.fired if n not in names]:
            del sub.fired[name]
        sub.rules = rules
        sub.mlist = [
            (m, self._meter_keys[m][0], _DIRECTION_CODE[self._meter_keys[m][2]])
            for m in sorted(keep)
        ]
        return rules

    def subscribers(self) -> set[int]:
        """The subscribers the engine keeps state for."""
        return set(self._subs)

    def forget(self, subscriber: int) -> None:
        """Drop everything known about a subscriber (contract ended); no action is returned."""
        sub = self._subs.pop(subscriber, None)
        self._watch.discard(subscriber)
        if sub is not None:
            self.decisions += 1
            for e in sub.enf:
                e.ending = True  # its heap events are skipped

    # --- the tick ---

    def observe(
        self,
        now: float,
        counters: Mapping[int, tuple[int, int]],
        plans: Mapping[int, str] | None = None,
    ) -> list[Action]:
        """Account one tick and return the actions due up to ``now``, in time order.

        ``counters`` maps subscriber id to ``(up_bytes_total, down_bytes_total)`` as read from
        the data plane. Subscribers missing from it sent nothing this tick (their windows still
        move): it need hold only the counters that moved, but a subscriber's first counter is
        its baseline, so give every subscriber's once, when it is new. ``plans`` maps
        subscriber id to plan name; a plan is remembered until changed (give it again only
        when it changed).
        A ``now`` earlier than the previous tick (clock stepped back) is taken as the previous
        tick's time.
        """
        now = float(now)
        if self._now is not None and now < self._now:
            now = self._now
        self._now = now
        ctx = self._context(now)
        subs = self._subs
        visit = self._watch.union(counters)
        if plans:
            for sid, plan in plans.items():
                sub = subs.get(sid)
                if sub is None:
                    sub = subs[sid] = _Sub()
                if sub.plan != plan:
                    sub.plan = plan
                    sub.rules = None
                    visit.add(sid)
        notices: list[Action] = []
        trans: list[tuple[float, int, int, int, _Enf, str, dict[str, Any]]] = []
        for sid in counters:
            if sid not in subs:
                subs[sid] = _Sub()
        if self._all:
            visit, self._all = subs.keys(), False
        for sid in visit:
            sub = subs[sid]
            sub.packed = None
            counter = counters.get(sid)
            du = dd = 0
            if counter is not None:
                up, down = counter
                if sub.up is not None:
                    du = up - sub.up if up >= sub.up else up  # a decrease is a reset
                    dd = down - sub.down if down >= sub.down else down
                sub.up, sub.down = up, down
            rules = sub.rules if sub.rules is not None else self._rules_of(sid, sub)
            # A new subscriber's meters start at its first bytes (nothing to cross before).
            if (rules or sub.enf) and (du or dd or sub.meters or sub.fired or sub.enf):
                self._tick(sid, sub, rules, du, dd, now, ctx, notices, trans)
            self._rewatch(sid, sub)
        for e in self._orphans:
            if not e.ending and e.sub in subs:
                e.ending = True
                trans.append((now, e.sub, _END, e.id, e, "rule-removed", {}))
        self._orphans = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, order, _, e = heapq.heappop(heap)
            if e.ending or e.sub not in subs:
                continue
            if order == _START and not e.started:
                trans.append((t, e.sub, _START, e.id, e, "", {}))
            elif order == _END and e.until == t:
                e.ending = True
                trans.append((t, e.sub, _END, e.id, e, "end", {}))
        actions = self._replay(notices, trans)
        for tr in trans:
            self._rewatch(tr[1], subs[tr[1]])
        return actions

    def _rewatch(self, sid: int, sub: _Sub) -> None:
        """Visit the subscriber on every tick while it has an enforcement or a rolling rule
        fired (module doc)."""
        if sub.enf or (sub.fired and not self._rolling.isdisjoint(sub.fired)):
            self._watch.add(sid)
        else:
            self._watch.discard(sid)

    def _tick(
        self,
        sid: int,
        sub: _Sub,
        rules: list[_Compiled],
        du: int,
        dd: int,
        now: float,
        ctx: list[tuple[int, float, float]],
        notices: list[Action],
        trans: list[Any],
    ) -> None:
        """One subscriber's tick: move its meters, fire rules, find early ends."""
        meters = sub.meters
        closed: list[tuple[int, int, float, float, int]] | None = None  # meter, index, span, bytes
        for mi, kind, direction in sub.mlist:
            delta = du if direction == 0 else dd if direction == 1 else du + dd
            st = meters.get(mi)
            a, b, c = ctx[mi]
            if kind == ROLLING:
                if st is None:
                    st = meters[mi] = [deque(), 0]
                ring = st[0]
                while ring and ring[0][0] < b:
                    st[1] -= ring.popleft()[1]
                if delta:
                    if ring and ring[-1][0] == a:
                        ring[-1][1] += delta
                    else:
                        ring.append([a, delta])
                    st[1] += delta
            elif st is None:
                meters[mi] = [a, delta]
            elif st[0] != a:
                if sub.enf:
                    i = st[0]
                    ws = _window_start(kind, i, self.tz)
                    closed = closed or []
                    closed.append((mi, i, ws, _window_start(kind, i + 1, self.tz), st[1]))
                st[0] = a
                st[1] = delta
            else:
                st[1] += delta
        fired = sub.fired
        for name, mi, rolling, threshold, rule in rules:
            st = meters[mi]
            used = st[1]
            if rolling:
                if used > threshold:
                    if name not in fired:
                        fired[name] = 1
                        self._fire(sid, sub, rule, None, used, now, notices, trans)
                elif name in fired:
                    del fired[name]
                    self.decisions += 1
            elif used > threshold and fired.get(name) != st[0]:
                fired[name] = st[0]
                self._fire(sid, sub, rule, st[0], used, now, notices, trans)
        if sub.enf:
            self._early(sid, sub, now, closed or [], trans)

    def _early(
        self,
        sid: int,
        sub: _Sub,
        now: float,
        closed: list[tuple[int, int, float, float, int]],
        trans: list[Any],
    ) -> None:
        """Queue the ends that do not wait for the planned end: until-below, early release."""
        for e in sub.enf:
            if e.ending:
                continue
            rule = self._by_name.get(e.rule)
            if rule is None:
                continue
            mi = self._meter_of[e.rule]
            st = sub.meters.get(mi)
            if st is None:
                continue
            if rule.window.kind == ROLLING:
                below = st[1] <= rule.threshold
                if e.until is None:
                    if below and e.since <= now:
                        e.ending = True
                        values = {"bytes": st[1]}
                        trans.append((now, sid, _END, e.id, e, "below-threshold", values))
                elif e.early and below and now - rule.window.seconds >= e.since and now < e.until:
                    e.ending = True
                    trans.append((now, sid, _END, e.id, e, "early-release", {"bytes": st[1]}))
            elif e.early:
                for m, index, ws, we, used in closed:
                    # A whole window inside the enforcement, below the threshold, ends it.
                    if (
                        m == mi
                        and ws >= e.since
                        and (e.until is None or we < e.until)
                        and used <= rule.threshold
                    ):
                        e.ending = True
                        values = {
                            "bytes": used,
                            "below_window": _window_label(rule.window.kind, index),
                        }
                        trans.append((we, sid, _END, e.id, e, "early-release", values))
                        break

    def _fire(
        self,
        sid: int,
        sub: _Sub,
        rule: Rule,
        index: int | None,
        used: int,
        now: float,
        notices: list[Action],
        trans: list[Any],
    ) -> None:
        """A rule's threshold was crossed: a notice now, or a throttle/suspension scheduled."""
        label = self._label(rule, index)
        self.decisions += 1
        if rule.action == "notify":
            values = {"window": label, "bytes": used, "threshold": rule.threshold}
            notices.append(Action(now, sid, rule.name, "notify", None, values))
            return
        kind = rule.window.kind
        if rule.start_windows and index is not None:
            first = index + rule.start_windows
            since = _window_start(kind, first, self.tz)
        else:
            since = now
            first = index
        if rule.until_below:
            until = None
        elif rule.duration_windows is not None:
            n = rule.duration_windows
            if kind == ROLLING or first is None:
                until = since + n * rule.window.seconds
            else:
                # N calendar windows counted from the one it starts in (its calendar lengths).
                span = _window_start(kind, first + n, self.tz) - _window_start(kind, first, self.tz)
                until = since + span
        else:
            until = since + (rule.duration_s or 0)
        self._seq += 1
        e = _Enf(
            self._seq,
            sid,
            rule.name,
            rule.action,
            rule.rate_kbps,
            since,
            until,
            now,
            label,
            used,
            rule.threshold,
            rule.early_release,
            False,
        )
        sub.enf.append(e)  # its meter is among the subscriber's: the rule covers it
        self._push(e)

    def _push(self, e: _Enf) -> None:
        """Schedule an enforcement's start (unless started) and planned end."""
        if not e.started:
            heapq.heappush(self._heap, (e.since, _START, e.id * 2, e))
        if e.until is not None:
            heapq.heappush(self._heap, (e.until, _END, e.id * 2 + 1, e))

    def _replay(self, notices: list[Action], trans: list[Any]) -> list[Action]:
        """Apply queued starts and ends in time order and describe each as an Action."""
        trans.sort(key=lambda x: (x[0], x[1], x[2], x[3]))
        self.decisions += len(trans)
        out: list[tuple[tuple[float, int, int, int], Action]] = [
            ((a.time, a.subscriber, _NOTIFY, i), a) for i, a in enumerate(notices)
        ]
        for t, sid, order, eid, e, reason, extra in trans:
            sub = self._subs[sid]
            values: dict[str, Any] = {"window": e.window, "threshold": e.threshold}
            if order == _START:
                e.started = True
                name = e.action
                values.update(
                    bytes=e.bytes,
                    decided=self._iso(e.decided),
                    since=self._iso(e.since),
                    until=self._iso(e.until),
                )
            else:
                sub.enf.remove(e)
                name = "release" if e.action == "throttle" else "unsuspend"
                values.update(reason=reason, since=self._iso(e.since))
                values.update(extra)
            if e.action == "throttle":
                values["rule_rate_kbps"] = e.rate
                rates = [x.rate for x in sub.enf if x.started and x.action == "throttle"]
                rate = min(rates) if rates else None
            else:
                values["suspended"] = any(x.started and x.action == "suspend" for x in sub.enf)
                rate = None
            out.append(((t, sid, order, eid), Action(t, sid, e.rule, name, rate, values)))
        out.sort(key=lambda x: x[0])
        return [a for _, a in out]

    # --- queries ---

    def active(self, now: float) -> dict[int, list[Enforcement]]:
        """Throttles and suspensions in force at ``now`` per subscriber (rule, since, until)."""
        result: dict[int, list[Enforcement]] = {}
        for sid, sub in self._subs.items():
            live = [e.public() for e in sub.enf if e.in_force(now)]
            if live:
                result[sid] = live
        return result

    def scheduled(self, now: float) -> dict[int, list[Enforcement]]:
        """Throttles and suspensions decided but starting after ``now`` per subscriber."""
        result: dict[int, list[Enforcement]] = {}
        for sid, sub in self._subs.items():
            later = [e.public() for e in sub.enf if e.since > now]
            if later:
                result[sid] = later
        return result

    def throttles(self, now: float) -> dict[int, int]:
        """Subscriber -> the rate in force at ``now``, for every throttled subscriber."""
        rates = {}
        for sid in self._watch:   # every subscriber with an enforcement
            rate = self.throttle_rate(sid, now)
            if rate:
                rates[sid] = rate
        return rates

    def throttle_rate(self, subscriber: int, now: float) -> int | None:
        """The rate in force for a subscriber at ``now`` (the lowest), None if unthrottled."""
        sub = self._subs.get(subscriber)
        if sub is None:
            return None
        rates = [e.rate for e in sub.enf if e.action == "throttle" and e.in_force(now)]
        return min(rates) if rates else None

    def is_suspended(self, subscriber: int, now: float) -> bool:
        """Whether any rule suspends the subscriber at ``now``."""
        sub = self._subs.get(subscriber)
        return sub is not None and any(e.action == "suspend" and e.in_force(now) for e in sub.enf)

    def usage(self, subscriber: int, now: float) -> list[dict[str, Any]]:
        """Per rule covering the subscriber: window id, bytes, threshold, percent and state.

        ``state`` is "throttled" / "suspended" (an enforcement of the rule is in force),
        "scheduled" (one starts later), "over" (the window is over the threshold) or "ok".
        Bytes are as of the last tick; a calendar window that has not been ticked yet is 0.
        """
        sub = self._subs.get(subscriber)
        if sub is None:
            sub = _Sub()
        rules = [c for c in self._compiled if c.rule.covers(subscriber, sub.plan)]
        out = []
        for comp in rules:
            rule = comp.rule
            st = sub.meters.get(comp.meter)
            if rule.window.kind == ROLLING:
                label = rule.window.spec
                used = 0
                if st is not None:
                    width = rule.window.bucket
                    lowest = math.floor((now - rule.window.seconds) / width) + 1
                    used = sum(n for b, n in st[0] if lowest <= b and b * width <= now)
            else:
                index, _, _ = self._calendar(rule.window.kind, now)
                label = _window_label(rule.window.kind, index)
                used = st[1] if st is not None and st[0] == index else 0
            mine = [e for e in sub.enf if e.rule == rule.name]
            if any(e.in_force(now) for e in mine):
                state = "throttled" if rule.action == "throttle" else "suspended"
            elif any(e.since > now for e in mine):
                state = "scheduled"
            else:
                state = "over" if used > rule.threshold else "ok"
            out.append(
                {
                    "rule": rule.name,
                    "action": rule.action,
                    "direction": rule.direction,
                    "window": label,
                    "bytes": used,
                    "threshold": rule.threshold,
                    "percent": round(100.0 * used / rule.threshold, 2),
                    "state": state,
                }
            )
        return out

    # --- persistence ---

    def snapshot(self) -> bytes:
        """The whole state as versioned, checksummed msgpack (see :meth:`restore`).

        Each subscriber's record is packed once and kept until a tick visits it again: a
        snapshot packs only the records that changed and joins the others (the bytes are
        those of packing the whole document at once)."""
        keys = self._meter_names
        packer = msgpack.Packer(use_bin_type=True)
        records, enf = [], []
        for sid, sub in self._subs.items():
            if sub.packed is None:
                meters: dict[str, Any] = {}
                for mi, st in sub.meters.items():
                    if keys[mi].startswith(ROLLING):
                        meters[keys[mi]] = [[b, n] for b, n in st[0]]
                    else:
                        meters[keys[mi]] = [st[0], st[1]]
                sub.packed = packer.pack([sid, sub.up, sub.down, sub.plan, meters,
                                          dict(sub.fired)])
            records.append(sub.packed)
            if sub.enf:
                enf.extend(e.row() for e in sub.enf)
        head = {"now": self._now, "seq": self._seq, "tz": str(self.tz)}
        payload = b"".join([
            packer.pack_map_header(len(head) + 2),
            *(packer.pack(k) + packer.pack(v) for k, v in head.items()),
            packer.pack("subs"), packer.pack_array_header(len(records)), *records,
            packer.pack("enf"), packer.pack(enf),
        ])
        return msgpack.packb(
            [SNAPSHOT_MAGIC, SNAPSHOT_VERSION, zlib.crc32(payload), payload], use_bin_type=True
        )

    @classmethod
    def restore(cls, data: bytes, rules: list[Rule], tz: tzinfo | None = None) -> Accounting:
        """An engine continuing from :meth:`snapshot` output, with (possibly changed) rules.

        State of meters and rules that no longer exist is dropped. Decided enforcements keep
        their times even if their rule changed or is gone; an until-below one whose rule is
        gone is released at the next tick (reason "rule-removed"). Raises SnapshotError, and
        nothing else, when the data is empty, truncated, corrupt or of another version.
        """
        if not data:
            raise SnapshotError("snapshot is empty")
        try:
            outer = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise SnapshotError(f"snapshot is truncated or not a snapshot: {e}") from e
        if not (isinstance(outer, list) and len(outer) == 4 and outer[0] == SNAPSHOT_MAGIC):
            raise SnapshotError("not an xdpzoot accounting snapshot (bad header)")
        _, version, crc, payload = outer
        if version != SNAPSHOT_VERSION:
            raise SnapshotError(
                f"snapshot version {version!r} is not supported (this code reads "
                f"version {SNAPSHOT_VERSION})"
            )
        if not isinstance(payload, bytes) or zlib.crc32(payload) != crc:
            raise SnapshotError("snapshot is corrupt (checksum mismatch)")
        engine = cls(rules, tz)  # bad rules are the caller's error (ValueError), not the data's
        try:
            engine._load(msgpack.unpackb(payload, raw=False))
            return engine
        except SnapshotError:
            raise
        except Exception as e:
            raise SnapshotError(f"snapshot content is invalid: {type(e).__name__}: {e}") from e

    def _load(self, doc: Any) -> None:
        """Fill a fresh engine from the decoded payload; any inconsistency raises."""
        if not isinstance(doc, dict):
            raise SnapshotError("snapshot content is invalid: payload is not a map")
        now = doc["now"]
        self._now = None if now is None else float(now)
        self._seq = int(doc["seq"])
        index = {f"{k}:{s}:{d}": i for i, (k, s, d) in enumerate(self._meter_keys)}
        for sid, up, down, plan, meters, fired in doc["subs"]:
            sub = self._subs[int(sid)] = _Sub()
            sub.up = None if up is None else int(up)
            sub.down = int(down)
            sub.plan = None if plan is None else str(plan)
            for key, st in meters.items():
                mi = index.get(key)
                if mi is None:
                    continue
                if key.startswith(ROLLING):
                    ring = deque([int(b), int(n)] for b, n in st)
                    sub.meters[mi] = [ring, sum(n for _, n in ring)]
                else:
                    sub.meters[mi] = [int(st[0]), int(st[1])]
            sub.fired = {str(k): int(v) for k, v in fired.items() if k in self._by_name}
        for row in doc["enf"]:
            if len(row) != 13:
                raise SnapshotError("snapshot content is invalid: bad enforcement record")
            e = _Enf(*row)
            if not isinstance(e.rule, str) or e.action not in ("throttle", "suspend"):
                raise SnapshotError("snapshot content is invalid: bad enforcement record")
            e.since, e.decided = float(e.since), float(e.decided)
            e.until = None if e.until is None else float(e.until)
            e.started = bool(e.started)
            sub = self._subs.get(e.sub)
            if sub is None:
                raise SnapshotError(
                    "snapshot content is invalid: enforcement of unknown subscriber"
                )
            sub.enf.append(e)
            self._watch.add(e.sub)
            self._push(e)
            rule = self._by_name.get(e.rule)
            if e.until is None and (rule is None or rule.window.kind != ROLLING):
                self._orphans.append(e)
