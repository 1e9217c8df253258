"""The xdpzoot configuration file (TOML): interfaces, policy switches, sources and map sizes.

Every key is optional; ``Config()`` is the configuration of an empty file. Validation is
complete before anything is used: unknown sections or keys and bad values are collected as
problems naming ``section.key`` and raised together as one :class:`SourceError`. The keys are
documented in ``maps/README.md``; ``maps/xdpzoot.toml`` is a commented example.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xdpzoot.bandwidth.abuse import AbuseRule, parse_abuse
from xdpzoot.sources.files import SOURCE_BYTES, SourceError, parse_toml, read_source
from xdpzoot.sources.subscribers import check_network

__all__ = [
    "DEFAULT_PATH",
    "Config",
    "Bandwidth",
    "Csam",
    "Dataplane",
    "Interfaces",
    "Ip53b",
    "Limits",
    "Metrics",
    "Op25b",
    "Radius",
    "RadiusClient",
    "Signals",
    "SourceError",
    "Sources",
    "Suspend",
    "load_config",
    "parse_config",
]

DEFAULT_PATH = "/etc/xdpzoot/xdpzoot.toml"
MAX_ENTRIES = 1 << 24  # upper bound of every [limits] size: 16,777,216 map entries
IFNAMSIZ = 16  # Linux interface names hold at most IFNAMSIZ - 1 characters

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Interfaces:
    """Where the programs attach: access faces subscribers, core faces the Internet."""

    access: tuple[str, ...] = ()
    core: tuple[str, ...] = ()
    hook: str = "xdp"  # "xdp" | "tc"
    mode: str = "auto"  # XDP attach mode: "auto" | "native" | "generic"
    vmacs: tuple[str, ...] = ()  # VRRP virtual-MAC macvlans on them: the fast path's too


@dataclass(frozen=True)
class Op25b:
    """Outbound port 25 blocking for dynamic-IP subscribers."""

    enabled: bool = True
    action: str = "drop"  # "drop" | "reject" (TCP RST, so mail clients fail fast)
    ipv6: bool = True
    allow: tuple[Network, ...] = ()  # destinations still reachable on port 25


@dataclass(frozen=True)
class Ip53b:
    """Inbound port 53 blocking towards dynamic-IP subscribers (DNS amplification)."""

    enabled: bool = True
    tcp: bool = False  # also block TCP/53, not only UDP/53
    ipv6: bool = True


@dataclass(frozen=True)
class Suspend:
    """What a suspended subscriber may still reach (e.g. the support site)."""

    allow: tuple[Network, ...] = ()


@dataclass(frozen=True)
class Sources:
    """Files the control plane loads ("" = none): the subscriber table, the CSAM list."""

    subscribers: str = ""
    csam: str = ""
    max_shrink: float = 0.5  # share of the subscriber entries a load may remove (--force: any)


@dataclass(frozen=True)
class Csam:
    """What a packet to an address on the CSAM list gets."""

    action: str = "drop"  # "drop" | "reject" (TCP RST, ICMP administratively prohibited)
    core: bool = False  # also drop packets from listed addresses at core ingress
    max_shrink: float = 0.5  # share of the list in force a load may remove (--force: any)


@dataclass(frozen=True)
class Limits:
    """Map sizes, compiled into the BPF programs as -D flags; and the largest source file."""

    hosts: int = 262144  # exact subscriber addresses (hash)
    prefixes: int = 65536  # pools and static blocks (LPM trie)
    allow: int = 4096  # op25b.allow + suspend.allow prefixes (LPM trie)
    csam_hosts: int = 1048576  # CSAM list exact addresses, per generation (hash)
    csam_prefixes: int = 262144  # CSAM list prefixes, per generation (LPM trie)
    subscribers: int = 1048576  # per-subscriber state slots (rates, volume)
    flows: int = 262144  # flows watched for bulk transfers in congestion mode (LRU)
    pool_addresses: int = 262144  # state of pool addresses without an owner (LRU)
    ifindexes: int = 4096  # fast path: interfaces with an ifindex below it (devmap, MACs)
    source_bytes: int = SOURCE_BYTES  # largest source file read (list, subscribers, rules)


@dataclass(frozen=True)
class Bandwidth:
    """Bandwidth control: rates, volume rules, congestion mode, bulk flows."""

    enabled: bool = True  # enforce subscriber rates and count volume per subscriber
    burst_ms: int = 500  # burst tolerance: a policer needs about a TCP window of it
    rules: str = ""  # volume rules file ([[rule]], see maps/bandwidth.toml); "" = none
    congestion: str = "off"  # "off" | "on" | "auto"
    capacity_kbps: int = 0  # core capacity, for congestion = "auto"
    congestion_share: int = 80  # percent of capacity that counts as congested
    congestion_seconds: int = 60  # how long above (below) before switching on (off)
    hysteresis: int = 10  # switch off only below (share - hysteresis) percent
    bulk_kbps: int = 10000  # a flow above this rate ...
    bulk_seconds: int = 30  # ... for longer than this is a bulk transfer
    bulk_share: int = 50  # percent of its subscriber's rate that bulk flows share
    bulk_floor_kbps: int = 0  # bulk share of subscribers without a rate; 0 = unlimited
    tick_seconds: int = 10  # how often `xdpzoot run` reads counters and decides
    snapshot_seconds: int = 60  # how often it snapshots (and after a tick that decided)
    state: str = "/var/lib/xdpzoot/state.msgpack"  # daemon snapshot
    audit: str = "/var/log/xdpzoot/audit.jsonl"  # one JSON line per decision
    audit_retention_days: int = 180


@dataclass(frozen=True)
class Signals:
    """The abuse signals per subscriber: the scan sketch, and the window they count in."""

    scans: bool = True  # count distinct destinations of new conversations (bpf/scan.h)
    window_seconds: int = 60  # the window of the scan and blocked-SMTP signals


@dataclass(frozen=True)
class Dataplane:
    """Global switches of the data plane."""

    bypass: bool = False  # pass every packet untouched (fail-safe)
    monitor: bool = False  # count what would be dropped, drop nothing
    fast_path: bool = False  # forward passed packets from the program (fib lookup + redirect)


@dataclass(frozen=True)
class RadiusClient:
    """A NAS allowed to send accounting and CoA requests: its source prefixes and the file
    that holds the shared secret (read by the listener; the secret is never in the config)."""

    name: str
    source: tuple[Network, ...]
    secret_file: str


@dataclass(frozen=True)
class Radius:
    """The RADIUS accounting listener (sessions -> host entries of contracts) and CoA."""

    listen: str = ""  # accounting, "HOST:PORT"; "" = off
    coa_listen: str = ""  # CoA / Disconnect (RFC 5176), "HOST:PORT"; "" = off
    session_timeout: int = 3600  # seconds without an Interim-Update before a session expires
    require_message_authenticator: bool = False  # drop requests without one
    disconnect: str = "suspend"  # Disconnect-Request: "suspend" the contract | end the "session"
    state: str = "/var/lib/xdpzoot/radius.msgpack"  # session table snapshot
    client: tuple[RadiusClient, ...] = ()


@dataclass(frozen=True)
class Metrics:
    """The Prometheus endpoint of ``xdpzoot run`` (README.md, "Metrics")."""

    listen: str = "127.0.0.1:9386"  # "HOST:PORT" of the HTTP exposition; "" = off


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``Config()`` holds the defaults."""

    interfaces: Interfaces = field(default_factory=Interfaces)
    op25b: Op25b = field(default_factory=Op25b)
    ip53b: Ip53b = field(default_factory=Ip53b)
    suspend: Suspend = field(default_factory=Suspend)
    csam: Csam = field(default_factory=Csam)
    bandwidth: Bandwidth = field(default_factory=Bandwidth)
    sources: Sources = field(default_factory=Sources)
    limits: Limits = field(default_factory=Limits)
    dataplane: Dataplane = field(default_factory=Dataplane)
    radius: Radius = field(default_factory=Radius)
    metrics: Metrics = field(default_factory=Metrics)
    signals: Signals = field(default_factory=Signals)
    abuse: tuple[AbuseRule, ...] = ()  # [[abuse]]: signal over a threshold -> notify, suspend

    def defines(self) -> list[str]:
        """The bcc cflags that size the maps (see XZ_MAX_* in bpf/xdpzoot.h)."""
        return [
            f"-DXZ_MAX_HOSTS={self.limits.hosts}",
            f"-DXZ_MAX_PREFIXES={self.limits.prefixes}",
            f"-DXZ_MAX_ALLOW={self.limits.allow}",
            f"-DXZ_MAX_CSAM_HOSTS={self.limits.csam_hosts}",
            f"-DXZ_MAX_CSAM_PREFIXES={self.limits.csam_prefixes}",
            f"-DXZ_CSAM_LINE_BITS={csam_line_bits(self.limits.csam_hosts)}",
            f"-DXZ_CSAM_NET_BITS={csam_net_bits(self.limits.csam_prefixes)}",
            f"-DXZ_MAX_SUBSCRIBERS={self.limits.subscribers}",
            f"-DXZ_MAX_FLOWS={self.limits.flows}",
            f"-DXZ_MAX_POOL_ADDRS={self.limits.pool_addresses}",
            f"-DXZ_MAX_IFINDEX={self.limits.ifindexes}",
        ]


