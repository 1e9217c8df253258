"""The TOML config: defaults, every key, every problem named as section.key, the example."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from pathlib import Path

import pytest

from xdpzoot import config
from xdpzoot.config import (
    Config,
    Dataplane,
    Interfaces,
    Ip53b,
    Limits,
    Metrics,
    Op25b,
    Sources,
    Suspend,
    load_config,
    parse_config,
)
from xdpzoot.sources.files import SourceError

MAPS = Path(__file__).resolve().parents[1] / "maps"


def problems_of(text: str) -> list[tuple[int | None, str]]:
    """The problems a config text produces (the test fails if it parses)."""
    with pytest.raises(SourceError) as info:
        parse_config(text, "x.toml")
    assert info.value.path == "x.toml"
    return info.value.problems


# --- defaults ---------------------------------------------------------------------------------


def test_defaults() -> None:
    c = Config()
    assert c == parse_config("") == parse_config("# nothing\n")
    assert c.interfaces == Interfaces(access=(), core=(), hook="xdp", mode="auto")
    assert c.op25b == Op25b(enabled=True, action="drop", ipv6=True, allow=())
    assert c.ip53b == Ip53b(enabled=True, tcp=False, ipv6=True)
    assert c.suspend == Suspend(allow=())
    assert c.sources == Sources(subscribers="")
    assert c.limits == Limits(hosts=262144, prefixes=65536, allow=4096)
    assert c.dataplane == Dataplane(bypass=False, monitor=False, fast_path=False)
    assert c.metrics == Metrics(listen="127.0.0.1:9386")


def test_empty_sections_are_defaults() -> None:
    text = "".join(f"[{s}]\n" for s in config._SECTIONS)
    assert parse_config(text) == Config()


def test_defines() -> None:
    """The limits as the header's names; the CSAM lines: one per 8 addresses, a power of 2;
    its net lines: one per 8 of four words a prefix."""
    assert Config().defines() == [
        "-DXZ_MAX_HOSTS=262144",
        "-DXZ_MAX_PREFIXES=65536",
        "-DXZ_MAX_ALLOW=4096",
        "-DXZ_MAX_CSAM_HOSTS=1048576",
        "-DXZ_MAX_CSAM_PREFIXES=262144",
        "-DXZ_CSAM_LINE_BITS=17",
        "-DXZ_CSAM_NET_BITS=17",
        "-DXZ_MAX_SUBSCRIBERS=1048576",
        "-DXZ_MAX_FLOWS=262144",
        "-DXZ_MAX_POOL_ADDRS=262144",
        "-DXZ_MAX_IFINDEX=4096",
    ]
    c = parse_config("[limits]\nhosts = 1024\nprefixes = 16777216\nallow = 1\n"
                     "csam_hosts = 100\n")
    assert c.defines() == [
        "-DXZ_MAX_HOSTS=1024",
        "-DXZ_MAX_PREFIXES=16777216",
        "-DXZ_MAX_ALLOW=1",
        "-DXZ_MAX_CSAM_HOSTS=100",
        "-DXZ_MAX_CSAM_PREFIXES=262144",
        "-DXZ_CSAM_LINE_BITS=4",
        "-DXZ_CSAM_NET_BITS=17",
        "-DXZ_MAX_SUBSCRIBERS=1048576",
        "-DXZ_MAX_FLOWS=262144",
        "-DXZ_MAX_POOL_ADDRS=262144",
        "-DXZ_MAX_IFINDEX=4096",
    ]


def test_defines_match_header_defaults() -> None:
    """The config's defaults are the header's #ifndef defaults: one truth for the sizes."""
    header = (Path(__file__).resolve().parents[1] / "bpf" / "xdpzoot.h").read_text()
    for flag in Config().defines():
        name, value = flag[2:].split("=")
        assert re.search(rf"#define {name} {value}\b", header), flag


