"""What the maps should hold, as plain Python values, and the lookups the data plane does.

Addresses are 16 bytes (IPv4 mapped into ::ffff:0:0/96) and prefixes are
``(prefixlen, address)`` with the length counted over those 128 bits, exactly as
the BPF maps key them (see bpf/xdpzoot.h).
"""

from __future__ import annotations

import ipaddress
import operator
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import starmap
from typing import NamedTuple

from xdpzoot.dataplane import schema
from xdpzoot.dataplane.layout import CLASS, LPM_KEY, WORDS, ClassTable, Entry, class_word
from xdpzoot.sources.files import SOURCE_BYTES
from xdpzoot.sources.subscribers import Columns, read_columns

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Key = tuple[int, bytes]

_V4MAPPED = bytes(10) + b"\xff\xff"


def addr16(ip: IPAddress | str) -> bytes:
    """The 16-byte map form of an address."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    return _V4MAPPED + ip.packed if ip.version == 4 else ip.packed


def key_of(net: IPNetwork) -> Key:
    """The LPM key of a network."""
    extra = 96 if net.version == 4 else 0
    return net.prefixlen + extra, addr16(net.network_address)


def ip_of(a: bytes) -> IPAddress:
    """The address back from its 16-byte map form."""
    if a[:12] == _V4MAPPED:
        return ipaddress.IPv4Address(a[12:])
    return ipaddress.IPv6Address(a)


def pool_unit(a: bytes) -> str:
    """What a pool address's own state (xz_pool_state) counts, as text: an IPv4 address,
    or an IPv6 address's /64."""
    return str(ip_of(a)) if a[:12] == _V4MAPPED else f"{ipaddress.IPv6Address(a)}/64"


def net_of(key: Key) -> IPNetwork:
    """The network back from its LPM key."""
    plen, a = key
    ip = ip_of(a)
    return ipaddress.ip_network((ip, plen - 96 if ip.version == 4 else plen))


def is_host(net: IPNetwork) -> bool:
    """A single address (/32, /128): a host entry rather than a prefix."""
    return net.prefixlen == net.max_prefixlen


def covers(key: Key, a: bytes) -> bool:
    """True when the prefix ``key`` contains the address ``a``."""
    plen, net = key
    shift = 128 - plen
    return int.from_bytes(net, "big") >> shift == int.from_bytes(a, "big") >> shift


@dataclass
class Tables:
    """The subscriber and allow-list maps as dicts, with the data plane's lookups."""

    hosts: dict[bytes, Entry] = field(default_factory=dict)
    prefixes: dict[Key, Entry] = field(default_factory=dict)
    allow: dict[Key, int] = field(default_factory=dict)
    csam_hosts: set[bytes] = field(default_factory=set)
    csam_prefixes: set[Key] = field(default_factory=set)

    def classify(self, a: bytes) -> Entry | None:
        """Most specific entry wins: host entry, else the longest covering prefix."""
        if a in self.hosts:
            return self.hosts[a]
        return _longest(self.prefixes, a)

    def allowed(self, a: bytes) -> int:
        bits = _longest(self.allow, a)
        return bits or 0

    def csam(self, a: bytes) -> bool:
        return a in self.csam_hosts or any(covers(k, a) for k in self.csam_prefixes)


def _longest(d: dict[Key, object], a: bytes):
    best, best_len = None, -1
    for key, v in d.items():
        if key[0] > best_len and covers(key, a):
            best, best_len = v, key[0]
    return best


class Loaded(NamedTuple):
    """A subscriber file as map contents: rows with an address, host and prefix entries
    (slots not assigned yet), and the contracts of its users (user -> the entry its
    sessions get, slot 0)."""

    rows: int
    hosts: ClassTable
    prefixes: ClassTable
    contracts: dict[str, Entry]


def read_subscribers(path: str, strict: bool = False, limit: int = SOURCE_BYTES) -> Loaded:
    """The subscriber file at ``path`` (at most ``limit`` bytes) validated
    (sources.read_columns) and made into map contents."""
    hosts, prefixes, contracts = read_columns(path, strict, limit)
    return Loaded(len(hosts.keys) + len(prefixes.keys), *class_tables(hosts, prefixes),
                  contract_entries(contracts))


def contract_entries(contracts: Columns) -> dict[str, Entry]:
    """The entry each user's sessions get: its contract's id, type, flags and rates
    (``contracts``: Parsed.contracts, where a user's last row is its contract, the one
    the dict keeps)."""
    flags = {f: sum(schema.FLAGS[x] for x in f) for f in set(contracts.flags)}
    return dict(zip(contracts.keys, map(Entry, contracts.ids,
                                        map(schema.TYPES.__getitem__, contracts.types),
                                        map(flags.__getitem__, contracts.flags),
                                        contracts.up, contracts.down), strict=True))