NET_WORDS_PER_PREFIX = 4   # room in the net lines, on average, for a list's IPv4 prefixes


def csam_net_bits(prefixes: int) -> int:
    """log2 of the net lines a CSAM generation of at most ``prefixes`` prefixes has: room
    for NET_WORDS_PER_PREFIX net words each (a prefix shorter than /24 is a word for each
    /24 it covers: a /22 is 4), one line per 8."""
    return csam_line_bits(NET_WORDS_PER_PREFIX * prefixes)


def csam_line_bits(n: int) -> int:
    """log2 of the lines (struct xz_csam_line) a CSAM generation of ``n`` exact addresses
    (or net words, for its net lines) gets: one per 8, rounded up to a power of two (about
    half full at most)."""
    return max(1, (-(-n // 8) - 1).bit_length())


def load_config(path: str | None) -> Config:
    """Read and validate the config file; None means DEFAULT_PATH, which may be absent.

    An absent default file gives the defaults (a fresh install runs with no config); an
    explicitly named file must exist.
    """
    if path is None:
        try:
            text = read_source(DEFAULT_PATH)
        except SourceError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return Config()
            raise
        return parse_config(text, DEFAULT_PATH)
    return parse_config(read_source(path), path)


def parse_config(text: str, path: str = "<config>") -> Config:
    """Validate TOML text as an xdpzoot config; every problem is reported in one SourceError."""
    doc = parse_toml(text, path)

    problems: list[tuple[int | None, str]] = []
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = doc.get(name, {})
        if not isinstance(table, dict):
            problems.append((None, f"{name}: must be a table ([{name}]), got {_show(table)}"))
            sections[name] = cls()
            continue
        sections[name] = _section(name, cls, table, problems)
    sections["abuse"], bad = parse_abuse(doc.get("abuse", []))
    problems.extend((None, p) for p in bad)
    for name in doc:
        if name not in _SECTIONS and name != "abuse":
            problems.append((None, f"{name}: unknown section (known: "
                             f"{', '.join(_SECTIONS)}, abuse)"))

    config = Config(**sections)
    problems.extend((None, p) for p in _cross_checks(doc, config))
    if problems:
        raise SourceError(path, problems)
    return config


# --- values ---------------------------------------------------------------------------------

# A checker returns the converted value, or raises ValueError with the problem.
Checker = Callable[[Any], Any]


def _show(value: Any) -> str:
    """A value as the message shows it: TOML-ish, short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _boolean(value: Any) -> bool:
    """A TOML boolean; "yes" or 1 are refused, as they may mean something else to the writer."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_show(value)}")
    return value


def _choice(*allowed: str) -> Checker:
    """A checker for one of a fixed set of strings."""

    def check(value: Any) -> str:
        """The value, if it is one of ``allowed``."""
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"must be {names}, got {_show(value)}")
        return value

    names = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"

    return check


def _size(value: Any) -> int:
    """A map size: a positive integer up to MAX_ENTRIES."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ENTRIES:
        raise ValueError(f"must be an integer 1..{MAX_ENTRIES}, got {_show(value)}")
    return value


def _share(value: Any) -> float:
    """A share: a number from 0 to 1."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"must be a number 0..1 (0.5 = half), got {_show(value)}")
    return float(value)


def _int(lo: int, hi: int) -> Checker:
    """A checker for an integer in lo..hi."""

    def check(value: Any) -> int:
        """The value, if it is an integer in range."""
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"must be an integer {lo}..{hi}, got {_show(value)}")
        return value

    return check


