"""The metrics of `xdpzoot run` against real pinned maps: the exposition parses with
prometheus-client's own parser, every metric has HELP and TYPE and follows the naming, no
list entry or subscriber address appears in it, the counts agree with the maps read the
slow way, and the dashboard and alert rules in contrib/ use only metrics it has (promtool
checks the rules)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xdpzoot import metrics, tables
from xdpzoot.config import load_config
from xdpzoot.daemon import Daemon
from xdpzoot.dataplane import dirs, kernel, schema
from xdpzoot.dataplane.instance import Instance
from xdpzoot.lab import in_netns

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana" / "xdpzoot.json"
RULES = ROOT / "contrib" / "prometheus" / "xdpzoot.rules.yml"

# Documentation ranges only. Two pools (one indexed, one IPv6), static blocks and hosts, a
# dynamic host with a flag, and a RADIUS contract without a session.
SUBS = """\
subscriber,address,type,up_kbps,down_kbps,flags,plan,user
100,100.64.1.0/24,dynamic,,,,,
101,2001:db8:1::/64,dynamic,,,,,
200,198.51.100.8/29,static,50000,50000,,,
200,2001:db8:2::/64,static,50000,50000,,,
201,198.51.100.20,static,,,,,
202,198.51.100.21,static,,,,,
300,100.64.2.7,dynamic,,,op25b_exempt,,
7001,,dynamic,,,,home,user7001@zoot.example
"""
CSAM = """\
# a list for the metrics test
192.0.2.55
192.0.2.56
203.0.113.128/25
2001:db8:bad::1
2001:db8:bad:1::/64
"""


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def scraped(bpffs, tmp_path_factory):
    """A daemon on a fresh instance (subscribers, a CSAM list, a suspension and a throttle
    by hand), ticked once; its exposition as a scrape gets it."""
    tmp = tmp_path_factory.mktemp("metrics")
    pin = os.path.join(bpffs, "metrics")
    (tmp / "subs.csv").write_text(SUBS)
    lst = tmp / "csam.txt"
    lst.write_text(CSAM)
    lst.chmod(0o600)
    cfg = tmp / "xdpzoot.toml"
    cfg.write_text(f"""
[bandwidth]
state = "{tmp}/state.msgpack"
audit = "{tmp}/audit.jsonl"
[sources]
subscribers = "{tmp}/subs.csv"
[limits]
hosts = 1024
prefixes = 1024
subscribers = 1024
csam_hosts = 1024
csam_prefixes = 1024
pool_addresses = 1024
[metrics]
listen = ""
""")
    limits = load_config(str(cfg)).defines()
    with Instance(pin, limits) as inst:   # as the commands do it, in this process
        inst.create(limits)
        subs = tables.read_subscribers(str(tmp / "subs.csv"))
        inst.load_subscribers(subs.hosts, subs.prefixes, contracts=subs.contracts)
        inst.load_csam(CSAM.encode(), str(lst))
        inst.suspend(tables.addr16(ipaddress.ip_address("198.51.100.20")), True)
        inst.throttle(inst.subscriber_slot(202, "202")[1], 1000, 0)
    d = Daemon(str(cfg), pin, clock=Clock(1_790_000_000.0))
    d.start()
    d.tick()
    collector = metrics.Collector(d)
    text = generate_latest(metrics.registry(collector)).decode()
    yield d, text, {f.name: f for f in text_string_to_metric_families(text)}
    collector.close()
    d.inst.close()
    kernel.unpin_all(pin)


def value(fams, name: str, **labels) -> float:
    """The value of the one sample ``name`` with ``labels`` (among others)."""
    got = [s.value for f in fams.values() for s in f.samples
           if s.name == name and labels.items() <= s.labels.items()]
    assert len(got) == 1, (name, labels, got)
    return got[0]


def test_every_metric_has_help_type_and_follows_the_naming(scraped):
    _, text, fams = scraped
    for name, f in fams.items():
        assert f.documentation, f"{name}: no HELP"
        assert f.type in ("counter", "gauge", "info"), f"{name}: TYPE {f.type}"
        assert name.startswith(("xdpzoot_", "process_")), name
        for s in f.samples:
            if f.type == "counter" and name.startswith("xdpzoot_"):
                assert s.name == name + "_total", s.name
            # no per-subscriber or per-address label: every label from a closed list
            assert set(s.labels) <= {"role", "verdict", "reason", "interface", "table",
                                     "kind", "family", "type", "cause", "mode", "switch",
                                     "source", "rule", "action", "answer", "error",
                                     "result", "sha256", "version", "hook", "kernel"}, s
    described = set(re.findall(r"^# HELP (\S+) \S", text, re.M))
    typed = set(re.findall(r"^# TYPE (\S+) (?:counter|gauge)$", text, re.M))
    for line in text.splitlines():   # in the text itself: a HELP and a TYPE line each
        if line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()
            assert name in described and name in typed, line


@pytest.fixture
def netns():
    """A namespace of the test's own with its loopback up (the HTTP server binds there)."""
    name = f"xzmet{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_served_over_http_and_an_address_in_use_is_one_line(scraped, netns):
    d, _, _ = scraped
    with in_netns(netns):
        server = metrics.Server(d, "127.0.0.1:9386")
        try:
            with urlopen("http://127.0.0.1:9386/metrics", timeout=10) as r:
                text = r.read().decode()
                assert r.headers["Content-Type"].startswith("text/plain")
            with pytest.raises(OSError) as e:
                metrics.Server(d, "127.0.0.1:9386")
        finally:
            server.close()
    assert str(e.value) == "metrics.listen 127.0.0.1:9386: Address already in use"
    fams = {f.name for f in text_string_to_metric_families(text)}
    assert {"xdpzoot_packets", "xdpzoot_table_entries", "process_cpu_seconds"} <= fams