def test_frozen_and_replace() -> None:
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.limits = Limits()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.limits.hosts = 1  # type: ignore[misc]
    c2 = dataclasses.replace(c, limits=dataclasses.replace(c.limits, hosts=7))
    assert c2.defines()[0] == "-DXZ_MAX_HOSTS=7"
    assert c.limits.hosts == 262144
    assert hash(c) == hash(Config())


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, section, expected",
    [
        pytest.param('[interfaces]\naccess = ["eth1", "vlan.100"]\ncore = ["eth0"]', "interfaces",
                     Interfaces(access=("eth1", "vlan.100"), core=("eth0",)), id="interfaces"),
        pytest.param('[interfaces]\naccess = ["abcdefghijklmno"]', "interfaces",
                     Interfaces(access=("abcdefghijklmno",)), id="interface-15-chars"),
        pytest.param('[interfaces]\nhook = "tc"\nmode = "generic"', "interfaces",
                     Interfaces(hook="tc", mode="generic"), id="hook-mode"),
        pytest.param('[metrics]\nlisten = "[::1]:9100"', "metrics", Metrics("[::1]:9100"),
                     id="metrics-listen"),
        pytest.param('[metrics]\nlisten = ""', "metrics", Metrics(""), id="metrics-off"),
        pytest.param('[op25b]\nenabled = false\naction = "reject"\nipv6 = false\n'
                     'allow = ["192.0.2.25", "2001:db8::/32", " 198.51.100.0/24 "]', "op25b",
                     Op25b(False, "reject", False, (
                         ipaddress.ip_network("192.0.2.25/32"),
                         ipaddress.ip_network("2001:db8::/32"),
                         ipaddress.ip_network("198.51.100.0/24"))), id="op25b"),
        pytest.param("[ip53b]\nenabled = false\ntcp = true\nipv6 = false", "ip53b",
                     Ip53b(False, True, False), id="ip53b"),
        pytest.param('[suspend]\nallow = ["192.0.2.80"]', "suspend",
                     Suspend((ipaddress.ip_network("192.0.2.80/32"),)), id="suspend"),
        pytest.param('[sources]\nsubscribers = "/etc/xdpzoot/subscribers.csv"', "sources",
                     Sources("/etc/xdpzoot/subscribers.csv"), id="sources"),
        pytest.param("[limits]\nhosts = 1\nprefixes = 0x100\nallow = 16_777_216", "limits",
                     Limits(1, 256, 16777216), id="limits"),
        pytest.param("[dataplane]\nbypass = true\nmonitor = true", "dataplane",
                     Dataplane(True, True), id="dataplane"),
        pytest.param("dataplane.bypass = true", "dataplane", Dataplane(bypass=True),
                     id="dotted-keys"),
        pytest.param("[dataplane]\nfast_path = true", "dataplane", Dataplane(fast_path=True),
                     id="fast-path"),
    ],
)
def test_values(text: str, section: str, expected: object) -> None:
    c = parse_config(text)
    assert getattr(c, section) == expected
    others = {f.name for f in dataclasses.fields(Config)} - {section}
    assert all(getattr(c, s) == getattr(Config(), s) for s in others)


def test_allow_entries_are_networks() -> None:
    c = parse_config('[op25b]\nallow = ["192.0.2.25", "2001:db8::1"]')
    assert [type(n) for n in c.op25b.allow] == [ipaddress.IPv4Network, ipaddress.IPv6Network]


# --- problems ---------------------------------------------------------------------------------