def _path(value: Any) -> str:
    """A file path, or "" for none."""
    if not isinstance(value, str):
        raise ValueError(f'must be a string (a file path, or "" for none), got {_show(value)}')
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _list(value: Any) -> list[Any]:
    """A TOML array, as a list."""
    if not isinstance(value, list):
        raise ValueError(f"must be a list, got {_show(value)}")
    return value


def _interfaces(value: Any) -> tuple[str, ...]:
    """Linux interface names, as the kernel's dev_valid_name() accepts them, without repeats."""
    problems = []
    seen: set[str] = set()
    for name in _list(value):
        if not isinstance(name, str):
            problems.append(f"interface names are strings, got {_show(name)}")
        elif not 0 < len(name) < IFNAMSIZ:
            problems.append(f"bad interface name {name!r} (1..{IFNAMSIZ - 1} characters)")
        elif name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
            problems.append(f"bad interface name {name!r} (no '/', ':' or whitespace)")
        elif name in seen:
            problems.append(f"{name!r} is listed twice")
        else:
            seen.add(name)
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(value)


def _networks(value: Any) -> tuple[Network, ...]:
    """Addresses or prefixes (strict: no host bits), as networks."""
    problems = []
    out = []
    for item in _list(value):
        if not isinstance(item, str):
            problems.append(f"addresses are strings, got {_show(item)}")
            continue
        got = check_network(item.strip())
        if isinstance(got, str):
            problems.append(got)
        else:
            out.append(got)
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(out)