def forms(net: str) -> set[str]:
    """The ways an address or prefix could be written."""
    n = ipaddress.ip_network(net)
    a = n.network_address
    out = {str(a), a.exploded, str(n), a.packed.hex()}
    if a.version == 4:
        out |= {f"::ffff:{a}", (b"\0" * 10 + b"\xff\xff" + a.packed).hex()}
    return out


def test_no_list_entry_or_subscriber_address_appears(scraped):
    _, text, _ = scraped
    entries = [x for x in CSAM.splitlines() if x and not x.startswith("#")]
    addresses = [row.split(",")[1] for row in SUBS.splitlines()[1:] if row.split(",")[1]]
    for net in entries + addresses:
        for form in forms(net):
            assert form not in text, f"{net} appears in the exposition as {form}"


def test_the_counts_are_those_of_the_maps(scraped):
    d, _, fams = scraped
    hosts = dict(d.inst.maps.host_items())
    prefixes = dict(d.inst.maps.prefix_items())
    assert value(fams, "xdpzoot_table_entries", table="hosts") == len(hosts) == 3
    assert value(fams, "xdpzoot_table_entries", table="prefixes") == len(prefixes) == 4
    assert value(fams, "xdpzoot_table_entries", table="contracts") == 1
    assert value(fams, "xdpzoot_table_capacity", table="hosts") == 1024
    assert value(fams, "xdpzoot_table_capacity", table="subscriber_slots") == 1023
    # Subscribers with a slot: the static block (both families: one slot), two static
    # hosts, a dynamic host and the contract (slot without a session); two pools.
    slots = {e.slot for e in (*hosts.values(), *prefixes.values())
             if e.slot and not e.pool_bits} | {e.slot for e in d.inst.contracts().values()}
    assert value(fams, "xdpzoot_table_entries", table="subscriber_slots") == len(slots) == 5
    assert value(fams, "xdpzoot_subscribers", type="static") == 3
    assert value(fams, "xdpzoot_subscribers", type="dynamic") == 2
    assert value(fams, "xdpzoot_subscriber_pools") == 2
    # The indexed IPv4 /24 pool holds 256 addresses' state.
    assert value(fams, "xdpzoot_table_entries", table="pool_addresses") == 256
    assert value(fams, "xdpzoot_subscribers_suspended") == 1
    assert value(fams, "xdpzoot_subscribers_throttled", cause="hand") == 1
    assert value(fams, "xdpzoot_subscribers_throttled", cause="rule") == 0
    assert value(fams, "xdpzoot_table_entries", table="manual_throttles") == 1
    assert value(fams, "xdpzoot_table_entries", table="flows") == 0   # no congestion yet
    assert value(fams, "xdpzoot_table_capacity", table="flows") == 262144
    # the class index: the pools and blocks of /8../24 alone in their /24s (no host there)
    d_ = d.inst.maps.read_dir()
    _, _, owners, bits = dirs.uniform(list(prefixes), d_, 1 << 14, lambda: list(hosts), 1 << 15)
    assert value(fams, "xdpzoot_table_entries", table="uniform_classes") == len(owners) >= 1
    assert value(fams, "xdpzoot_table_capacity", table="uniform_classes") == 16383
    # and the /24s of those with host entries in them (the others' class, in one line)
    assert value(fams, "xdpzoot_table_entries", table="hosted_slash24s") == len(bits)
    assert value(fams, "xdpzoot_table_capacity", table="hosted_slash24s") == 32767
    # the IPv6 prefixes' lengths the programs probe (both /64)
    assert value(fams, "xdpzoot_table_entries", table="ipv6_prefix_lengths") == 1
    assert value(fams, "xdpzoot_table_capacity", table="ipv6_prefix_lengths") == dirs.V6_LENS
    assert value(fams, "xdpzoot_csam_entries", kind="host", family="ipv4") == 2
    assert value(fams, "xdpzoot_csam_entries", kind="prefix", family="ipv6") == 1
    assert value(fams, "xdpzoot_table_entries", table="csam_hosts") == 3
    assert 0 < value(fams, "xdpzoot_csam_filter_fill_ratio", family="ipv4") < 1e-5
    assert value(fams, "xdpzoot_csam_filter_bits", family="ipv4") == 2**20   # hashed
    st = d.inst.csam_status()
    assert value(fams, "xdpzoot_csam_generation") == st["generation"]
    assert value(fams, "xdpzoot_csam_list_info", sha256=st["sha256"][:16]) == 1
    assert 0 <= value(fams, "xdpzoot_csam_age_seconds") < 600
    assert value(fams, "xdpzoot_ticks_total") == 1
    assert value(fams, "xdpzoot_dataplane_loaded") == 1
    # every role x verdict x reason, zero or not: a series never appears mid-way
    assert len(fams["xdpzoot_packets"].samples) == \
        len(schema.ROLES) * len(schema.VERDICTS) * len(schema.REASONS)


