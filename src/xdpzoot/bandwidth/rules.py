"""Volume rules: the TOML list of thresholds, windows and actions (``maps/bandwidth.toml``),
validated with every problem named by file and rule, and the calendar the windows are cut in.
Shared with the config's validation; plain Python, no kernel access, no clock."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from datetime import time as dtime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from xdpzoot.sources.files import SOURCE_BYTES, SourceError, parse_toml, read_source

__all__ = [
    "BUCKETS",
    "Rule",
    "Window",
    "load_rules",
    "local_zone",
    "parse_rules",
    "parse_seconds",
]

BUCKETS = 48  # buckets per rolling window: 30 min for 24 h, bounding memory per subscriber
MONTH = "calendar-month"
DAY = "calendar-day"
ROLLING = "rolling"
DIRECTIONS = ("up", "down", "both")
ACTIONS = ("notify", "throttle", "suspend")
_DIRECTION_CODE = {"up": 0, "down": 1, "both": 2}
U32_MAX = 0xFFFF_FFFF  # subscriber ids and kbit/s rates are u32 in the data plane maps
MIN_ROLLING_S = 60
MAX_ROLLING_S = 366 * 86400
MAX_NEXT_WINDOW = 120


# --- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """A counting window: a calendar month or day (in the engine's zone), or a rolling span."""

    kind: str  # MONTH | DAY | ROLLING
    seconds: int = 0  # the length of a rolling window; 0 for calendar windows
    spec: str = ""  # as written in the rules, for messages and action values

    @property
    def calendar(self) -> bool:
        """True for calendar windows (month, day), which have ids and boundaries."""
        return self.kind != ROLLING

    @property
    def bucket(self) -> float:
        """The width of one rolling bucket in seconds (window / BUCKETS)."""
        return self.seconds / BUCKETS


@dataclass(frozen=True, slots=True)
class Rule:
    """One volume rule: which traffic, which window, which threshold, and what follows."""

    name: str
    direction: str  # "up" | "down" | "both" (the sum)
    window: Window
    threshold: int  # bytes; the window is over when its bytes exceed this
    action: str  # "notify" | "throttle" | "suspend"
    rate_kbps: int | None = None  # throttle only
    start_windows: int = 0  # 0 = at the crossing; N = at the start of the N-th next window
    duration_s: int | None = None  # a fixed duration in seconds, or
    duration_windows: int | None = None  # a number of windows, or
    until_below: bool = False  # until the rolling sum is below the threshold again
    early_release: bool = False
    plans: frozenset[str] = frozenset()
    subscribers: frozenset[int] = frozenset()

    def covers(self, subscriber: int, plan: str | None) -> bool:
        """Whether the rule applies: to everyone when it names neither plans nor subscribers,
        else to the subscribers it lists plus every subscriber on a plan it lists."""
        if not self.plans and not self.subscribers:
            return True
        return subscriber in self.subscribers or (plan is not None and plan in self.plans)


_BYTE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_RATE_UNITS = {"kbit": 1, "Mbit": 1000, "Gbit": 1000**2}
_TIME_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*")
_DURATION = re.compile(r"\s*(?:\d+\s*[wdhms]\s*)+")
_DURATION_PART = re.compile(r"(\d+)\s*([wdhms])")
_WINDOWS = re.compile(r"\s*(\d+)\s*windows?\s*")
_NEXT_WINDOW = re.compile(r"next-window:(\d+)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEYS = (
    "name",
    "direction",
    "window",
    "threshold",
    "action",
    "rate",
    "start",
    "duration",
    "early_release",
    "plans",
    "subscribers",
)


def _show(value: Any) -> str:
    """A value as an error message shows it: TOML-ish and short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _quantity(value: Any, units: Mapping[str, int], what: str) -> int:
    """``"1.5TB"``-style text (or a bare integer of the base unit) as an integer > 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value
    names = ", ".join(units)
    if not isinstance(value, str):
        raise ValueError(f"must be {what} with a unit ({names}), got {_show(value)}")
    m = _QUANTITY.fullmatch(value)
    if not m or m.group(2) not in units:
        raise ValueError(f"must be {what} with a unit ({names}), got {_show(value)}")
    try:
        exact = Decimal(m.group(1)) * units[m.group(2)]
    except InvalidOperation as e:  # unreachable with the pattern above; kept for safety
        raise ValueError(f"not a number: {_show(value)}") from e
    if exact != exact.to_integral_value():
        raise ValueError(f"{_show(value)} is not a whole number of {what}")
    if exact <= 0:
        raise ValueError(f"must be positive, got {_show(value)}")
    return int(exact)


def parse_seconds(text: str) -> int:
    """``"30d"``, ``"12h"``, ``"1d12h"``, ``"90m"``, ``"1w"``, ``"45s"`` as seconds > 0."""
    if not _DURATION.fullmatch(text):
        raise ValueError(f"must be a duration like '30d', '12h' or '1d12h', got {_show(text)}")
    total = sum(int(n) * _TIME_UNITS[u] for n, u in _DURATION_PART.findall(text))
    if total <= 0:
        raise ValueError(f"must be positive, got {_show(text)}")
    return total


def _window(value: Any) -> Window:
    """The ``window`` key: calendar-month, calendar-day or rolling:<duration>."""
    if not isinstance(value, str):
        raise ValueError(
            f"must be 'calendar-month', 'calendar-day' or 'rolling:<duration>', got {_show(value)}"
        )
    text = value.strip()
    if text in (MONTH, DAY):
        return Window(text, 0, text)
    if text.startswith("rolling:"):
        seconds = parse_seconds(text[len("rolling:") :])
        if not MIN_ROLLING_S <= seconds <= MAX_ROLLING_S:
            raise ValueError(f"a rolling window must be between 1m and 366d, got {_show(value)}")
        return Window(ROLLING, seconds, text)
    raise ValueError(
        f"must be 'calendar-month', 'calendar-day' or 'rolling:<duration>', got {_show(value)}"
    )


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``, exactly."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}; got {_show(value)}")
    return value