BOOL = "must be true or false, got "
SIZE = "must be an integer 1..16777216, got "


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param('[op25b]\naction = "block"',
                     ["op25b.action: must be 'drop' or 'reject', got 'block'"], id="action"),
        pytest.param('[interfaces]\nhook = "xdpgeneric"',
                     ["interfaces.hook: must be 'xdp' or 'tc', got 'xdpgeneric'"], id="hook"),
        pytest.param('[interfaces]\nmode = "skb"',
                     ["interfaces.mode: must be 'auto', 'native' or 'generic', got 'skb'"],
                     id="mode"),
        pytest.param("[interfaces]\nmode = 1",
                     ["interfaces.mode: must be 'auto', 'native' or 'generic', got 1"],
                     id="mode-not-a-string"),
        pytest.param('[op25b]\nenabled = "true"', [f"op25b.enabled: {BOOL}'true'"],
                     id="bool-as-string"),
        pytest.param("[ip53b]\ntcp = 1", [f"ip53b.tcp: {BOOL}1"], id="bool-as-int"),
        pytest.param("[dataplane]\nmonitor = []", [f"dataplane.monitor: {BOOL}[]"],
                     id="bool-as-list"),
        pytest.param('[dataplane]\nfast_path = "on"', [f"dataplane.fast_path: {BOOL}'on'"],
                     id="fast-path-as-string"),
        pytest.param("[limits]\nhosts = 0", [f"limits.hosts: {SIZE}0"], id="size-zero"),
        pytest.param("[limits]\nprefixes = -1", [f"limits.prefixes: {SIZE}-1"],
                     id="size-negative"),
        pytest.param("[limits]\nallow = 16777217", [f"limits.allow: {SIZE}16777217"],
                     id="size-too-big"),
        pytest.param("[limits]\nhosts = true", [f"limits.hosts: {SIZE}true"],
                     id="size-bool"),
        pytest.param("[limits]\nhosts = 1.5", [f"limits.hosts: {SIZE}1.5"], id="size-float"),
        pytest.param('[limits]\nhosts = "1024"', [f"limits.hosts: {SIZE}'1024'"],
                     id="size-string"),
        pytest.param("[sources]\nsubscribers = 5",
                     ["sources.subscribers: must be a string (a file path, or \"\" for none), "
                      "got 5"], id="path-not-a-string"),
        pytest.param('[sources]\nsubscribers = "a\\u0000b"',
                     ["sources.subscribers: must not contain a NUL character"], id="path-nul"),
        pytest.param('[op25b]\nallow = ["192.0.2.25/24"]',
                     ["op25b.allow: host bits set in 192.0.2.25/24"], id="allow-host-bits"),
        pytest.param('[suspend]\nallow = ["support.example"]',
                     ["suspend.allow: bad address 'support.example'"], id="allow-garbage"),
        pytest.param('[suspend]\nallow = "192.0.2.80"',
                     ["suspend.allow: must be a list, got '192.0.2.80'"], id="allow-not-a-list"),
        pytest.param('[op25b]\nallow = [25, "x", "2001:db8::1/64"]',
                     ["op25b.allow: addresses are strings, got 25; bad address 'x'; "
                      "host bits set in 2001:db8::1/64"], id="allow-several"),
        pytest.param('[interfaces]\naccess = "eth0"',
                     ["interfaces.access: must be a list, got 'eth0'"], id="ifaces-not-a-list"),
        pytest.param('[interfaces]\naccess = ["eth/0"]',
                     ["interfaces.access: bad interface name 'eth/0' (no '/', ':' or "
                      "whitespace)"], id="iface-slash"),
        pytest.param('[interfaces]\naccess = ["eth 0"]',
                     ["interfaces.access: bad interface name 'eth 0' (no '/', ':' or "
                      "whitespace)"], id="iface-space"),
        pytest.param('[interfaces]\ncore = ["eth0:1"]',
                     ["interfaces.core: bad interface name 'eth0:1' (no '/', ':' or "
                      "whitespace)"], id="iface-colon"),
        pytest.param('[interfaces]\ncore = [".."]',
                     ["interfaces.core: bad interface name '..' (no '/', ':' or whitespace)"],
                     id="iface-dotdot"),
        pytest.param('[interfaces]\ncore = [""]',
                     ["interfaces.core: bad interface name '' (1..15 characters)"],
                     id="iface-empty"),
        pytest.param('[interfaces]\ncore = ["abcdefghijklmnop"]',
                     ["interfaces.core: bad interface name 'abcdefghijklmnop' (1..15 "
                      "characters)"], id="iface-16-chars"),
        pytest.param('[interfaces]\ncore = [1]',
                     ["interfaces.core: interface names are strings, got 1"], id="iface-int"),
        pytest.param('[interfaces]\ncore = ["eth0", "eth0"]',
                     ["interfaces.core: 'eth0' is listed twice"], id="iface-twice"),
        pytest.param('[interfaces]\naccess = ["eth0", "eth1"]\ncore = ["eth1", "eth0"]',
                     ["interfaces.core: 'eth0' is also an access interface",
                      "interfaces.core: 'eth1' is also an access interface"],
                     id="iface-both-roles"),
        pytest.param('[limits]\nallow = 2\n[op25b]\nallow = ["192.0.2.1", "192.0.2.2"]\n'
                     '[suspend]\nallow = ["192.0.2.3"]',
                     ["limits.allow: 2 is less than the 3 prefixes in op25b.allow and "
                      "suspend.allow, which share one map"], id="allow-map-too-small"),
        pytest.param('[limits]\nallow = 1\n[op25b]\nallow = ["192.0.2.1", "x", "192.0.2.0/24"]\n'
                     '[suspend]\nallow = ["192.0.2.1/32"]',
                     ["op25b.allow: bad address 'x'",
                      "limits.allow: 1 is less than the 2 prefixes in op25b.allow and "
                      "suspend.allow, which share one map"], id="allow-map-counts-distinct"),
        pytest.param("[op25b]\nport = 25",
                     ["op25b.port: unknown key (known: enabled, action, ipv6, allow)"],
                     id="unknown-key"),
        pytest.param("[op25b]\nEnabled = true",
                     ["op25b.Enabled: unknown key (known: enabled, action, ipv6, allow)"],
                     id="keys-are-case-sensitive"),
        pytest.param("[op25b.extra]\nx = 1",
                     ["op25b.extra: unknown key (known: enabled, action, ipv6, allow)"],
                     id="subtable"),
        pytest.param("[nocsam]\nlist = 'x'",
                     ["nocsam: unknown section (known: interfaces, op25b, ip53b, suspend, csam, "
                      "bandwidth, sources, limits, dataplane, radius, metrics, signals, abuse)"],
                     id="unknown-section"),
        pytest.param('[metrics]\nlisten = "localhost:9386"',
                     ['metrics.listen: must be "ADDRESS:PORT" or "[IPV6]:PORT", got '
                      "'localhost:9386'"], id="metrics-listen-name"),
        pytest.param('[metrics]\nlisten = "127.0.0.1:0"',
                     ['metrics.listen: must be "ADDRESS:PORT" or "[IPV6]:PORT", got '
                      "'127.0.0.1:0'"], id="metrics-listen-port"),
        pytest.param("[metrics]\nport = 9386",
                     ["metrics.port: unknown key (known: listen)"], id="metrics-unknown-key"),
        pytest.param("bypass = true",
                     ["bypass: unknown section (known: interfaces, op25b, ip53b, suspend, csam, "
                      "bandwidth, sources, limits, dataplane, radius, metrics, signals, abuse)"],
                     id="top-level-key"),
        pytest.param("op25b = true", ["op25b: must be a table ([op25b]), got true"],
                     id="section-not-a-table"),
        pytest.param("abuse = 1", ["abuse: must be tables ([[abuse]]), got 1"],
                     id="abuse-not-tables"),
        pytest.param('[[abuse]]\nname = "scan"\nsignal = "syn"\nthreshold = 500\n'
                     'action = "block"\nfor = "10"',
                     ["abuse[1] (scan).signal: must be 'scans' (distinct destinations of new "
                      "conversations) or 'smtp_blocked' (SMTP attempts OP25B stopped), got "
                      "'syn'", "abuse[1] (scan).action: must be 'notify' or 'suspend', got "
                      "'block'", "abuse[1] (scan).for: must be a duration like '30d', '12h' or "
                      "'1d12h', got '10'"], id="abuse-bad-values"),
        pytest.param('[[abuse]]\nname = "a"\nsignal = "scans"\nthreshold = 1\naction = "notify"'
                     '\n[[abuse]]\nname = "a"\nsignal = "scans"\nthreshold = "many"\n'
                     'action = "notify"\nfor = "8d"\nlimit = 2',
                     ["abuse[2] (a).limit: unknown key (known: name, signal, threshold, for, "
                      "action)", "abuse[2] (a).name: used twice", "abuse[2] (a).threshold: "
                      "must be an integer 0..4294967295 (per window), got 'many'",
                      "abuse[2] (a).for: must be at most 7d, got '8d'"], id="abuse-second"),
        pytest.param("[[abuse]]\nthreshold = 5", ["abuse[1].name: missing",
                                                 "abuse[1].signal: missing",
                                                 "abuse[1].action: missing"],
                     id="abuse-missing"),
        pytest.param("[signals]\nwindow_seconds = 30\n[bandwidth]\ntick_seconds = 60",
                     ["signals.window_seconds: 30 is shorter than bandwidth.tick_seconds (60):"
                      " the daemon moves the window on its tick"], id="window-below-tick"),
        pytest.param("[[op25b]]\nenabled = true",
                     ["op25b: must be a table ([op25b]), got [{'enabled': True}]"],
                     id="array-of-tables"),
    ],
)
def test_problem(text: str, expected: list[str]) -> None:
    assert problems_of(text) == [(None, m) for m in expected]