def test_census_agrees_with_counting_in_python(scraped):
    """The tick's census of 100,000 generated rows agrees with counting them in Python."""
    import numpy as np

    from xdpzoot.dataplane.layout import WORDS, class_word

    rng = np.random.default_rng(1)
    n, slots = 100_000, 200_000
    rows = np.zeros((n, WORDS), dtype=np.uint32)
    types = rng.integers(1, 3, n)
    flags = rng.choice([0, 1, 8, 9], n)   # suspended, session
    rows[:, 0] = rng.integers(1, 1 << 30, n)
    rows[:, 1] = [class_word(int(t), int(f)) for t, f in zip(types, flags, strict=True)]
    rows[:, 4] = rng.permutation(np.arange(1, slots))[:n]
    rows[:10, 4] = 0   # pool-like: no slot of their own
    owners = np.zeros(slots, dtype=np.uint32)
    owners[rows[10:, 4]] = rows[10:, 0]
    c = metrics.census(rows, np.zeros((0, WORDS), dtype=np.uint32), owners)
    assert c["subscribers"]["static"] == int(((types == 2)[10:]).sum())
    assert c["subscriber_slots"] == n - 10
    assert c["session_entries"] == int(((flags & 8) != 0).sum())
    assert c["suspended"] == int(((flags & 1) != 0).sum())


def exposition_names(fams) -> set[str]:
    """Every sample's name, and every family's (some have no sample here: no interface,
    no RADIUS listener, no congestion auto)."""
    return {s.name for f in fams.values() for s in f.samples} | set(fams) | \
        {n + "_total" for n, f in fams.items() if f.type == "counter"}


def expressions(obj) -> list[str]:
    """Every PromQL expression in a Grafana dashboard (targets' ``expr``)."""
    if isinstance(obj, dict):
        return ([obj["expr"]] if isinstance(obj.get("expr"), str) else []) + \
            [e for v in obj.values() for e in expressions(v)]
    if isinstance(obj, list):
        return [e for v in obj for e in expressions(v)]
    return []