def listen_address(value: Any) -> tuple[str, int] | None:
    """``"HOST:PORT"`` (IPv6 as ``"[ADDR]:PORT"``) as (host, port), or None for ""."""
    if not isinstance(value, str):
        raise ValueError(f'must be a string "HOST:PORT" (or "" for off), got {_show(value)}')
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if not sep or ip is None or ip.version != version or not (
            port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f'must be "ADDRESS:PORT" or "[IPV6]:PORT", got {_show(value)}')
    return str(ip), int(port)


def _listen(value: Any) -> str:
    """A listen address, kept as written (see listen_address)."""
    listen_address(value)
    return value


_CLIENT_KEYS = ("name", "source", "secret_file")
# A session's NAS is "client/NAS identity": a name with "/" could pass for another client's.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _clients(value: Any) -> tuple[RadiusClient, ...]:
    """``[[radius.client]]`` tables: a unique name, source prefixes, a secret file path."""
    problems = []
    out = []
    names: set[str] = set()
    for i, table in enumerate(_list(value), 1):
        where = f"[{i}]"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table ([[radius.client]])")
            continue
        unknown = sorted(set(table) - set(_CLIENT_KEYS))
        missing = [k for k in _CLIENT_KEYS if k not in table]
        for k in unknown:
            problems.append(f"{where}.{k}: unknown key (known: {', '.join(_CLIENT_KEYS)})")
        for k in missing:
            problems.append(f"{where}.{k}: missing")
        if unknown or missing:
            continue
        name, secret = table["name"], table["secret_file"]
        if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
            problems.append(f"{where}.name: must be 1..64 letters, digits, '-', '_' or '.', "
                            f"got {_show(name)}")
            continue
        where = f"[{i}] ({name})"
        if name in names:
            problems.append(f"{where}.name: used twice")
        names.add(name)
        try:
            source = _networks(table["source"])
        except ValueError as e:
            problems.append(f"{where}.source: {e}")
            continue
        if not source:
            problems.append(f"{where}.source: must list at least one prefix")
        if not isinstance(secret, str) or not secret or "\0" in secret:
            problems.append(f"{where}.secret_file: must be the path of the file that holds "
                            "the shared secret (never the secret itself)")
            continue
        out.append(RadiusClient(name, source, secret))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(out)