def test_all_problems_in_one_error() -> None:
    text = """
[interfaces]
access = ["eth0", "bad/name"]
core = ["eth0"]
hook = "ebpf"
[op25b]
action = "block"
enabled = "yes"
allow = ["192.0.2.25/24"]
colour = "red"
[limits]
hosts = 0
[nonsense]
"""
    assert [m for _, m in problems_of(text)] == [
        "interfaces.access: bad interface name 'bad/name' (no '/', ':' or whitespace)",
        "interfaces.hook: must be 'xdp' or 'tc', got 'ebpf'",
        "op25b.action: must be 'drop' or 'reject', got 'block'",
        "op25b.enabled: must be true or false, got 'yes'",
        "op25b.allow: host bits set in 192.0.2.25/24",
        "op25b.colour: unknown key (known: enabled, action, ipv6, allow)",
        "limits.hosts: must be an integer 1..16777216, got 0",
        "nonsense: unknown section (known: interfaces, op25b, ip53b, suspend, csam, bandwidth, "
        "sources, limits, dataplane, radius, metrics, signals, abuse)",
        # Cross-checked although access has a problem of its own: one round of fixes.
        "interfaces.core: 'eth0' is also an access interface",
    ]


def test_problem_capping() -> None:
    text = "[op25b]\n" + "".join(f"k{i} = 1\n" for i in range(25))
    with pytest.raises(SourceError) as info:
        parse_config(text, "x.toml")
    lines = str(info.value).split("\n")
    assert len(lines) == 21 and lines[-1] == "... and 5 more problems"
    assert lines[0] == "x.toml: op25b.k0: unknown key (known: enabled, action, ipv6, allow)"