def _start(value: Any, window: Window | None) -> int:
    """The ``start`` key: ``"now"`` -> 0, ``"next-window:N"`` -> N (calendar windows only)."""
    if value == "now":
        return 0
    m = _NEXT_WINDOW.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"must be 'now' or 'next-window:N', got {_show(value)}")
    n = int(m.group(1))
    if not 1 <= n <= MAX_NEXT_WINDOW:
        raise ValueError(f"N in next-window:N must be 1..{MAX_NEXT_WINDOW}, got {n}")
    if window is not None and not window.calendar:
        raise ValueError("next-window:N needs a calendar window (a rolling window has no next)")
    return n


def _duration(value: Any, window: Window | None) -> tuple[int | None, int | None, bool]:
    """The ``duration`` key as (seconds, windows, until_below), exactly one of them set."""
    if not isinstance(value, str):
        raise ValueError(
            f"must be a duration ('30d'), 'N window(s)' or 'until-below', got {_show(value)}"
        )
    if value.strip() == "until-below":
        if window is not None and window.calendar:
            raise ValueError("'until-below' needs a rolling window")
        return None, None, True
    m = _WINDOWS.fullmatch(value)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"must be at least 1 window, got {_show(value)}")
        return None, n, False
    try:
        return parse_seconds(value), None, False
    except ValueError:
        raise ValueError(
            f"must be a duration ('30d'), 'N window(s)' or 'until-below', got {_show(value)}"
        ) from None


def _rule(index: int, table: Any, problems: list[str]) -> Rule | None:
    """Validate one ``[[rule]]`` table; problems are appended as ``rules[N].key: ...``."""
    where = f"rules[{index}]"
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table ([[rule]]), got {_show(table)}")
        return None
    name = table.get("name")
    label = f" (rule {name!r})" if isinstance(name, str) and _NAME.fullmatch(name) else ""
    before = len(problems)

    def bad(key: str, message: str) -> None:
        problems.append(f"{where}.{key}: {message}{label}")

    for key in table:
        if key not in _KEYS:
            bad(key, f"unknown key (known: {', '.join(_KEYS)})")
    for key in ("name", "direction", "window", "threshold", "action"):
        if key not in table:
            bad(key, "missing")

    def get(key: str, check: Any, default: Any = None) -> Any:
        if key not in table:
            return default
        try:
            return check(table[key])
        except ValueError as e:
            bad(key, str(e))
            return default

    if "name" in table and not (isinstance(name, str) and _NAME.fullmatch(name)):
        bad("name", f"must be 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric), got {_show(name)}")
    direction = get("direction", lambda v: _choice(v, DIRECTIONS))
    window = get("window", _window)
    threshold = get("threshold", lambda v: _quantity(v, _BYTE_UNITS, "bytes"))
    action = get("action", lambda v: _choice(v, ACTIONS))
    rate = get("rate", lambda v: _quantity(v, _RATE_UNITS, "kbit/s"))
    if rate is not None and rate > U32_MAX:
        bad("rate", f"must be at most {U32_MAX} kbit/s, got {rate}")
    start = get("start", lambda v: _start(v, window), 0)
    seconds, windows, until_below = get(
        "duration", lambda v: _duration(v, window), (None, None, False)
    )
    early = table.get("early_release", False)
    if not isinstance(early, bool):
        bad("early_release", f"must be true or false, got {_show(early)}")
        early = False

    def listed(key: str, ok: Any, what: str) -> frozenset[Any]:
        items = table.get(key, [])
        if not isinstance(items, list) or not all(ok(i) for i in items):
            bad(key, f"must be a list of {what}, got {_show(items)}")
            return frozenset()
        return frozenset(items)

    plans = listed("plans", lambda p: isinstance(p, str) and p != "", "plan names")
    subs = listed(
        "subscribers",
        lambda s: isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= U32_MAX,
        f"subscriber ids (0..{U32_MAX})",
    )

    if action == "throttle" and "rate" not in table:
        bad("rate", "missing (a throttle needs a rate such as '1Mbit')")
    if action in ("notify", "suspend") and "rate" in table:
        bad("rate", f"only a throttle has a rate, this rule's action is {action!r}")
    if action in ("throttle", "suspend") and "duration" not in table:
        bad("duration", f"missing (how long the {action} lasts: '30d', '1 window', 'until-below')")
    if action == "notify":
        for key in ("start", "duration", "early_release"):
            if key in table:
                bad(key, "not used by a notify rule (a notice is a single action)")
    if until_below and early:
        bad("early_release", "has no meaning with duration 'until-below', which always ends early")
    if until_below and start:
        bad("start", "'until-below' starts at the crossing ('now')")

    if len(problems) > before:
        return None
    return Rule(
        name=name,
        direction=direction,
        window=window,
        threshold=threshold,
        action=action,
        rate_kbps=rate,
        start_windows=start,
        duration_s=seconds,
        duration_windows=windows,
        until_below=until_below,
        early_release=early,
        plans=plans,
        subscribers=subs,
    )


