"""Abuse rules (``[[abuse]]`` in the config): a per-subscriber signal above a threshold in
every window for a while leads to a notice or a suspension.

The service rules let the ISP suspend a customer for spam and for unauthorised access such
as port scans (``/work/shared/domain.md`` section 5). The data plane keeps two signals per
subscriber state slot: the SMTP attempts OP25B blocked (a counter) and the distinct
destinations of the conversations it opened (the scan sketch, bpf/scan.h), both per window
of ``[signals] window_seconds``, which the daemon moves. A rule is over in a window when the
window's value is *greater* than its threshold; it fires when it has been over in every
window for at least ``for`` (the windows' span, from the start of the first over), once per
run of windows over: again only after a window not over. Plain Python, no clock, no kernel:
the daemon gives :meth:`Abuse.observe` each window's values and applies the actions it
returns (the same :class:`~xdpzoot.bandwidth.accounting.Action` records the volume rules
make, into the same audit log and the same metric, ``xdpzoot_decisions_total``).

A suspension lasts until an operator's ``xdpzoot resume``: the signals are headers only and
an estimate; a person looks before the customer is back. What the engine keeps (runs of
windows over, per rule and subscriber) lives in the daemon's memory only: after a restart a
run starts again, so a rule fires up to ``for`` later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from xdpzoot.bandwidth.accounting import Action
from xdpzoot.bandwidth.rules import parse_seconds

SIGNALS = ("scans", "smtp_blocked")   # index in the (scans, smtp_blocked) pairs observed
ACTIONS = ("notify", "suspend")
_KEYS = ("name", "signal", "threshold", "for", "action")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_FOR_S = 7 * 86400


@dataclass(frozen=True)
class AbuseRule:
    """One ``[[abuse]]`` table."""

    name: str
    signal: str   # "scans" | "smtp_blocked"
    threshold: int   # over: a window's value greater than this
    for_s: int = 0   # over in every window for this long (0: the first window over fires)
    action: str = "notify"   # "notify" | "suspend"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_abuse(value: Any) -> tuple[tuple[AbuseRule, ...], list[str]]:
    """``[[abuse]]`` tables as rules, and the problems: one per bad key, naming it as
    ``abuse[N] (name).key`` (N from 1). Rules come only from tables without a problem."""
    if not isinstance(value, list):
        return (), [f"abuse: must be tables ([[abuse]]), got {_show(value)}"]
    problems: list[str] = []
    out: list[AbuseRule] = []
    names: set[str] = set()
    for i, table in enumerate(value, 1):
        if not isinstance(table, dict):
            problems.append(f"abuse[{i}]: must be a table ([[abuse]])")
            continue
        name = table.get("name")
        where = f"abuse[{i}]" + (f" ({name})" if isinstance(name, str) and _NAME.fullmatch(name)
                                 else "")
        before = len(problems)

        def bad(key: str, msg: str, where: str = where) -> None:
            problems.append(f"{where}.{key}: {msg}")

        for key in sorted(set(table) - set(_KEYS)):
            bad(key, f"unknown key (known: {', '.join(_KEYS)})")
        for key in ("name", "signal", "threshold", "action"):
            if key not in table:
                bad(key, "missing")
        if "name" in table:
            if not (isinstance(name, str) and _NAME.fullmatch(name)):
                bad("name", "must be 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric), got "
                    f"{_show(name)}")
            elif name in names:
                bad("name", "used twice")
            else:
                names.add(name)
        signal, action = table.get("signal"), table.get("action")
        if "signal" in table and signal not in SIGNALS:
            bad("signal", f"must be 'scans' (distinct destinations of new conversations) or "
                f"'smtp_blocked' (SMTP attempts OP25B stopped), got {_show(signal)}")
        if "action" in table and action not in ACTIONS:
            bad("action", f"must be 'notify' or 'suspend', got {_show(action)}")
        threshold = table.get("threshold")
        if "threshold" in table and (isinstance(threshold, bool) or not isinstance(
                threshold, int) or not 0 <= threshold <= 0xFFFF_FFFF):
            bad("threshold", f"must be an integer 0..4294967295 (per window), got "
                f"{_show(threshold)}")
        for_s = 0
        if "for" in table:
            try:
                if not isinstance(table["for"], str):
                    raise ValueError(f"must be a duration like '10m' or '1h', got "
                                     f"{_show(table['for'])}")
                for_s = parse_seconds(table["for"])
                if for_s > MAX_FOR_S:
                    raise ValueError(f"must be at most 7d, got {_show(table['for'])}")
            except ValueError as e:
                bad("for", str(e))
        if len(problems) == before:
            out.append(AbuseRule(name, signal, threshold, for_s, action))
    return tuple(out), problems


class Abuse:
    """The abuse rules' state: per rule and subscriber, the start of its run of windows
    over the threshold and whether the rule fired in it."""

    def __init__(self, rules: tuple[AbuseRule, ...] | list[AbuseRule]) -> None:
        self.rules = tuple(rules)
        self._since: dict[tuple[str, int], float] = {}   # (rule, subscriber) -> run start
        self._fired: set[tuple[str, int]] = set()
        self._end: float | None = None   # the end of the last window observed

    def lowest(self, signal: str) -> int | None:
        """The lowest threshold of the rules on ``signal`` (None: no rule): a subscriber at
        or below it in a window is over no rule of that signal."""
        return min((r.threshold for r in self.rules if r.signal == signal), default=None)

    def observe(self, start: float, end: float, values: Mapping[int, tuple[int, int]]
                ) -> list[Action]:
        """One window [start, end): ``values`` maps subscriber id to (scans, smtp_blocked)
        in it, for every subscriber over some rule's threshold (the others may be left out:
        see :meth:`lowest`). A window that does not follow the last one observed
        (the daemon was stopped, a window was not judged) starts every run afresh.
        Returns the actions, dated ``end``."""
        if self._end != start:
            self._since.clear()
            self._fired.clear()
        self._end = end
        out: list[Action] = []
        for rule in self.rules:
            i = SIGNALS.index(rule.signal)
            over = {sid: v[i] for sid, v in values.items() if v[i] > rule.threshold}
            for key in [k for k in self._since if k[0] == rule.name and k[1] not in over]:
                del self._since[key]   # a window not over ends the run
                self._fired.discard(key)
            for sid, value in sorted(over.items()):
                key = (rule.name, sid)
                since = self._since.setdefault(key, start)
                if key in self._fired or end - since < rule.for_s:
                    continue
                self._fired.add(key)
                info = {"signal": rule.signal, "value": value, "threshold": rule.threshold,
                        "window_seconds": round(end - start),
                        "over_since": datetime.fromtimestamp(since).astimezone().isoformat()}
                if rule.action == "suspend":
                    info["until"] = "resume"
                out.append(Action(end, sid, rule.name, rule.action, None, info))
        return out