@pytest.mark.parametrize(
    "text, line",
    [
        pytest.param("[op25b\nenabled = true", 1, id="unclosed-table"),
        pytest.param("[op25b]\nenabled = yes", 2, id="bare-word"),
        # tomllib gives no line for this one ("at end of document").
        pytest.param("[op25b]\nenabled = true\nenabled = false", None, id="repeated-key"),
        pytest.param("[op25b]\n[op25b]", 2, id="repeated-table"),
    ],
)
def test_toml_syntax_error(text: str, line: int | None) -> None:
    with pytest.raises(tomllib.TOMLDecodeError) as toml_error:
        tomllib.loads(text)
    problems = problems_of(text)
    assert problems == [(line, str(toml_error.value))]


# --- files ------------------------------------------------------------------------------------


def test_example_file() -> None:
    c = load_config(str(MAPS / "xdpzoot.toml"))
    assert c.interfaces.access == ("eth1",) and c.interfaces.core == ("eth0",)
    assert c.op25b.allow == (ipaddress.ip_network("192.0.2.25/32"),)
    assert c.suspend.allow == (ipaddress.ip_network("192.0.2.80/32"),)
    assert c.sources.subscribers == "/etc/xdpzoot/subscribers.csv"
    # Everything not marked "example" is the default.
    assert dataclasses.replace(
        c, interfaces=Config().interfaces, op25b=dataclasses.replace(c.op25b, allow=()),
        suspend=Suspend(), sources=Sources(),
        bandwidth=dataclasses.replace(c.bandwidth, rules=""),
        radius=dataclasses.replace(c.radius, client=()), abuse=(),
    ) == Config()
    assert [r.name for r in c.abuse] == ["scan"] and c.abuse[0].for_s == 600