def parse_rules(text: str, path: str) -> list[Rule]:
    """Validate TOML rules text; every problem is reported at once in one SourceError.

    Problems name the rule by its 0-based position and the key, ``rules[2].threshold: ...``,
    plus the rule's name when it has a valid one. An empty file is an empty rule list.
    """
    doc = parse_toml(text, path)
    problems: list[str] = []
    for key in doc:
        if key != "rule":
            problems.append(f"{key}: unknown key (rules are [[rule]] tables)")
    tables = doc.get("rule", [])
    if not isinstance(tables, list):
        problems.append(f"rule: must be an array of tables ([[rule]]), got {_show(tables)}")
        tables = []
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(tables):
        rule = _rule(i, table, problems)
        name = table.get("name") if isinstance(table, dict) else None
        if isinstance(name, str):
            if name in seen:
                problems.append(f"rules[{i}].name: duplicate of rules[{seen[name]}] ({name!r})")
            else:
                seen[name] = i
        if rule is not None:
            rules.append(rule)
    if problems:
        raise SourceError(path, [(None, p) for p in problems])
    return rules


def load_rules(path: str, limit: int = SOURCE_BYTES) -> list[Rule]:
    """Read and validate the rules file at ``path`` (see :func:`parse_rules`)."""
    return parse_rules(read_source(path, limit), path)


# --- calendar -------------------------------------------------------------------------------


def local_zone() -> tzinfo:
    """The local time zone as a zoneinfo zone: ``$TZ`` if it names one, else /etc/localtime."""
    key = os.environ.get("TZ", "").lstrip(":")
    if key:
        try:
            return ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC


@lru_cache(maxsize=8192)
def _window_start(kind: str, index: int, tz: tzinfo) -> float:
    """The instant a calendar window starts: local midnight of its first day.

    A midnight inside a DST gap resolves to the transition instant (zoneinfo's fold=0).
    """
    if kind == MONTH:
        year, month0 = divmod(index, 12)
        return datetime(year, month0 + 1, 1, tzinfo=tz).timestamp()
    return datetime.combine(date.fromordinal(index), dtime(), tzinfo=tz).timestamp()


def _window_index(kind: str, t: float, tz: tzinfo) -> int:
    """The calendar window containing ``t``: months as year*12+month-1, days as ordinals.

    Windows are defined by their start instants, so the index never goes back even where a
    zone repeats local midnight.
    """
    d = datetime.fromtimestamp(t, tz)
    i = d.year * 12 + d.month - 1 if kind == MONTH else d.toordinal()
    while _window_start(kind, i, tz) > t:
        i -= 1
    while _window_start(kind, i + 1, tz) <= t:
        i += 1
    return i


def _window_label(kind: str, index: int) -> str:
    """A window id as shown to people: ``2026-11`` or ``2026-11-28``."""
    if kind == MONTH:
        year, month0 = divmod(index, 12)
        return f"{year:04d}-{month0 + 1:02d}"
    return date.fromordinal(index).isoformat()