_CHECKERS: dict[str, dict[str, Checker]] = {
    "interfaces": {
        "access": _interfaces,
        "core": _interfaces,
        "hook": _choice("xdp", "tc"),
        "mode": _choice("auto", "native", "generic"),
        "vmacs": _interfaces,
    },
    "op25b": {
        "enabled": _boolean,
        "action": _choice("drop", "reject"),
        "ipv6": _boolean,
        "allow": _networks,
    },
    "ip53b": {"enabled": _boolean, "tcp": _boolean, "ipv6": _boolean},
    "suspend": {"allow": _networks},
    "csam": {"action": _choice("drop", "reject"), "core": _boolean, "max_shrink": _share},
    "bandwidth": {
        "enabled": _boolean, "burst_ms": _int(1, 10000), "rules": _path,
        "congestion": _choice("off", "on", "auto"), "capacity_kbps": _int(0, 1 << 31),
        "congestion_share": _int(1, 100), "congestion_seconds": _int(1, 86400),
        "hysteresis": _int(0, 99), "bulk_kbps": _int(1, 1 << 31),
        "bulk_seconds": _int(1, 86400), "bulk_share": _int(1, 100),
        "bulk_floor_kbps": _int(0, 1 << 31), "tick_seconds": _int(1, 3600),
        "snapshot_seconds": _int(1, 86400), "state": _path, "audit": _path,
        "audit_retention_days": _int(1, 3650),
    },
    "sources": {"subscribers": _path, "csam": _path, "max_shrink": _share},
    "limits": {"hosts": _size, "prefixes": _size, "allow": _size, "csam_hosts": _size,
               "csam_prefixes": _size, "subscribers": _size, "flows": _size,
               "pool_addresses": _size, "ifindexes": _size,
               "source_bytes": _int(1, 1 << 40)},
    "dataplane": {"bypass": _boolean, "monitor": _boolean, "fast_path": _boolean},
    "signals": {"scans": _boolean, "window_seconds": _int(10, 86400)},
    "radius": {
        "listen": _listen, "coa_listen": _listen, "session_timeout": _int(10, 86400 * 7),
        "require_message_authenticator": _boolean,
        "disconnect": _choice("suspend", "session"), "state": _path, "client": _clients,
    },
    "metrics": {"listen": _listen},
}
_SECTIONS: dict[str, type[Any]] = {
    "interfaces": Interfaces,
    "op25b": Op25b,
    "ip53b": Ip53b,
    "suspend": Suspend,
    "csam": Csam,
    "bandwidth": Bandwidth,
    "sources": Sources,
    "limits": Limits,
    "dataplane": Dataplane,
    "radius": Radius,
    "metrics": Metrics,
    "signals": Signals,
}


def _section(name: str, cls: type[Any], table: dict[str, Any], problems: list[Any]) -> Any:
    """One section's dataclass from its table; bad keys become problems and keep defaults."""
    checkers = _CHECKERS[name]
    values = {}
    for key, value in table.items():
        check = checkers.get(key)
        if check is None:
            problems.append((None, f"{name}.{key}: unknown key (known: {', '.join(checkers)})"))
            continue
        try:
            values[key] = check(value)
        except ValueError as e:
            problems.append((None, f"{name}.{key}: {e}"))
    return cls(**values)


def _cross_checks(doc: dict[str, Any], config: Config) -> list[str]:
    """Problems that involve more than one key.

    They look at the raw values where those are usable, so that a key that has a problem of
    its own is still cross-checked and the file needs only one round of fixes.
    """

    def raw(section: str, key: str, default: Any) -> Any:
        """The value in the file if it has the right shape, else the one in ``config``."""
        table = doc.get(section)
        value = table.get(key, default) if isinstance(table, dict) else default
        return value if isinstance(value, type(default)) else default

    problems = []
    access = {
        n for n in raw("interfaces", "access", list(config.interfaces.access)) if isinstance(n, str)
    }
    core = {
        n for n in raw("interfaces", "core", list(config.interfaces.core)) if isinstance(n, str)
    }
    for name in sorted(access & core):
        problems.append(f"interfaces.core: {name!r} is also an access interface")
    # One map entry per distinct prefix: a prefix in both lists takes one entry.
    listed = [
        check_network(item.strip())
        for section in ("op25b", "suspend")
        for item in raw(section, "allow", [str(n) for n in getattr(config, section).allow])
        if isinstance(item, str)
    ]
    allow = len({n for n in listed if not isinstance(n, str)})
    if allow > config.limits.allow:
        problems.append(
            f"limits.allow: {config.limits.allow} is less than the {allow} prefixes in "
            "op25b.allow and suspend.allow, which share one map"
        )
    window = raw("signals", "window_seconds", config.signals.window_seconds)
    tick = raw("bandwidth", "tick_seconds", config.bandwidth.tick_seconds)
    if isinstance(window, int) and isinstance(tick, int) and window < tick:
        problems.append(f"signals.window_seconds: {window} is shorter than "
                        f"bandwidth.tick_seconds ({tick}): the daemon moves the window on "
                        "its tick")
    radius = doc.get("radius")
    if isinstance(radius, dict) and (radius.get("listen") or radius.get("coa_listen")) \
            and not radius.get("client"):
        problems.append("radius.client: a listener is on but no [[radius.client]] may send")
    return problems
