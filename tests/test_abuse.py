"""The abuse rules' engine (bandwidth/abuse.py), plain Python: runs of windows over a
threshold, `for`, once per run, a gap starts afresh."""

from __future__ import annotations

from xdpzoot.bandwidth.abuse import Abuse, AbuseRule

W = 60
T0 = 1_790_000_040


def windows(engine: Abuse, series: list[dict[int, tuple[int, int]]]) -> list[list[tuple]]:
    """Each window's (subscriber, rule, action), the windows back to back from T0."""
    return [[(a.subscriber, a.rule, a.action) for a in engine.observe(
        T0 + i * W, T0 + (i + 1) * W, values)] for i, values in enumerate(series)]


def test_over_for_a_while_then_once_per_run():
    e = Abuse([AbuseRule("scan", "scans", 500, 3 * W, "suspend"),
               AbuseRule("note", "scans", 100, 0, "notify")])
    over, low = {7: (600, 0)}, {7: (50, 0)}
    got = windows(e, [over, over, over, over, low, over, {7: (200, 0)}])
    assert got == [[(7, "note", "notify")], [], [(7, "scan", "suspend")], [],   # 3 windows
                   [],                                 # not over: the runs end
                   [(7, "note", "notify")],            # a new run: noticed again at once
                   []]                                 # still over the notice: once a run
    assert e.lowest("scans") == 100 and e.lowest("smtp_blocked") is None


def test_threshold_is_exclusive_and_signals_apart():
    e = Abuse([AbuseRule("spam", "smtp_blocked", 10, 0, "notify")])
    assert windows(e, [{1: (10_000, 10), 2: (0, 11)}]) == [[(2, "spam", "notify")]]


def test_a_gap_between_windows_starts_every_run_afresh():
    e = Abuse([AbuseRule("scan", "scans", 500, 2 * W, "suspend")])
    assert e.observe(T0, T0 + W, {7: (900, 0)}) == []
    # The next window judged is not the next one (the daemon was stopped): one more needed.
    assert e.observe(T0 + 5 * W, T0 + 6 * W, {7: (900, 0)}) == []
    acts = e.observe(T0 + 6 * W, T0 + 7 * W, {7: (900, 0)})
    assert [(a.action, a.values["value"], a.values["until"]) for a in acts] == [
        ("suspend", 900, "resume")]
