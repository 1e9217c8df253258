"""Volume accounting: rules as data, calendar and rolling windows, actions, restarts, audit log.

Time is always injected: every tick passes ``now`` (unix seconds) and the calendar is cut in
Asia/Tokyo, so the tests do not depend on the machine's clock or zone.
"""

from __future__ import annotations

import json
import os
import random
import stat
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdpzoot.bandwidth import rules
from xdpzoot.bandwidth.accounting import Accounting, Action, SnapshotError
from xdpzoot.bandwidth.rules import Rule, Window, load_rules, parse_rules
from xdpzoot.bandwidth.store import AuditLog, load_snapshot, save_snapshot
from xdpzoot.sources.files import SourceError

TZ = ZoneInfo("Asia/Tokyo")
MAPS = Path(__file__).resolve().parents[1] / "maps"
TB = 1000**4
GB = 1000**3
HOUR = 3600.0
DAY = 86400.0


def ts(*args: int, tz: Any = TZ) -> float:
    """A local time in Tokyo (or ``tz``) as unix seconds."""
    return datetime(*args, tzinfo=tz).timestamp()


def local(t: float) -> datetime:
    """Unix seconds as a Tokyo datetime, for readable assertions."""
    return datetime.fromtimestamp(t, TZ)


def rules_of(text: str) -> list[Rule]:
    """Rules from TOML text (the test fails if it does not parse)."""
    return parse_rules(text, "test.toml")


def problems_of(text: str) -> list[str]:
    """The problem messages a rules text produces (the test fails if it parses)."""
    with pytest.raises(SourceError) as info:
        parse_rules(text, "x.toml")
    assert info.value.path == "x.toml"
    assert all(line is None for line, _ in info.value.problems)
    return [msg for _, msg in info.value.problems]


def brief(actions: list[Action]) -> list[tuple[str, str, str, int | None]]:
    """Actions as (local time, rule, action, rate), the shape most assertions compare."""
    return [(local(a.time).isoformat(), a.rule, a.action, a.rate_kbps) for a in actions]


MONTHLY = """
[[rule]]
name = "monthly-1tb"
direction = "down"
window = "calendar-month"
threshold = "1TB"
action = "throttle"
rate = "1Mbit"
start = "next-window:2"
duration = "1 window"
early_release = false
"""

UPLOAD = """
[[rule]]
name = "upload-30gb-24h"
direction = "up"
window = "rolling:24h"
threshold = "30GB"
action = "throttle"
rate = "2Mbit"
duration = "until-below"
"""


class Driver:
    """Feeds one engine ticks with counters built from per-tick deltas; collects actions."""

    def __init__(self, engine: Accounting) -> None:
        self.engine = engine
        self.totals: dict[int, list[int]] = {}
        self.actions: list[Action] = []

    def tick(self, now: float, deltas: dict[int, tuple[int, int]] | None = None) -> list[Action]:
        """Add ``deltas`` (up, down) to the counters and observe at ``now``."""
        for sid, (up, down) in (deltas or {}).items():
            total = self.totals.setdefault(sid, [0, 0])
            total[0] += up
            total[1] += down
        got = self.engine.observe(now, {sid: (u, d) for sid, (u, d) in self.totals.items()})
        self.actions.extend(got)
        return got

    def days(self, start: float, end: float, step: float = DAY) -> None:
        """Tick with no traffic from ``start`` to ``end`` (inclusive) every ``step``."""
        t = start
        while t <= end:
            self.tick(t)
            t += step


# --- parsing ----------------------------------------------------------------------------------


def test_example_file_parses() -> None:
    rules = load_rules(str(MAPS / "bandwidth.toml"))
    by_name = {r.name: r for r in rules}
    assert by_name["monthly-1tb"] == Rule(
        name="monthly-1tb",
        direction="down",
        window=Window("calendar-month", 0, "calendar-month"),
        threshold=TB,
        action="throttle",
        rate_kbps=1000,
        start_windows=2,
        duration_windows=1,
        early_release=False,
    )
    upload = by_name["upload-30gb-24h"]
    assert (upload.direction, upload.window.kind, upload.window.seconds) == ("up", "rolling", 86400)
    assert (upload.threshold, upload.until_below, upload.start_windows) == (30 * GB, True, 0)
    assert upload.window.bucket == 1800
    notices = [r for r in rules if r.action == "notify"]
    assert notices and notices[0].until_below is False


@pytest.mark.parametrize(
    "text, value",
    [
        ("1TB", TB),
        ("1TiB", 1024**4),
        ("1.5GB", 1_500_000_000),
        ("512 MiB", 512 * 1024**2),
        ("30GB", 30 * GB),
        ("1B", 1),
        ("2KB", 2000),
        ("0.5KiB", 512),
    ],
)
def test_threshold_units(text: str, value: int) -> None:
    rule = rules_of(MONTHLY.replace('"1TB"', f'"{text}"'))[0]
    assert rule.threshold == value


def test_threshold_bare_integer_is_bytes() -> None:
    assert rules_of(MONTHLY.replace('"1TB"', "123456"))[0].threshold == 123456


@pytest.mark.parametrize(
    "text, kbps",
    [("1Mbit", 1000), ("1.5Mbit", 1500), ("64kbit", 64), ("1Gbit", 1_000_000), ("10 Mbit", 10000)],
)
def test_rate_units(text: str, kbps: int) -> None:
    assert rules_of(MONTHLY.replace('"1Mbit"', f'"{text}"'))[0].rate_kbps == kbps


@pytest.mark.parametrize(
    "duration, fields",
    [
        ('"30d"', (30 * 86400, None, False)),
        ('"12h"', (12 * 3600, None, False)),
        ('"1d12h"', (36 * 3600, None, False)),
        ('"1w"', (7 * 86400, None, False)),
        ('"1 window"', (None, 1, False)),
        ('"3 windows"', (None, 3, False)),
    ],
)
def test_durations(duration: str, fields: tuple[Any, ...]) -> None:
    rule = rules_of(MONTHLY.replace('"1 window"', duration))[0]
    assert (rule.duration_s, rule.duration_windows, rule.until_below) == fields