def class_tables(hosts: Columns, prefixes: Columns) -> tuple[ClassTable, ClassTable]:
    """Host and prefix map contents from rows in columns, slots not assigned yet (0).

    A full-length network (/32, /128) is a host entry; anything shorter goes into
    the trie, where the longest prefix wins and host entries win over all.
    """
    return (_class_table(hosts.keys, hosts),
            _class_table(list(starmap(LPM_KEY.pack, prefixes.keys)), prefixes))


def _class_table(keys: list[bytes], c: Columns) -> ClassTable:
    """The struct xz_class of each row, filled a column (word) at a time."""
    values = array("I", bytes(CLASS.size * len(keys)))
    type_word = {t: class_word(schema.TYPES[t], 0) for t in set(c.types)}
    flag_word = {f: class_word(0, sum(schema.FLAGS[x] for x in f)) for f in set(c.flags)}
    values[0::WORDS] = array("I", c.ids)
    values[1::WORDS] = _words(c.types, type_word)
    if any(flag_word.values()):
        values[1::WORDS] = array("I", map(operator.or_, values[1::WORDS],
                                          _words(c.flags, flag_word)))
    for word, rates in ((2, c.up), (3, c.down)):
        if any(rates):
            values[word::WORDS] = array("I", rates)
    return ClassTable(keys, values)


def _words(column: list, word: dict) -> array:
    """The word of each row's value in ``column`` (a column of few distinct values)."""
    if len(word) == 1:
        return array("I", word.values()) * len(column)
    return array("I", map(word.__getitem__, column))


def allow_table(op25b: Iterable[IPNetwork], suspend: Iterable[IPNetwork]) -> dict[Key, int]:
    """Allow-list trie contents. The trie answers with the longest match only, so each
    prefix carries the bits of every listed prefix that covers it too."""
    bits: dict[Key, int] = {}
    for nets, bit in ((op25b, schema.C["XZ_ALLOW_OP25B"]),
                      (suspend, schema.C["XZ_ALLOW_SUSPEND"])):
        for n in nets:
            k = key_of(n)
            bits[k] = bits.get(k, 0) | bit
    return {k: b | _covering_bits(bits, k) for k, b in bits.items()}


def _covering_bits(bits: dict[Key, int], key: Key) -> int:
    out = 0
    for k, b in bits.items():
        if k[0] < key[0] and covers(k, key[1]):
            out |= b
    return out


def control_flags(cfg) -> int:
    """The xz_control switches from a config.Config."""
    c = schema.C
    f = c["XZ_C_LOADED"]
    on = [
        (cfg.dataplane.bypass, "XZ_C_BYPASS"),
        (cfg.dataplane.monitor, "XZ_C_MONITOR"),
        (cfg.op25b.enabled, "XZ_C_OP25B"),
        (cfg.op25b.ipv6, "XZ_C_OP25B_V6"),
        (cfg.op25b.action == "reject", "XZ_C_OP25B_REJECT"),
        (cfg.ip53b.enabled, "XZ_C_IP53B"),
        (cfg.ip53b.tcp, "XZ_C_IP53B_TCP"),
        (cfg.ip53b.ipv6, "XZ_C_IP53B_V6"),
        (cfg.csam.action == "reject", "XZ_C_CSAM_REJECT"),
        (cfg.csam.core, "XZ_C_CSAM_CORE"),
        (cfg.bandwidth.enabled, "XZ_C_RATES"),
        (cfg.bandwidth.congestion == "on", "XZ_C_CONGESTION"),
        (cfg.dataplane.fast_path, "XZ_C_FAST_PATH"),
        (cfg.signals.scans, "XZ_C_SCANS"),
    ]
    for cond, name in on:
        if cond:
            f |= c[name]
    return f


CONGESTION = {"off": schema.C["XZ_CONGESTION_OFF"], "on": schema.C["XZ_CONGESTION_ON"],
              "auto": schema.C["XZ_CONGESTION_AUTO"]}


def control_params(cfg) -> dict[str, int]:
    """The numeric fields of xz_control from a config.Config."""
    b = cfg.bandwidth
    return {"burst_us": b.burst_ms * 1000, "bulk_kbps": b.bulk_kbps,
            "bulk_ms": b.bulk_seconds * 1000, "bulk_share": b.bulk_share,
            "bulk_floor_kbps": b.bulk_floor_kbps}


def control_names(flags: int) -> dict[str, bool]:
    """The switches by name, for status output."""
    names = ("bypass", "monitor", "op25b", "op25b_v6", "op25b_reject", "ip53b", "ip53b_tcp",
             "ip53b_v6", "csam_reject", "csam_core", "rates", "congestion", "throttles",
             "fast_path", "trace", "scans")
    return {n: bool(flags & schema.C["XZ_C_" + n.upper()]) for n in names}