# Words in PromQL that are not metric names.
PROMQL = {"sum", "rate", "irate", "increase", "by", "without", "on", "ignoring", "group_left",
          "group_right", "max", "min", "avg", "count", "time", "topk", "bottomk", "and", "or",
          "unless", "bool", "offset", "absent", "changes", "resets", "clamp_min", "clamp_max",
          "label_replace", "vector", "scalar", "max_over_time", "min_over_time", "for",
          "histogram_quantile", "delta", "deriv", "sort", "sort_desc", "abs", "ceil", "floor",
          "round", "avg_over_time", "last_over_time", "up", "interval", "rate_interval",
          "range", "instance", "job", "d", "h", "m", "s"}


def metric_names(expr: str) -> set[str]:
    """Identifiers in ``expr`` that name metrics: outside label matchers and strings."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
            if w not in PROMQL and not w.startswith("$")}


def test_dashboard_uses_only_metrics_the_exposition_has(scraped):
    _, _, fams = scraped
    have = exposition_names(fams)
    dash = json.loads(DASHBOARD.read_text())
    exprs = expressions(dash)
    assert len(exprs) >= 10
    used = set().union(*map(metric_names, exprs))
    assert used and used <= have, sorted(used - have)
    for var in dash["templating"]["list"]:   # label_values(METRIC, label)
        if var["type"] == "query":
            assert re.match(r"label_values\((\w+),", var["definition"])[1] in have
    titles = " ".join(p.get("title", "") for p in dash["panels"]).lower()
    for topic in ("reason", "drop", "table", "csam", "throttled", "suspended", "tick"):
        assert topic in titles, topic


def test_alert_rules_pass_promtool_and_use_exposed_metrics(scraped):
    _, _, fams = scraped
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: make setup installs the prometheus package"
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    exprs = re.findall(r"^\s*expr:\s*(.+?)\s*$", RULES.read_text(), re.M)
    assert len(exprs) >= 4
    used = set().union(*map(metric_names, exprs))
    have = exposition_names(fams)
    assert used <= have, sorted(used - have)


def alert_cases() -> str:
    """promtool rule tests of three alerts (their annotations, as promtool compares them
    too, from the rules file)."""
    import yaml

    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]}

    def expect(name: str, labels: dict, summary: str) -> dict:
        return {"exp_labels": {"severity": rules[name]["labels"]["severity"], "instance": "r1",
                               **labels},
                "exp_annotations": {"summary": summary,
                                    "description": rules[name]["annotations"]["description"]}}

    series = {
        'xdpzoot_interface_attached{instance="r1",interface="eth1",role="access"}':
            "1 1 0 0 0 0",
        'xdpzoot_table_entries{instance="r1",table="hosts"}': "950+0x40",
        'xdpzoot_table_capacity{instance="r1",table="hosts"}': "1000+0x40",
        'xdpzoot_last_tick_timestamp_seconds{instance="r1"}': "0+60x5 300+0x20",
        'xdpzoot_tick_interval_seconds{instance="r1"}': "10+0x25",
    }
    checks = [
        (1, "XdpzootProgramGone", []),
        (4, "XdpzootProgramGone", [expect(
            "XdpzootProgramGone", {"interface": "eth1", "role": "access"},
            "xdpzoot r1: no xdpzoot program on eth1 (access)")]),
        (20, "XdpzootTableAlmostFull", [expect(
            "XdpzootTableAlmostFull", {"table": "hosts"}, "xdpzoot r1: table hosts is 95% full")]),
        (5, "XdpzootTickStalled", []),
        (10, "XdpzootTickStalled", [expect(
            "XdpzootTickStalled", {}, "xdpzoot r1: no daemon tick for 5m 0s")]),
    ]
    return yaml.safe_dump({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": [{"series": k, "values": v} for k, v in series.items()],
                   "alert_rule_test": [{"eval_time": f"{t}m", "alertname": a, "exp_alerts": e}
                                       for t, a, e in checks]}]})


def test_alerts_fire_when_they_should(tmp_path):
    """promtool's own rule tests: a program gone, a table past 90 %, ticks that stopped."""
    cases = tmp_path / "cases.yml"
    cases.write_text(alert_cases())
    r = subprocess.run([shutil.which("promtool") or "promtool", "test", "rules", str(cases)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