def replace(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced (which must be present)."""
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize(
    "text, problem",
    [
        pytest.param(
            replace(MONTHLY, '"1TB"', '"1XB"'), "rules[0].threshold: must be bytes", id="unit"
        ),
        pytest.param(
            replace(MONTHLY, '"1TB"', '"0TB"'), "rules[0].threshold: must be positive", id="zero"
        ),
        pytest.param(
            replace(MONTHLY, '"1TB"', '"0.5B"'),
            "rules[0].threshold: '0.5B' is not a whole",
            id="frac",
        ),
        pytest.param(
            replace(MONTHLY, '"1TB"', '"1tb"'), "rules[0].threshold: must be bytes", id="case"
        ),
        pytest.param(
            replace(MONTHLY, '"down"', '"in"'),
            "rules[0].direction: must be one of up, down, both",
            id="dir",
        ),
        pytest.param(
            replace(MONTHLY, '"calendar-month"', '"month"'), "rules[0].window: must be", id="window"
        ),
        pytest.param(
            replace(MONTHLY, '"calendar-month"', '"rolling:10s"'),
            "rules[0].window: a rolling window must be between",
            id="short",
        ),
        pytest.param(
            replace(MONTHLY, '"throttle"', '"drop"'),
            "rules[0].action: must be one of notify",
            id="action",
        ),
        pytest.param(
            replace(MONTHLY, '"1Mbit"', '"1MB"'), "rules[0].rate: must be kbit/s", id="rate-unit"
        ),
        pytest.param(
            replace(MONTHLY, 'rate = "1Mbit"\n', ""), "rules[0].rate: missing", id="rate-missing"
        ),
        pytest.param(
            replace(MONTHLY, '"next-window:2"', '"later"'),
            "rules[0].start: must be 'now' or 'next-window:N'",
            id="start",
        ),
        pytest.param(
            replace(MONTHLY, '"next-window:2"', '"next-window:0"'),
            "rules[0].start: N in next-window:N",
            id="start0",
        ),
        pytest.param(
            replace(MONTHLY, '"1 window"', '"forever"'),
            "rules[0].duration: must be a duration",
            id="duration",
        ),
        pytest.param(
            replace(MONTHLY, '"1 window"', '"until-below"'),
            "rules[0].duration: 'until-below' needs a rolling window",
            id="until-cal",
        ),
        pytest.param(
            replace(MONTHLY, 'duration = "1 window"\n', ""),
            "rules[0].duration: missing",
            id="duration-missing",
        ),
        pytest.param(
            replace(MONTHLY, "early_release = false", 'early_release = "no"'),
            "rules[0].early_release: must be true or false",
            id="early",
        ),
        pytest.param(
            replace(MONTHLY, 'name = "monthly-1tb"', 'name = "a b"'),
            "rules[0].name: must be 1-64 of",
            id="name",
        ),
        pytest.param(
            replace(MONTHLY, 'name = "monthly-1tb"\n', ""),
            "rules[0].name: missing",
            id="name-missing",
        ),
        pytest.param(MONTHLY + "colour = 1\n", "rules[0].colour: unknown key", id="unknown"),
        pytest.param(
            MONTHLY + "plans = 'home'\n", "rules[0].plans: must be a list of plan names", id="plans"
        ),
        pytest.param(
            MONTHLY + "subscribers = [-1]\n",
            "rules[0].subscribers: must be a list of subscriber ids",
            id="subs",
        ),
        pytest.param(
            replace(UPLOAD, '"until-below"', '"1 window"') + 'start = "next-window:1"\n',
            "rules[0].start: next-window:N needs a calendar window",
            id="next-rolling",
        ),
        pytest.param(
            UPLOAD + "early_release = true\n",
            "rules[0].early_release: has no meaning with duration 'until-below'",
            id="early-until",
        ),
        pytest.param(
            replace(MONTHLY, '"throttle"', '"notify"'),
            "rules[0].rate: only a throttle has a rate",
            id="notify-rate",
        ),
        pytest.param(MONTHLY + MONTHLY, "rules[1].name: duplicate of rules[0]", id="duplicate"),
        pytest.param("[rule]\nname = 'x'\n", "rule: must be an array of tables", id="not-array"),
        pytest.param("[[rules]]\nname = 'x'\n", "rules: unknown key", id="top-level"),
    ],
)
def test_parse_errors_name_rule_and_key(text: str, problem: str) -> None:
    problems = problems_of(text)
    assert any(p.startswith(problem) for p in problems), problems


def test_parse_errors_reported_together_with_rule_names() -> None:
    text = (
        UPLOAD
        + replace(replace(MONTHLY, '"1TB"', '"lots"'), '"1Mbit"', '"fast"')
        + "[[rule]]\nname = 'n'\n"
    )
    problems = problems_of(text)
    assert "rules[1].threshold: must be bytes with a unit" in problems[0]
    assert problems[0].endswith("(rule 'monthly-1tb')")
    assert any(p.startswith("rules[1].rate:") for p in problems)
    missing = [p for p in problems if p.startswith("rules[2].")]
    assert {p.split(":")[0] for p in missing} == {
        "rules[2].direction",
        "rules[2].window",
        "rules[2].threshold",
        "rules[2].action",
    }


def test_toml_syntax_error_has_line() -> None:
    with pytest.raises(SourceError) as info:
        parse_rules("[[rule]]\nname = \n", "x.toml")
    assert info.value.problems[0][0] == 2


def test_empty_rules_file() -> None:
    assert parse_rules("# nothing yet\n", "x.toml") == []


def test_load_rules_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read"):
        load_rules(str(tmp_path / "absent.toml"))


# --- rule (a): calendar month, throttle the month after next --------------------------------------


def monthly_run(
    crossings: list[float], until: float, probe: Callable[[Accounting, float], None] | None = None
) -> Driver:
    """One subscriber exceeding 1 TB downstream at each crossing time, ticks every 6 hours
    otherwise; ``probe(engine, now)`` runs after every tick."""
    drv = Driver(Accounting(rules_of(MONTHLY), TZ))
    t = min(crossings) - 2 * DAY
    drv.tick(t, {7: (0, 0)})  # baseline
    events = sorted(crossings)
    while t <= until:
        t += HOUR * 6
        while events and events[0] <= t:
            drv.tick(events.pop(0), {7: (0, TB + 1)})
        drv.tick(t)
        if probe is not None:
            probe(drv.engine, t)
    return drv


def test_monthly_rule_throttles_the_month_after_next() -> None:
    rates: dict[float, int | None] = {}

    def probe(eng: Accounting, now: float) -> None:
        rates[now] = eng.throttle_rate(7, now)
        if ts(2026, 3, 1) <= now < ts(2026, 4, 1):
            [use] = eng.usage(7, now)
            assert use["state"] == "throttled"
            assert use["bytes"] == 0  # March had no traffic at all, and still no early release

    drv = monthly_run([ts(2026, 1, 20, 12)], until=ts(2026, 5, 15), probe=probe)
    assert brief(drv.actions) == [
        ("2026-03-01T00:00:00+09:00", "monthly-1tb", "throttle", 1000),
        ("2026-04-01T00:00:00+09:00", "monthly-1tb", "release", None),
    ]
    throttle, release = drv.actions
    assert throttle.values["window"] == "2026-01"
    assert throttle.values["bytes"] == TB + 1
    assert throttle.values["threshold"] == TB
    assert throttle.values["until"] == "2026-04-01T00:00:00+09:00"
    assert release.values["reason"] == "end"
    for now, rate in rates.items():
        assert rate == (1000 if ts(2026, 3, 1) <= now < ts(2026, 4, 1) else None), local(now)


def test_monthly_decision_is_scheduled_not_an_action() -> None:
    drv = Driver(Accounting(rules_of(MONTHLY), TZ))
    drv.tick(ts(2026, 1, 1), {7: (0, 0)})
    assert drv.tick(ts(2026, 1, 20), {7: (0, TB + 1)}) == []
    eng = drv.engine
    assert eng.active(ts(2026, 1, 21)) == {}
    [pending] = eng.scheduled(ts(2026, 1, 21))[7]
    assert (local(pending.since).isoformat(), local(pending.until).isoformat()) == (
        "2026-03-01T00:00:00+09:00",
        "2026-04-01T00:00:00+09:00",
    )
    assert eng.usage(7, ts(2026, 1, 21))[0]["state"] == "scheduled"
    assert eng.usage(7, ts(2026, 3, 2))[0]["state"] == "throttled"
    # The same window does not fire twice, however much more traffic follows.
    assert drv.tick(ts(2026, 1, 25), {7: (0, TB)}) == []
    assert len(eng.scheduled(ts(2026, 1, 26))[7]) == 1


def test_monthly_crossing_again_next_month_schedules_the_following_month() -> None:
    """Design: each crossing is its own enforcement. January's runs March, February's April.

    At 1 April February's starts before January's ends, so the rate never lapses.
    """
    rates: dict[float, int | None] = {}
    drv = monthly_run(
        [ts(2026, 1, 20), ts(2026, 2, 10)],
        until=ts(2026, 5, 15),
        probe=lambda eng, now: rates.__setitem__(now, eng.throttle_rate(7, now)),
    )
    assert brief(drv.actions) == [
        ("2026-03-01T00:00:00+09:00", "monthly-1tb", "throttle", 1000),
        ("2026-04-01T00:00:00+09:00", "monthly-1tb", "throttle", 1000),
        ("2026-04-01T00:00:00+09:00", "monthly-1tb", "release", 1000),
        ("2026-05-01T00:00:00+09:00", "monthly-1tb", "release", None),
    ]
    assert [a.values["window"] for a in drv.actions] == ["2026-01", "2026-02", "2026-01", "2026-02"]
    for now, rate in rates.items():
        assert rate == (1000 if ts(2026, 3, 1) <= now < ts(2026, 5, 1) else None), local(now)


@pytest.mark.parametrize(
    "crossing, since, until, days",
    [
        pytest.param((2026, 1, 20), (2026, 3, 1), (2026, 4, 1), 31, id="31-days"),
        pytest.param((2026, 2, 20), (2026, 4, 1), (2026, 5, 1), 30, id="30-days"),
        pytest.param((2026, 12, 5), (2027, 2, 1), (2027, 3, 1), 28, id="28-days"),
        pytest.param((2027, 12, 31), (2028, 2, 1), (2028, 3, 1), 29, id="29-days-leap"),
        pytest.param((2026, 11, 30), (2027, 1, 1), (2027, 2, 1), 31, id="across-year"),
    ],
)
def test_monthly_throttle_is_one_calendar_month(
    crossing: tuple[int, ...], since: tuple[int, ...], until: tuple[int, ...], days: int
) -> None:
    eng = Accounting(rules_of(MONTHLY), TZ)
    eng.observe(ts(*crossing) - HOUR, {1: (0, 0)})
    eng.observe(ts(*crossing), {1: (0, 2 * TB)})
    [e] = eng.scheduled(ts(*crossing))[1]
    assert (e.since, e.until) == (ts(*since), ts(*until))
    assert e.until - e.since == days * DAY


@pytest.mark.parametrize(
    "last_second, window, throttle_from",
    [
        pytest.param((2026, 1, 31, 23, 59, 59), "2026-01", (2026, 3, 1), id="jan-31"),
        pytest.param((2026, 2, 28, 23, 59, 59), "2026-02", (2026, 4, 1), id="feb-28"),
        pytest.param((2028, 2, 29, 23, 59, 59), "2028-02", (2028, 4, 1), id="feb-29-leap"),
        pytest.param((2026, 4, 30, 23, 59, 59), "2026-04", (2026, 6, 1), id="apr-30"),
        pytest.param((2026, 12, 31, 23, 59, 59), "2026-12", (2027, 2, 1), id="dec-31"),
    ],
)
def test_crossing_at_the_last_second_vs_the_first_of_next_month(
    last_second: tuple[int, ...], window: str, throttle_from: tuple[int, ...]
) -> None:
    t = ts(*last_second)
    for at, expect_window, expect_since in [
        (t, window, ts(*throttle_from)),
        (t + 1, None, None),  # 00:00:00 of the next month: the next window, one month later
    ]:
        eng = Accounting(rules_of(MONTHLY), TZ)
        eng.observe(t - 10, {1: (0, 0)})
        eng.observe(at, {1: (0, TB + 1)})
        [e] = eng.scheduled(at)[1]
        if expect_window is None:
            assert local(at).day == 1 and local(at).hour == 0 and local(at).second == 0
            y, m = (local(at).year, local(at).month)
            expect_window = f"{y:04d}-{m:02d}"
            ny, nm = divmod(y * 12 + m - 1 + 2, 12)
            expect_since = ts(ny, nm + 1, 1)
        assert e.window == expect_window
        assert e.since == expect_since


def test_leap_day_is_counted_in_february() -> None:
    eng = Accounting(rules_of(MONTHLY), TZ)
    eng.observe(ts(2028, 2, 28, 12), {1: (0, 0)})
    eng.observe(ts(2028, 2, 29, 12), {1: (0, 5 * GB)})
    [u] = eng.usage(1, ts(2028, 2, 29, 13))
    assert (u["window"], u["bytes"], u["state"]) == ("2028-02", 5 * GB, "ok")
    assert eng.usage(1, ts(2028, 3, 1))[0]["bytes"] == 0  # March not ticked yet


# --- rule (b): rolling 24 h, throttle until below ----------------------------------------------


def exact_sum(events: list[tuple[float, int]], now: float, length: float) -> int:
    """The exact sliding-window sum at ``now``: bytes observed in (now - length, now]."""
    return sum(n for t, n in events if now - length < t <= now)


def test_upload_rule_throttles_at_once_and_releases_when_below() -> None:
    drv = Driver(Accounting(rules_of(UPLOAD), TZ))
    start = ts(2026, 6, 1, 9)
    step = 300.0
    drv.tick(start, {3: (0, 0)})
    events = []
    t = start
    for _ in range(16):  # 2 GB every 5 minutes: 32 GB over 80 minutes
        t += step
        drv.tick(t, {3: (2 * GB, 0)})
        events.append((t, 2 * GB))
    crossing = events[15][0]  # 30 GB is not over 30 GB; 32 GB is
    assert brief(drv.actions) == [
        (local(crossing).isoformat(), "upload-30gb-24h", "throttle", 2000)
    ]
    while t < start + 2 * DAY:
        t += step
        drv.tick(t)
    throttle, release = drv.actions
    assert release.action == "release" and release.rate_kbps is None
    assert release.values["reason"] == "below-threshold"
    assert release.values["bytes"] <= 30 * GB
    exact = events[0][0] + DAY  # the first 2 GB leave the exact 24 h sum: 30 GB, not over
    assert exact_sum(events, exact, DAY) == 30 * GB
    assert exact_sum(events, exact - 1, DAY) == 32 * GB
    assert exact - 1800 <= release.time <= exact


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(min_value=0, max_value=4 * GB), min_size=1, max_size=120),
    st.integers(min_value=0, max_value=1799),
)
def test_rolling_sum_bounds_and_release_within_one_bucket(uploads: list[int], offset: int) -> None:
    """Each tick: exact sum over (L - w) <= reported sum <= exact sum over L, and the throttle
    never starts before the exact sum is over, nor ends after it is no longer over, nor ends
    more than one bucket before that."""
    width = 1800.0
    step = 600.0
    eng = Accounting(rules_of(UPLOAD), TZ)
    start = ts(2026, 6, 1) + offset
    eng.observe(start, {1: (0, 0)})
    total = 0
    events: list[tuple[float, int]] = []
    t = start
    actions = []
    over_since = None  # when the exact sum is over
    below_at = []  # times the exact sum went from over to not over
    n = len(uploads) + int(2 * DAY / step)
    for i in range(n):
        t += step
        up = uploads[i] if i < len(uploads) else 0
        total += up
        if up:
            events.append((t, up))
        actions += eng.observe(t, {1: (total, 0)})
        reported = eng.usage(1, t)[0]["bytes"]
        assert exact_sum(events, t, DAY - width) <= reported <= exact_sum(events, t, DAY)
        exact_over = exact_sum(events, t, DAY) > 30 * GB
        if exact_over and over_since is None:
            over_since = t
        if not exact_over and over_since is not None:
            below_at.append(t)
            over_since = None
    for a in actions:
        exact = exact_sum(events, a.time, DAY)
        if a.action == "throttle":
            assert exact > 30 * GB
        else:
            # Released no later than the exact sum falls, and at most one bucket earlier.
            assert exact_sum(events, a.time, DAY - width) <= 30 * GB
            later = [b for b in below_at if b >= a.time]
            assert later and later[0] - a.time <= width
    assert [a.action for a in actions] == ["throttle", "release"] * (len(actions) // 2)


def test_rolling_memory_is_bounded() -> None:
    eng = Accounting(rules_of(UPLOAD), TZ)
    t = ts(2026, 6, 1)
    for i in range(2000):
        eng.observe(t + i * 300, {1: (i * 1000, 0)})
    sub = eng._subs[1]
    [ring] = [m[0] for m in sub.meters.values()]
    assert len(ring) <= rules.BUCKETS


# --- counting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "downs, counted",
    [
        pytest.param([0, 100, 250], 250, id="monotonic"),
        pytest.param([0, 100, 250, 50, 80], 330, id="reset-counts-new-value"),
        pytest.param([0, 100, 0, 0, 40], 140, id="reset-to-zero"),
        pytest.param([500, 600], 100, id="first-value-is-baseline"),
        pytest.param([0, 1000, None, None, 30], 1030, id="absent-then-reset"),
        pytest.param([0, 1000, None, 1200], 1200, id="absent-then-continued"),
    ],
)
def test_counter_deltas(downs: list[int | None], counted: int) -> None:
    eng = Accounting(rules_of(MONTHLY), TZ)
    t = ts(2026, 7, 1, 1)
    for i, down in enumerate(downs):
        eng.observe(t + i * 60, {} if down is None else {9: (0, down)})
    assert eng.usage(9, t + 3600)[0]["bytes"] == counted


@given(st.lists(st.integers(min_value=0, max_value=10**15), min_size=1, max_size=40))
def test_usage_never_negative_and_counts_every_increase(values: list[int]) -> None:
    eng = Accounting(rules_of(MONTHLY), TZ)
    t = ts(2026, 7, 1, 1)
    expected = 0
    for i, v in enumerate(values):
        if i:
            prev = values[i - 1]
            expected += v - prev if v >= prev else v
        eng.observe(t + i, {1: (0, v)})
    assert eng.usage(1, t + len(values))[0]["bytes"] == expected >= 0


def test_direction_both_counts_the_sum() -> None:
    rules = rules_of(replace(MONTHLY, '"down"', '"both"'))
    eng = Accounting(rules, TZ)
    eng.observe(ts(2026, 7, 1, 1), {1: (10, 20)})
    eng.observe(ts(2026, 7, 1, 2), {1: (15, 40)})
    assert eng.usage(1, ts(2026, 7, 1, 3))[0]["bytes"] == 25


def test_clock_stepping_back_is_taken_as_the_last_tick() -> None:
    eng = Accounting(rules_of(UPLOAD), TZ)
    t = ts(2026, 7, 1)
    eng.observe(t, {1: (0, 0)})
    [a] = eng.observe(t - 3600, {1: (31 * GB, 0)})
    assert a.time == t


def test_no_clock_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("the accounting code read the clock")

    monkeypatch.setattr(time, "time", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    drv = monthly_run([ts(2026, 1, 20)], until=ts(2026, 4, 2))
    assert len(drv.actions) == 2


# --- several rules, notices, suspensions, early release ------------------------------------------


DAILY_PAIR = """
[[rule]]
name = "down-daily"
direction = "down"
window = "calendar-day"
threshold = "10GB"
action = "throttle"
rate = "1Mbit"
duration = "2d"

[[rule]]
name = "up-daily"
direction = "up"
window = "calendar-day"
threshold = "5GB"
action = "throttle"
rate = "512kbit"
duration = "12h"
"""


def test_overlapping_throttles_lowest_rate_in_force() -> None:
    drv = Driver(Accounting(rules_of(DAILY_PAIR), TZ))
    drv.tick(ts(2026, 8, 1, 1), {1: (0, 0)})
    drv.tick(ts(2026, 8, 1, 8), {1: (0, 11 * GB)})
    drv.tick(ts(2026, 8, 1, 9), {1: (6 * GB, 0)})
    drv.days(ts(2026, 8, 1, 10), ts(2026, 8, 1, 12), step=HOUR)
    eng = drv.engine
    assert eng.throttle_rate(1, ts(2026, 8, 1, 12)) == 512
    active = eng.active(ts(2026, 8, 1, 12))[1]
    assert sorted((e.rule, e.rate_kbps) for e in active) == [
        ("down-daily", 1000),
        ("up-daily", 512),
    ]
    drv.days(ts(2026, 8, 1, 13), ts(2026, 8, 4), step=HOUR)
    assert brief(drv.actions) == [
        ("2026-08-01T08:00:00+09:00", "down-daily", "throttle", 1000),
        ("2026-08-01T09:00:00+09:00", "up-daily", "throttle", 512),
        ("2026-08-01T21:00:00+09:00", "up-daily", "release", 1000),  # the other stays
        ("2026-08-03T08:00:00+09:00", "down-daily", "release", None),
    ]
    assert [a.values["rule_rate_kbps"] for a in drv.actions] == [1000, 512, 512, 1000]
    assert eng.throttle_rate(1, ts(2026, 8, 4)) is None
    assert eng.active(ts(2026, 8, 4)) == {}


def test_notify_once_per_window_and_once_per_crossing() -> None:
    text = """
[[rule]]
name = "day-notice"
direction = "down"
window = "calendar-day"
threshold = "1GB"
action = "notify"

[[rule]]
name = "roll-notice"
direction = "up"
window = "rolling:1h"
threshold = "1GB"
action = "notify"
"""
    drv = Driver(Accounting(rules_of(text), TZ))
    t = ts(2026, 9, 1, 10)
    drv.tick(t, {1: (0, 0)})
    for i in range(1, 4):  # the day's window is over three ticks in a row: one notice
        drv.tick(t + i * 300, {1: (0, GB)})
    drv.tick(t + DAY, {1: (0, 2 * GB)})  # the next day: a new window, a new notice
    drv.tick(t + DAY + 300, {1: (2 * GB, 0)})  # rolling over: a notice
    drv.tick(t + DAY + 600, {1: (2 * GB, 0)})  # still over: nothing
    drv.tick(t + DAY + 3 * HOUR, {1: (0, 0)})  # below again
    drv.tick(t + DAY + 3 * HOUR + 300, {1: (2 * GB, 0)})  # over again: a notice
    assert [(a.rule, a.action, a.values["window"]) for a in drv.actions] == [
        ("day-notice", "notify", "2026-09-01"),
        ("day-notice", "notify", "2026-09-02"),
        ("roll-notice", "notify", "rolling:1h"),
        ("roll-notice", "notify", "rolling:1h"),
    ]
    assert all(a.rate_kbps is None for a in drv.actions)


def test_suspensions_overlap_like_throttles() -> None:
    text = """
[[rule]]
name = "suspend-a"
direction = "up"
window = "calendar-day"
threshold = "100GB"
action = "suspend"
duration = "6h"

[[rule]]
name = "suspend-b"
direction = "up"
window = "calendar-day"
threshold = "200GB"
action = "suspend"
duration = "1h"
"""
    drv = Driver(Accounting(rules_of(text), TZ))
    drv.tick(ts(2026, 9, 1, 1), {1: (0, 0)})
    drv.tick(ts(2026, 9, 1, 2), {1: (150 * GB, 0)})
    drv.tick(ts(2026, 9, 1, 3), {1: (100 * GB, 0)})
    drv.days(ts(2026, 9, 1, 4), ts(2026, 9, 1, 7), step=HOUR)
    assert drv.engine.is_suspended(1, ts(2026, 9, 1, 7))
    drv.days(ts(2026, 9, 1, 8), ts(2026, 9, 1, 10), step=HOUR)
    assert not drv.engine.is_suspended(1, ts(2026, 9, 1, 10))
    assert [(local(a.time).hour, a.rule, a.action, a.values["suspended"]) for a in drv.actions] == [
        (2, "suspend-a", "suspend", True),
        (3, "suspend-b", "suspend", True),
        (4, "suspend-b", "unsuspend", True),  # still suspended by suspend-a
        (8, "suspend-a", "unsuspend", False),
    ]


EARLY = """
[[rule]]
name = "daily-early"
direction = "down"
window = "calendar-day"
threshold = "10GB"
action = "throttle"
rate = "1Mbit"
duration = "7 windows"
early_release = true
"""


@pytest.mark.parametrize(
    "daily_gb, released",
    [
        pytest.param([11, 1], (2026, 10, 3), id="next-day-below"),
        pytest.param([11, 12, 3], (2026, 10, 4), id="second-day-below"),
        # 7 windows from 1 Oct 12:00 end 8 Oct 12:00 (each later day's excess adds its own).
        pytest.param(
            [11, 12, 12, 12, 12, 12, 12, 12], (2026, 10, 8, 12), id="never-below-full-term"
        ),
    ],
)
def test_early_release_after_a_whole_window_below(
    daily_gb: list[int], released: tuple[int, ...]
) -> None:
    drv = Driver(Accounting(rules_of(EARLY), TZ))
    drv.tick(ts(2026, 10, 1, 0, 30), {1: (0, 0)})
    for day, gb in enumerate(daily_gb):
        drv.tick(ts(2026, 10, 1 + day, 12), {1: (0, gb * GB)})
        drv.tick(ts(2026, 10, 1 + day, 23))
    drv.days(ts(2026, 10, 1 + len(daily_gb), 1), ts(2026, 10, 12))
    throttles = [a for a in drv.actions if a.action == "throttle"]
    releases = [a for a in drv.actions if a.action == "release"]
    assert local(throttles[0].time) == datetime(2026, 10, 1, 12, tzinfo=TZ)
    assert local(releases[0].time) == datetime(*released, tzinfo=TZ)
    if len(daily_gb) < 8:
        assert releases[0].values["reason"] == "early-release"
    else:
        assert releases[0].values["reason"] == "end"


def test_rolling_early_release_needs_a_whole_window_inside() -> None:
    text = replace(UPLOAD, '"until-below"', '"48h"') + "early_release = true\n"
    drv = Driver(Accounting(rules_of(text), TZ))
    t = ts(2026, 10, 1, 12)
    drv.tick(t, {1: (0, 0)})
    drv.tick(t + 300, {1: (31 * GB, 0)})
    drv.days(t + 600, t + 3 * DAY, step=300)
    throttle, release = drv.actions
    # Below after 24 h, but the whole 24 h must lie inside the throttle: 24 h after its start.
    assert release.time == throttle.time + DAY
    assert release.values["reason"] == "early-release"


def test_one_calendar_day_window_follows_dst() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    text = replace(replace(EARLY, '"7 windows"', '"1 window"'), "early_release = true", "")
    text = text.replace('action = "throttle"', 'action = "throttle"\nstart = "next-window:1"')
    eng = Accounting(rules_of(text), berlin)
    eng.observe(ts(2026, 3, 28, 10, tz=berlin), {1: (0, 0)})
    eng.observe(ts(2026, 3, 28, 11, tz=berlin), {1: (0, 11 * GB)})
    [e] = eng.scheduled(ts(2026, 3, 28, 12, tz=berlin))[1]
    assert e.since == ts(2026, 3, 29, tz=berlin)
    assert e.until == ts(2026, 3, 30, tz=berlin)
    assert e.until - e.since == 23 * HOUR  # the day clocks go forward


def test_plans_and_subscribers_select_who_is_covered() -> None:
    text = MONTHLY + 'plans = ["home"]\nsubscribers = [42]\n'
    eng = Accounting(rules_of(text), TZ)
    t = ts(2026, 1, 10)
    eng.observe(t, {1: (0, 0), 2: (0, 0), 42: (0, 0)}, plans={1: "home", 2: "business"})
    eng.observe(t + HOUR, {1: (0, 2 * TB), 2: (0, 2 * TB), 42: (0, 2 * TB)})
    assert sorted(eng.scheduled(t + HOUR)) == [1, 42]
    assert eng.usage(2, t + HOUR) == []
    # A plan is remembered until it changes; after a change the rule covers the subscriber.
    eng.observe(t + 2 * HOUR, {2: (0, 2 * TB)}, plans={2: "home"})
    eng.observe(t + 3 * HOUR, {2: (0, 4 * TB)})
    assert sorted(eng.scheduled(t + 3 * HOUR)) == [1, 2, 42]


def test_until_below_ends_even_after_the_rule_stops_covering_the_subscriber() -> None:
    eng = Accounting(rules_of(UPLOAD + 'plans = ["home"]\n'), TZ)
    t = ts(2026, 11, 1)
    eng.observe(t, {1: (0, 0)}, plans={1: "home"})
    [a] = eng.observe(t + 300, {1: (31 * GB, 0)})
    assert a.action == "throttle"
    eng.observe(t + 600, {1: (31 * GB, 0)}, plans={1: "business"})
    assert eng.usage(1, t + 600) == []
    out = []
    for i in range(3, 400):
        out += eng.observe(t + i * 300, {1: (31 * GB, 0)})
    assert [(x.action, x.values["reason"]) for x in out] == [("release", "below-threshold")]
    assert t + DAY - 1800 <= out[0].time <= t + DAY + 300


def test_forget_drops_state_and_pending_actions() -> None:
    eng = Accounting(rules_of(MONTHLY), TZ)
    eng.observe(ts(2026, 1, 1), {1: (0, 0)})
    eng.observe(ts(2026, 1, 20), {1: (0, 2 * TB)})
    eng.forget(1)
    assert eng.scheduled(ts(2026, 1, 21)) == {}
    assert eng.observe(ts(2026, 3, 2), {1: (0, 0)}) == []
    assert eng.usage(1, ts(2026, 3, 2))[0]["bytes"] == 0


# --- restarts ---------------------------------------------------------------------------------

RESTART_RULES = MONTHLY + UPLOAD + DAILY_PAIR + EARLY.replace("daily-early", "daily-early-x")


def restart_traffic(i: int, rng: random.Random) -> dict[int, tuple[int, int]]:
    """Hourly deltas for five subscribers with different habits (deterministic per seed)."""
    out = {}
    for sid in range(1, 6):
        heavy = sid == 1 and 300 <= i < 330  # crosses 1 TB in January
        up = rng.randrange(0, 4 * GB) if sid in (2, 3) and (i // 24) % 3 == 0 else 0
        down = 40 * GB if heavy else rng.randrange(0, 400 * 1000**2)
        out[sid] = (up, down)
    return out


def restart_counters(hours: int) -> list[tuple[float, dict[int, tuple[int, int]]]]:
    """(now, counters) for ``hours`` hourly ticks from 2026-01-01, with a data-plane reload."""
    rng = random.Random(1234)
    totals = {sid: [0, 0] for sid in range(1, 6)}
    ticks = []
    t0 = ts(2026, 1, 1)
    for i in range(hours):
        if i == 900:  # the data plane is reloaded: every counter starts again from 0
            totals = {sid: [0, 0] for sid in totals}
        for sid, (up, down) in restart_traffic(i, rng).items():
            totals[sid][0] += up
            totals[sid][1] += down
        ticks.append((t0 + i * HOUR, {sid: (u, d) for sid, (u, d) in totals.items()}))
    return ticks


RESTART_TICKS = restart_counters(24 * 100)


def reference_actions() -> list[list[Action]]:
    """The actions per tick of one engine running without a restart."""
    eng = Accounting(rules_of(RESTART_RULES), TZ)
    return [eng.observe(now, counters) for now, counters in RESTART_TICKS]


REFERENCE = reference_actions()


def test_restart_scenario_has_something_to_lose() -> None:
    kinds = {(a.rule, a.action) for tick in REFERENCE for a in tick}
    assert ("monthly-1tb", "throttle") in kinds and ("monthly-1tb", "release") in kinds
    assert ("upload-30gb-24h", "throttle") in kinds and ("upload-30gb-24h", "release") in kinds
    assert ("daily-early-x", "release") in kinds


@pytest.mark.parametrize("cut", [1, 330, 331, 700, 744, 901, 1000, 1416, 2000])
def test_snapshot_restore_continues_identically(cut: int, tmp_path: Path) -> None:
    rules = rules_of(RESTART_RULES)
    eng = Accounting(rules, TZ)
    for now, counters in RESTART_TICKS[:cut]:
        eng.observe(now, counters)
    path = str(tmp_path / "acct.snap")
    save_snapshot(path, eng.snapshot())
    data = load_snapshot(path)
    assert data is not None
    restored = Accounting.restore(data, rules, TZ)
    assert restored.snapshot() == eng.snapshot()
    now = RESTART_TICKS[cut - 1][0]
    assert restored.active(now) == eng.active(now)
    assert restored.scheduled(now) == eng.scheduled(now)
    for sid in range(1, 6):
        assert restored.usage(sid, now) == eng.usage(sid, now)
    after = [restored.observe(now, counters) for now, counters in RESTART_TICKS[cut:]]
    assert after == REFERENCE[cut:]


def test_snapshot_mid_window_with_scheduled_and_active() -> None:
    """The first tick with both a scheduled throttle and one in force, mid-window."""
    rules = rules_of(RESTART_RULES)
    eng = Accounting(rules, TZ)
    cut = None
    for i, (now, counters) in enumerate(RESTART_TICKS):
        eng.observe(now, counters)
        if eng.scheduled(now) and eng.active(now):
            cut = i + 1
            break
    assert cut is not None
    assert local(RESTART_TICKS[cut - 1][0]).hour != 0  # not on a window boundary
    assert [e.rule for e in eng.scheduled(now)[1]] == ["monthly-1tb"]
    data = eng.snapshot()
    restored = Accounting.restore(data, rules, TZ)
    later = [restored.observe(now, counters) for now, counters in RESTART_TICKS[cut:]]
    assert later == REFERENCE[cut:]


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=1, max_value=len(RESTART_TICKS) - 1))
def test_snapshot_at_any_tick_continues_identically(cut: int) -> None:
    rules = rules_of(RESTART_RULES)
    eng = Accounting(rules, TZ)
    for now, counters in RESTART_TICKS[:cut]:
        eng.observe(now, counters)
    restored = Accounting.restore(eng.snapshot(), rules, TZ)
    after = [restored.observe(now, counters) for now, counters in RESTART_TICKS[cut:]]
    assert after == REFERENCE[cut:]


def test_restart_after_downtime_returns_the_missed_start() -> None:
    """Down from 20 February to 5 March: the throttle due on 1 March comes at the first tick,
    dated 1 March, and the counters reset by a data-plane reload meanwhile count as new."""
    rules = rules_of(MONTHLY)
    eng = Accounting(rules, TZ)
    eng.observe(ts(2026, 1, 19), {1: (0, 0)})
    eng.observe(ts(2026, 1, 20), {1: (0, 2 * TB)})
    eng.observe(ts(2026, 2, 20), {1: (0, 2 * TB)})
    restored = Accounting.restore(eng.snapshot(), rules, TZ)
    [a] = restored.observe(ts(2026, 3, 5), {1: (0, 5 * GB)})
    assert (local(a.time).isoformat(), a.action, a.rate_kbps) == (
        "2026-03-01T00:00:00+09:00",
        "throttle",
        1000,
    )
    assert restored.usage(1, ts(2026, 3, 5))[0]["bytes"] == 5 * GB


def test_restore_with_a_removed_rule_releases_its_until_below_throttles() -> None:
    rules = rules_of(UPLOAD)
    eng = Accounting(rules, TZ)
    t = ts(2026, 5, 1)
    eng.observe(t, {1: (0, 0)})
    [a] = eng.observe(t + 60, {1: (31 * GB, 0)})
    restored = Accounting.restore(eng.snapshot(), [], TZ)
    [r] = restored.observe(t + 120, {1: (31 * GB, 0)})
    assert (r.action, r.values["reason"], r.rate_kbps) == ("release", "rule-removed", None)


def good_snapshot() -> bytes:
    """A small real snapshot with a scheduled throttle in it."""
    eng = Accounting(rules_of(MONTHLY + UPLOAD), TZ)
    eng.observe(ts(2026, 1, 1), {1: (0, 0), 2: (0, 0)})
    eng.observe(ts(2026, 1, 2), {1: (31 * GB, 2 * TB), 2: (1, 1)})
    return eng.snapshot()


GOOD = good_snapshot()


@pytest.mark.parametrize(
    "data, message",
    [
        pytest.param(b"", "snapshot is empty", id="empty"),
        pytest.param(GOOD[: len(GOOD) // 2], "truncated", id="truncated"),
        pytest.param(GOOD[:-1], "truncated", id="truncated-by-one"),
        pytest.param(b"\x00" * 64, "not a snapshot", id="zeros"),
        pytest.param(msgpack.packb([1, 2, 3, 4]), "not an xdpzoot accounting snapshot", id="other"),
        pytest.param(b"hello world", "truncated or not a snapshot", id="text"),
        pytest.param(
            msgpack.packb(["xdpzoot-accounting", 2, 0, b""]),
            "snapshot version 2 is not supported (this code reads version 1)",
            id="wrong-version",
        ),
        pytest.param(
            msgpack.packb(["xdpzoot-accounting", 1, 0, msgpack.packb({})]),
            "corrupt (checksum mismatch)",
            id="bad-checksum",
        ),
        pytest.param(
            msgpack.packb(
                ["xdpzoot-accounting", 1, __import__("zlib").crc32(b"\x92\x01"), b"\x92\x01"]
            ),
            "snapshot content is invalid",
            id="bad-content",
        ),
        pytest.param(
            msgpack.packb(
                [
                    "xdpzoot-accounting",
                    1,
                    __import__("zlib").crc32(msgpack.packb({"now": 1.0})),
                    msgpack.packb({"now": 1.0}),
                ]
            ),
            "snapshot content is invalid: KeyError",
            id="missing-field",
        ),
    ],
)
def test_bad_snapshots_raise_snapshot_error(data: bytes, message: str) -> None:
    with pytest.raises(SnapshotError) as info:
        Accounting.restore(data, rules_of(MONTHLY), TZ)
    assert message in str(info.value)


def test_every_truncation_and_byte_flip_is_detected() -> None:
    for n in range(len(GOOD)):
        with pytest.raises(SnapshotError):
            Accounting.restore(GOOD[:n], [], TZ)
    for i in range(len(GOOD)):
        for flip in (0x01, 0x80, 0xFF):
            data = bytearray(GOOD)
            data[i] ^= flip
            with pytest.raises(SnapshotError):
                Accounting.restore(bytes(data), [], TZ)


@settings(deadline=None)   # no timing in a pass/fail test: a busy machine is not a failure
@given(st.binary(max_size=300))
def test_garbage_raises_only_snapshot_error(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        Accounting.restore(data, [], TZ)


def test_load_snapshot_absent_and_atomic_save(tmp_path: Path) -> None:
    path = tmp_path / "state.snap"
    assert load_snapshot(str(path)) is None
    save_snapshot(str(path), b"one")
    save_snapshot(str(path), GOOD)
    assert load_snapshot(str(path)) == GOOD
    assert os.listdir(tmp_path) == ["state.snap"]  # no temp file left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- scale ------------------------------------------------------------------------------------


def test_a_month_and_a_half_of_ticks() -> None:
    """45 days of 5-minute ticks for 100 subscribers, with the example rules: the notices,
    throttles and schedules they must give, and a snapshot that stays small. (How long it
    takes is the daemon benchmark's business, bench/bench_daemon.py: a wall-time bound here
    failed on slow machines without saying anything wrong.)"""
    rules = load_rules(str(MAPS / "bandwidth.toml"))
    eng = Accounting(rules, TZ)
    rng = random.Random(7)
    rates = {sid: (rng.randrange(0, 400_000), rng.randrange(0, 2_000_000)) for sid in range(100)}
    rates[0] = (100_000, 400_000_000)  # 4e8 B / 5 min: over 1 TB in under two weeks
    rates[1] = (300_000_000, 1000)  # 30 GB upstream in under 9 hours
    totals = {sid: [0, 0] for sid in rates}
    t0 = ts(2026, 1, 1)
    step = 300.0
    ticks = int(45 * DAY / step)
    actions: list[Action] = []
    for i in range(ticks):
        for sid, (up, down) in rates.items():
            tot = totals[sid]
            tot[0] += up
            tot[1] += down
        actions += eng.observe(t0 + i * step, {sid: (u, d) for sid, (u, d) in totals.items()})
    assert ticks == 12960
    got = {(a.subscriber, a.rule, a.action) for a in actions}
    assert (0, "monthly-800gb-notice", "notify") in got
    assert (0, "monthly-800gb-notice", "notify") in got
    # January's excess is throttled from 1 March, after the simulated span: scheduled.
    later = eng.scheduled(t0 + ticks * step)[0]
    assert [(e.rule, e.window) for e in later] == [
        ("monthly-1tb", "2026-01"),
        ("monthly-1tb", "2026-02"),
    ]
    assert (1, "upload-30gb-24h", "throttle") in got
    assert len(eng.snapshot()) < 200_000


# --- audit log --------------------------------------------------------------------------------


def sample_actions() -> list[Action]:
    """Three actions a day apart."""
    t = ts(2026, 3, 1)
    return [
        Action(t, 1, "monthly-1tb", "throttle", 1000, {"window": "2026-01", "bytes": TB + 1}),
        Action(t + DAY, 2, "n", "notify", None, {"window": "2026-03", "bytes": 5}),
        Action(t + 2 * DAY, 1, "monthly-1tb", "release", None, {"reason": "end"}),
    ]


def test_audit_log_one_json_line_per_action(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), retention_s=180 * DAY, tz=TZ)
    assert log.write(sample_actions()) == 3
    assert log.write([]) == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records[0] == {
        "time": "2026-03-01T00:00:00+09:00",
        "subscriber": 1,
        "rule": "monthly-1tb",
        "action": "throttle",
        "rate_kbps": 1000,
        "values": {"window": "2026-01", "bytes": TB + 1},
    }
    assert [r["action"] for r in records] == ["throttle", "notify", "release"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    log.write(sample_actions()[:1])
    assert len(path.read_text().splitlines()) == 4  # appended


def test_audit_log_purge_drops_old_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), retention_s=1.5 * DAY, tz=TZ)
    log.write(sample_actions())
    with open(path, "a") as f:
        f.write("not json\n")
    log.write(sample_actions()[2:])
    before = path.read_text().splitlines()
    inode = path.stat().st_ino
    assert log.purge(ts(2026, 3, 2)) == 0  # nothing old yet: file untouched
    assert path.stat().st_ino == inode
    now = ts(2026, 3, 2, 12)  # cutoff 2026-03-01T00:00: the first record is older
    assert log.purge(now) == 0
    assert log.purge(now + 1) == 1
    after = path.read_text().splitlines()
    assert after == before[1:]  # order kept, the malformed line kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["audit.jsonl"]
    assert log.purge(ts(2027, 1, 1)) == 3
    assert path.read_text().splitlines() == ["not json"]


def test_audit_purge_of_missing_file(tmp_path: Path) -> None:
    assert AuditLog(str(tmp_path / "none.jsonl"), DAY, tz=TZ).purge(0.0) == 0


def test_audit_round_trip_with_engine_actions(tmp_path: Path) -> None:
    drv = monthly_run([ts(2026, 1, 20)], until=ts(2026, 4, 2))
    log = AuditLog(str(tmp_path / "a.jsonl"), 180 * DAY, tz=TZ)
    log.write(drv.actions)
    records = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["time"] for r in records] == [
        "2026-03-01T00:00:00+09:00",
        "2026-04-01T00:00:00+09:00",
    ]
    keys = {k for r in records for k in r["values"]}
    assert keys <= {
        "window",
        "bytes",
        "threshold",
        "decided",
        "since",
        "until",
        "reason",
        "rule_rate_kbps",
    }


def test_action_times_are_iso_in_values() -> None:
    drv = monthly_run([ts(2026, 1, 20)], until=ts(2026, 4, 2))
    decided = datetime.fromisoformat(drv.actions[0].values["decided"])
    assert decided.utcoffset() == timedelta(hours=9)


# --- ticks that give only the counters that moved ------------------------------------------

CHANGED_RULES = (
    MONTHLY.replace("1TB", "60GB")
    + UPLOAD.replace("30GB", "8GB").replace("24h", "6h")   # named upload-30gb-6h
    + DAILY_PAIR
    + EARLY
    + """
[[rule]]
name = "hourly-suspend"
direction = "both"
window = "rolling:1h"
threshold = "6GB"
action = "suspend"
duration = "30m"
plans = ["gold"]
subscribers = [3]

[[rule]]
name = "daily-notice"
direction = "down"
window = "calendar-day"
threshold = "3GB"
action = "notify"
"""
)
SIDS = range(1, 7)

# A tick: seconds since the last, traffic (subscriber, direction 0 up / 1 down, GB), and
# maybe an event: a plan change, a counter reset (data plane reloaded), a contract ended.
TICK = st.tuples(
    st.sampled_from([60, 900, 3600, 3 * 3600, 86400, 5 * 86400]),
    st.lists(st.tuples(st.sampled_from(SIDS), st.integers(0, 1), st.integers(1, 12)),
             max_size=4),
    st.one_of(st.none(),
              st.tuples(st.just("plan"), st.sampled_from(SIDS), st.sampled_from(["gold", "x"])),
              st.tuples(st.sampled_from(["reset", "forget"]), st.sampled_from(SIDS))),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TICK, min_size=1, max_size=60))
def test_changed_counters_only_decide_as_every_counter(ticks) -> None:
    """The daemon gives the engine only the counters that moved (and a new subscriber's
    first): the actions, throttles, enforcements, usage and decision count are those of an
    engine that visits every subscriber with every counter on every tick (the engine's
    first-tick mode, forced on each tick), and the snapshot's kept records are never stale."""
    rules = rules_of(CHANGED_RULES)
    every, moved = Accounting(rules, TZ), Accounting(rules, TZ)
    totals = {sid: [0, 0] for sid in SIDS if sid != 6}   # 6 comes later
    seen: dict[int, tuple[int, int]] = {}   # what `moved` was last given
    now = ts(2026, 1, 30, 20)
    for i, (gap, traffic, event) in enumerate(ticks):
        now += gap
        if i == 3:
            totals[6] = [0, 0]
        plans = None
        if event and event[0] == "plan":
            plans = {event[1]: event[2]}
        elif event and event[1] in totals:
            if event[0] == "reset":
                totals[event[1]] = [0, 0]
            else:
                del totals[event[1]]
                seen.pop(event[1], None)
                every.forget(event[1])
                moved.forget(event[1])
        for sid, direction, gb in traffic:
            if sid in totals:
                totals[sid][direction] += gb * GB
        counters = {sid: (u, d) for sid, (u, d) in totals.items()}
        given_ = {sid: c for sid, c in counters.items() if seen.get(sid) != c}
        seen.update(given_)
        every._all = True
        a = every.observe(now, counters, plans)
        b = moved.observe(now, given_, plans)
        assert a == b
        assert every.throttles(now) == moved.throttles(now) == {
            sid: r for sid in totals if (r := every.throttle_rate(sid, now))}
        assert every.active(now) == moved.active(now)
        assert every.scheduled(now) == moved.scheduled(now)
        for sid in totals:
            assert every.usage(sid, now) == moved.usage(sid, now)
        assert every.decisions == moved.decisions
        if i % 5 == 4:
            snap = moved.snapshot()
            for sub in moved._subs.values():
                sub.packed = None
            assert moved.snapshot() == snap


def test_changed_counters_scenario_decides_something() -> None:
    """The comparison above is not vacuous: its rules throttle, suspend, notify and release."""
    drv = Driver(Accounting(rules_of(CHANGED_RULES), TZ))
    drv.tick(ts(2026, 1, 30, 20), {3: (0, 0)})
    drv.tick(ts(2026, 1, 30, 21), {3: (9 * GB, 0)})
    drv.tick(ts(2026, 1, 30, 22), {3: (0, 11 * GB)})
    drv.days(ts(2026, 1, 31), ts(2026, 2, 3), step=HOUR)
    kinds = {(a.rule, a.action) for a in drv.actions}
    assert {("hourly-suspend", "suspend"), ("upload-30gb-6h", "throttle"),
            ("daily-notice", "notify"), ("down-daily", "release")} <= kinds