def test_example_and_readme_cover_every_key() -> None:
    doc = tomllib.loads((MAPS / "xdpzoot.toml").read_text())
    readme = (MAPS / "README.md").read_text()
    for section, checkers in config._CHECKERS.items():
        fields = [f.name for f in dataclasses.fields(config._SECTIONS[section])]
        assert list(checkers) == fields, section
        for key in checkers:
            assert key in doc[section], f"{section}.{key} missing from maps/xdpzoot.toml"
            assert f"| `{section}.{key}` |" in readme, f"{section}.{key} missing from README"
    assert "## CSAM list" in readme


def test_missing_default_file_gives_defaults(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert load_config(None) == Config()


def test_default_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "xdpzoot.toml"
    path.write_text("[dataplane]\nmonitor = true\n")
    monkeypatch.setattr(config, "DEFAULT_PATH", str(path))
    assert load_config(None).dataplane.monitor is True
    path.write_text("[dataplane]\nmonitor = 1\n")
    with pytest.raises(SourceError) as info:
        load_config(None)
    assert info.value.path == str(path)


def test_default_path() -> None:
    assert config.DEFAULT_PATH == "/etc/xdpzoot/xdpzoot.toml"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(SourceError) as info:
        load_config(path)
    assert info.value.path == path
    assert info.value.problems == [(None, "cannot read: No such file or directory")]


def test_unreadable_default_file_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """Only absence means defaults: a default path that is a directory is a problem."""
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path))
    with pytest.raises(SourceError) as info:
        load_config(None)
    assert info.value.problems == [(None, "not a regular file (a directory)")]


def test_explicit_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[op25b]\naction = "reject"\n')
    assert load_config(str(path)).op25b.action == "reject"
    path.write_bytes(b'[op25b]\naction = "r\xe9ject"\n')
    with pytest.raises(SourceError) as info:
        load_config(str(path))
    assert info.value.problems == [(2, "not UTF-8 text: invalid continuation byte")]


def test_fast_path_is_a_control_switch() -> None:
    """fast_path is a bit of xz_control (no recompile), off by default, named in status."""
    from xdpzoot import tables
    from xdpzoot.dataplane import schema

    bit = schema.C["XZ_C_FAST_PATH"]
    assert not tables.control_flags(Config()) & bit
    flags = tables.control_flags(parse_config("[dataplane]\nfast_path = true"))
    assert flags & bit and tables.control_names(flags)["fast_path"]
    assert schema.FAST_REASONS[0] == "forwarded"
    assert {"ttl", "no_neigh", "mtu", "local", "egress", "frame", "redirect"} <= set(
        schema.FAST_REASONS)


def test_control_switches_are_distinct_bits() -> None:
    """Every XZ_C_* switch of the header is one bit of its own (two features adding a
    switch each at once must not pick the same one)."""
    from xdpzoot.dataplane import schema

    bits = {n: v for n, v in schema.C.items() if n.startswith("XZ_C_")}
    assert all(v and v & (v - 1) == 0 for v in bits.values()), bits
    assert len(set(bits.values())) == len(bits), bits
