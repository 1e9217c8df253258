"""The subscriber IP-type database: a CSV file saying which addresses are dynamic or static.

One row per address or prefix. A dynamic row with a prefix is a pool in which every address is
its own subscriber; a static row with a prefix is one subscriber owning every address in it. The
most specific row wins, so a static block may sit inside a dynamic pool. The format is documented
in ``maps/README.md``.

Parsing is pure: it reads the named file and nothing else, validates every line, and either
returns all rows or raises one :class:`SourceError` listing every problem, so an operator fixes
the file in one pass. Rows are split without the csv machinery unless they contain a quote,
addresses are parsed by inet_pton and built without ``ipaddress`` re-validating them, the
cyclic garbage collector is paused during the parse, and overlaps are found by one sort and a
sweep.

Loading takes columns (:func:`parse_columns`): a plain file (printable ASCII, no quotes,
no blanks), with a ``user`` column or without, is validated a column at a time, a
1,000,000-row file in about a second; any other file, and any file with a problem, goes
through the row-by-row parser, whose answer (rows, or every problem) is the one that
counts.
"""

from __future__ import annotations

import csv
import ipaddress
import operator
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import compress, repeat
from typing import Any, NamedTuple

from xdpzoot.sources.files import SOURCE_BYTES, SourceError, both, paused_gc, read_source

__all__ = [
    "FLAGS",
    "Columns",
    "Parsed",
    "SourceError",
    "Subscriber",
    "check_network",
    "columns_of",
    "parse_columns",
    "parse_subscribers",
    "parse_subscribers_text",
    "read_columns",
    "read_plans",
]

FLAGS = ("suspended", "op25b_exempt", "ip53b_exempt")
TYPES = ("dynamic", "static")
REQUIRED_COLUMNS = ("subscriber", "address", "type")
OPTIONAL_COLUMNS = ("up_kbps", "down_kbps", "flags", "plan", "user")
U32_MAX = 0xFFFF_FFFF
USER_MAX = 253   # octets of a RADIUS User-Name (RFC 2865: attribute values up to 253)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Problem = tuple[int | None, str]


@dataclass(frozen=True, slots=True)
class Subscriber:
    """One row of the subscriber table: who owns which addresses, and how they are treated."""

    line: int
    sub_id: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None   # None: a RADIUS contract
    type: str  # "dynamic" | "static"
    up_kbps: int  # 0 = unlimited
    down_kbps: int  # 0 = unlimited
    flags: frozenset[str]
    plan: str = ""  # service plan name, for the volume rules' `plans` (not in the kernel)
    user: str = ""  # RADIUS User-Name of the contract ("" = none)


class Columns(NamedTuple):
    """Valid rows in bulk, a list per field: row ``i`` is ``keys[i]``, ``ids[i]``, ... in no
    particular order. A key is the 16-byte address (IPv4 mapped into ::ffff:0:0/96, as the
    maps hold it) of a row of one address, ``(prefixlen over those 128 bits, address)`` of
    a prefix row."""

    keys: list
    ids: list[int]
    types: list[str]
    up: list[int]
    down: list[int]
    flags: list[frozenset[str]]


class Parsed(NamedTuple):
    """A subscriber file: its rows with an address as columns (hosts, prefixes), and the
    rows of its RADIUS contracts (the user as the key). A user's sessions get the
    treatment of its last row in ``contracts``, as ``dict(zip(contracts.keys, ...))``
    keeps it: that is the user's row without an address, else its first row (the rows
    with an address come in reverse file order, then the rows without one). No row per
    user alone: that would cost a million-user file a second pass over all of them."""

    hosts: Columns
    prefixes: Columns
    contracts: Columns


def parse_subscribers(path: str, strict: bool = False,
                      limit: int = SOURCE_BYTES) -> list[Subscriber]:
    """Load and validate the subscriber CSV at ``path`` (see :func:`parse_subscribers_text`)."""
    return parse_subscribers_text(read_source(path, limit), path, strict)


def read_plans(path: str, limit: int = SOURCE_BYTES) -> dict[int, str]:
    """Service plan by subscriber id, from the optional ``plan`` column of the subscriber
    file (for the volume rules' ``plans``): a file without it is not parsed again."""
    text = read_source(path, limit)
    header = next((line for line in text.split("\n") if line.strip() and line[0] != "#"), "")
    if "plan" not in _header(1, header)[0]:
        return {}
    return {r.sub_id: r.plan for r in parse_subscribers_text(text, path) if r.plan}


# --- fields ---------------------------------------------------------------------------------

_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_pton = socket.inet_pton
_from_bytes = int.from_bytes
_new = object.__new__


def _network_factory(version: int) -> Callable[[int, int], Network]:
    """A constructor ``(network int, prefixlen) -> IPv4Network | IPv6Network`` for valid input.

    ``ipaddress`` spends most of its time re-validating what the caller already checked; with
    a million rows that is the largest cost of a parse. The fast constructor fills in the same
    attributes ``IPv4Network.__init__`` / ``IPv6Network.__init__`` set. It is checked against
    the real constructor here, at import; if this Python's ``ipaddress`` differs in any way,
    the real constructor is returned instead, so the result is never a different object.
    """
    net_cls: type[Any]
    addr_cls: type[Any]
    if version == 4:
        net_cls, addr_cls, bits = ipaddress.IPv4Network, ipaddress.IPv4Address, 32
    else:
        net_cls, addr_cls, bits = ipaddress.IPv6Network, ipaddress.IPv6Address, 128
    masks = [net_cls((0, plen)).netmask for plen in range(bits + 1)]
    scoped = version == 6

    def fast(value: int, plen: int) -> Network:
        """Build the network; ``value`` and ``plen`` must already be valid and aligned."""
        addr = _new(addr_cls)
        addr._ip = value
        if scoped:
            addr._scope_id = None
        net = _new(net_cls)
        net.network_address = addr
        net.netmask = masks[plen]
        net._prefixlen = plen
        if plen == bits:
            net.hosts = [addr].copy  # what __init__ does for a single address
        elif plen == bits - 1:
            net.hosts = net.__iter__  # and for a /31 or /127
        return net  # type: ignore[no-any-return]

    def slow(value: int, plen: int) -> Network:
        """The real constructor, in case the fast one does not match it."""
        return net_cls((value, plen))  # type: ignore[no-any-return]

    top = (1 << bits) - 1
    try:
        for plen in (0, 1, 8, bits // 2, bits - 2, bits - 1, bits):
            for value in (0, top, 0x5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A & top):
                value &= top ^ ((1 << (bits - plen)) - 1)
                a, b = fast(value, plen), net_cls((value, plen))
                same = (
                    vars(a).keys() == vars(b).keys()
                    and a == b
                    and hash(a) == hash(b)
                    and repr(a) == repr(b)
                    and a.broadcast_address == b.broadcast_address
                    and a.network_address.__reduce__() == b.network_address.__reduce__()
                    and (plen < bits - 1 or list(a.hosts()) == list(b.hosts()))
                )
                if not same:
                    return slow
    except (AttributeError, TypeError, ValueError):
        return slow
    return fast


_NET = {4: _network_factory(4), 6: _network_factory(6)}
_NET4 = _NET[4]
_NET6 = _NET[6]


def _u32(text: str) -> int | None:
    """ASCII decimal 0..2**32-1, or None: int() alone would accept '+5', '1_0' and '٣'."""
    if text.isdigit() and text.isascii() and len(text) <= 10:
        value = int(text)
        if value <= U32_MAX:
            return value
    return None


_V4MAPPED = 0xFFFF << 32   # ::ffff:0:0/96, where the maps keep IPv4 addresses
V4MAPPED_PROBLEM = "IPv6 entry overlapping ::ffff:0:0/96 (write IPv4 addresses as IPv4)"


def overlaps_v4mapped(value: int, plen: int) -> bool:
    """Whether the IPv6 prefix ``value/plen`` shares addresses with ::ffff:0:0/96: the maps
    hold IPv4 there, so such an entry would match IPv4 packets."""
    return value < _V4MAPPED + (1 << 32) and _V4MAPPED < value + (1 << (128 - plen))


def _parse_network(text: str) -> tuple[int, int, int] | str:
    """``(version, network int, prefixlen)`` of an address or prefix, or the problem with it.
    IPv6 entries may not reach into ::ffff:0:0/96 (see overlaps_v4mapped)."""
    got = _parse_network_any(text)
    if not isinstance(got, str) and got[0] == 6 and overlaps_v4mapped(got[1], got[2]):
        return f"{V4MAPPED_PROBLEM}: {text}"
    return got


def _parse_network_any(text: str) -> tuple[int, int, int] | str:
    """``(version, network int, prefixlen)`` of an address or prefix, or the problem with it.

    The address part is parsed by inet_pton, which accepts the same spellings as ``ipaddress``
    (a test compares them) and is much faster; whatever it refuses goes to
    ``ipaddress.ip_network(strict=True)`` for the verdict, so messages stay the same.
    """
    if "%" in text:
        return f"bad address {text!r} (scoped addresses are not allowed)"
    addr, slash, length = text.partition("/")
    try:
        if ":" in addr:
            version, value, bits = 6, _from_bytes(_pton(_AF_INET6, addr), "big"), 128
        else:
            version, value, bits = 4, _from_bytes(_pton(_AF_INET, addr), "big"), 32
        if not slash:
            return version, value, bits
        if length.isdigit() and length.isascii() and len(length) <= 3:
            plen = int(length)
            if plen <= bits:
                if value & ((1 << (bits - plen)) - 1):
                    return f"host bits set in {text}"
                return version, value, plen
    except (OSError, ValueError):
        pass  # not a spelling the fast path knows: ipaddress decides
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    else:
        return net.version, int(net.network_address), net.prefixlen
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return f"bad address {text!r}" if text else "empty address"
    return f"host bits set in {text}"


def check_network(text: str) -> Network | str:
    """The address or prefix in ``text``, or the problem with it as a string.

    Every source (config allow-lists, subscriber table) checks addresses with this, so the
    messages are the same everywhere: "bad address 'x'", "host bits set in a.b.c.d/n".
    A bare address is a /32 or /128. Scoped IPv6 addresses (``fe80::1%eth0``) mean nothing
    to the data plane and are refused.
    """
    got = _parse_network(text)
    if isinstance(got, str):
        return got
    version, value, plen = got
    return _NET[version](value, plen)


_FLAG_SET = frozenset(FLAGS)
_NO_FLAGS: frozenset[str] = frozenset()
_flag_cache: dict[str, frozenset[str] | str] = {"": _NO_FLAGS}


def _flags(text: str) -> frozenset[str] | str:
    """The flag set named by ``a;b``, or the problem as a string (cached: few combinations)."""
    got = _flag_cache.get(text)
    if got is not None:
        return got
    names = [n.strip() for n in text.split(";")]
    names = [n for n in names if n]
    bad = [n for n in names if n not in _FLAG_SET]
    result: frozenset[str] | str
    if bad:
        result = (
            f"unknown flag{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}"
            f" (known: {', '.join(FLAGS)})"
        )
    else:
        result = frozenset(names)
    if len(_flag_cache) < 4096:
        _flag_cache[text] = result
    return result


def _bad_rate(column: str, raw: str) -> str:
    """The message for a rate that is not an unsigned 32-bit decimal."""
    return f"bad rate in {column}: {raw!r} (kbit/s 0..{U32_MAX}; 0 or empty = unlimited)"


# --- rows -----------------------------------------------------------------------------------


def _split(line: str) -> list[str]:
    """Fields of one CSV line; a line with a quote goes through the csv module.

    Every record is one physical line (no field here can hold a newline), which keeps line
    numbers exact. A broken quote raises csv.Error.
    """
    if '"' in line:
        return next(csv.reader([line], strict=True))
    return line.split(",")


def _header(number: int, line: str) -> tuple[dict[str, int], int, list[Problem]]:
    """Column positions by name, the field count, and the header's problems."""
    problems: list[Problem] = []
    try:
        names = [n.strip() for n in _split(line)]
    except csv.Error as e:
        return {}, 0, [(number, f"bad CSV quoting in header: {e}")]
    known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    columns: dict[str, int] = {}
    for i, name in enumerate(names):
        if name not in known:
            problems.append((number, f"unknown column {name!r} (known: {', '.join(known)})"))
        elif name in columns:
            problems.append((number, f"duplicate column {name!r}"))
        else:
            columns[name] = i
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            problems.append((number, f"missing column {name!r}"))
    return columns, len(names), problems


def parse_subscribers_text(
    text: str, path: str = "<subscribers>", strict: bool = False
) -> list[Subscriber]:
    """Validate a subscriber CSV and return its rows in file order.

    Every line is checked and every problem collected before one SourceError is raised, so
    no problem hides behind another: a row whose address parses takes part in the duplicate
    (and, with ``strict``, overlap) checks even when its other fields are bad, and a missing
    column does not stop the others from being checked. Only a row with the wrong number of
    fields is not looked into, as its fields cannot be told apart. ``strict`` also forbids a
    row inside another row's prefix, which is legal (most specific wins) otherwise.
    """
    with paused_gc():
        return _parse(text, path, strict)


def _parse(text: str, path: str, strict: bool) -> list[Subscriber]:
    """The body of :func:`parse_subscribers_text`, one pass over the lines."""
    if text.startswith("\ufeff"):
        text = text[1:]
    # Lines end at "\n" only ("\r" is stripped with the other whitespace), so numbers match
    # what editors show; str.splitlines() would also split at form feeds and U+2028.
    lines = text.split("\n")
    header = next(
        (n for n, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")), 0
    )
    if not header:
        raise SourceError(path, [(None, "no header row (columns: subscriber,address,type)")])
    columns, width, problems = _header(header, lines[header - 1])
    if width == 0:
        raise SourceError(path, problems)

    i_sub = columns.get("subscriber")
    i_addr = columns.get("address")
    i_type = columns.get("type")
    i_up = columns.get("up_kbps")
    i_down = columns.get("down_kbps")
    i_flags = columns.get("flags")
    i_plan = columns.get("plan")
    i_user = columns.get("user")

    rows: list[Subscriber] = []
    # (version, network int, prefixlen) -> line of its first row; also feeds the overlap sweep.
    first: dict[tuple[int, int, int], int] = {}
    user_of: dict[str, tuple[int, int]] = {}   # user -> (subscriber id, line)
    id_user: dict[int, tuple[str, int]] = {}   # subscriber id -> (its user, line)
    contract_line: dict[str, int] = {}         # user -> line of its row without an address
    pool_line: dict[int, int] = {}             # id of a dynamic prefix row -> its line
    u32 = _u32
    parse_network = _parse_network
    make_network = _NET
    flags_of = _flags
    types = TYPES
    no_flags = _NO_FLAGS
    for number, line in enumerate(lines[header:], header + 1):
        if not line or line[0] == "#" or line.isspace():
            continue
        try:
            fields = line.split(",") if '"' not in line else _split(line)
        except csv.Error as e:
            problems.append((number, f"bad CSV quoting: {e}"))
            continue
        if len(fields) != width:
            problems.append((number, f"expected {width} fields, got {len(fields)}"))
            continue
        row_problems: list[str] = []

        sub_id = 0
        if i_sub is not None:
            raw = fields[i_sub].strip()
            got_id = u32(raw)
            if not got_id:  # None or 0
                row_problems.append(f"bad subscriber id {raw!r} (must be 1..{U32_MAX})")
            else:
                sub_id = got_id

        user = fields[i_user].strip() if i_user is not None else ""
        if user:
            row_problems.extend(_user_problems(user, sub_id, number, user_of, id_user))

        key: tuple[int, int, int] | None = None
        contract = False   # a row of a user without an address
        if i_addr is not None:
            text = fields[i_addr].strip()
            got_net = parse_network(text) if text or not user else None
            if got_net is None:
                contract = True
                seen = contract_line.setdefault(user, number)
                if seen != number:
                    row_problems.append(f"duplicate of line {seen}")
            elif isinstance(got_net, str):
                row_problems.append(got_net if text or i_user is None else
                                    "empty address (only a row with a user may have none)")
            else:
                seen = first.get(got_net)
                if seen is None:
                    first[got_net] = number
                    key = got_net
                else:
                    row_problems.append(f"duplicate of line {seen}")

        kind = "dynamic"
        if i_type is not None:
            kind = fields[i_type].strip()
            if kind not in types:
                row_problems.append(f"unknown type {kind!r} (must be 'dynamic' or 'static')")
        if key is not None and kind == "dynamic" and key[2] < (32 if key[0] == 4 else 128):
            pool_line.setdefault(sub_id, number)
            if user:
                row_problems.append("a pool (a dynamic row with a prefix) has no user: each "
                                    "of its addresses is a subscriber of its own")

        up = down = 0
        if i_up is not None:
            raw = fields[i_up].strip()
            got_rate = u32(raw) if raw else 0
            if got_rate is None:
                row_problems.append(_bad_rate("up_kbps", raw))
            else:
                up = got_rate
        if i_down is not None:
            raw = fields[i_down].strip()
            got_rate = u32(raw) if raw else 0
            if got_rate is None:
                row_problems.append(_bad_rate("down_kbps", raw))
            else:
                down = got_rate

        flags = no_flags
        if i_flags is not None:
            got_flags = flags_of(fields[i_flags].strip())
            if isinstance(got_flags, str):
                row_problems.append(got_flags)
            else:
                flags = got_flags

        plan = fields[i_plan].strip() if i_plan is not None else ""

        if row_problems:
            problems.extend((number, p) for p in row_problems)
        elif (key is not None or contract) and not problems:
            # Once the file is known bad no rows are returned: stop building them.
            net = make_network[key[0]](key[1], key[2]) if key is not None else None
            rows.append(Subscriber(number, sub_id, net, kind, up, down, flags, plan, user))

    for sub_id, (_, number) in id_user.items():
        if sub_id in pool_line:
            problems.append((number, f"subscriber {sub_id} is the pool of line "
                             f"{pool_line[sub_id]}: a contract needs an id of its own"))
    if strict:
        problems.extend(_overlaps(first))
    if problems:
        problems.sort(key=lambda p: p[0] or 0)
        raise SourceError(path, problems)
    return rows


def _user_problems(user: str, sub_id: int, number: int, user_of: dict[str, tuple[int, int]],
                   id_user: dict[int, tuple[str, int]]) -> list[str]:
    """What is wrong with ``user`` on a row of ``sub_id`` (0: the id is bad): a User-Name
    names one contract, and a contract has one User-Name."""
    if len(user.encode()) > USER_MAX or not user.isprintable() or "," in user:
        return [f"bad user {user!r} (printable, no commas, at most {USER_MAX} bytes)"]
    if not sub_id:
        return []
    seen = user_of.setdefault(user, (sub_id, number))
    if seen[0] != sub_id:
        return [f"user {user!r} is subscriber {seen[0]}'s (line {seen[1]})"]
    other = id_user.setdefault(sub_id, (user, number))
    if other[0] != user:
        return [f"subscriber {sub_id} has user {other[0]!r} already (line {other[1]})"]
    return []


def _overlaps(first: dict[tuple[int, int, int], int]) -> list[Problem]:
    """One problem per row that lies inside another row's prefix, naming the nearest one."""
    problems: list[Problem] = []
    for version, bits in ((4, 32), (6, 128)):
        keys = [(start << 8) | plen for v, start, plen in first if v == version]
        for inner, outer in _nested(keys, bits):
            outer_start, outer_len = outer >> 8, outer & 0xFF
            outer_line = first[(version, outer_start, outer_len)]
            outer_net = _NET[version](outer_start, outer_len)
            line = first[(version, inner >> 8, inner & 0xFF)]
            problems.append((line, f"overlaps line {outer_line} ({outer_net})"))
    return problems


def _nested(keys: list[int], bits: int) -> Iterator[tuple[int, int]]:
    """``(inner, outer)`` for each of the distinct prefixes ``keys`` (``start << 8 |
    prefixlen`` over ``bits``) that lies inside another, ``outer`` the nearest of those.

    Prefixes nest or are disjoint, so after sorting by (start, prefixlen) a stack of the
    enclosing prefixes is enough: O(n log n) for the sort, O(n) for the sweep. Each key is
    packed into one int because sorting ints is far cheaper than sorting tuples.
    """
    lasts: list[int] = []  # last address of each enclosing prefix, outermost first
    outers: list[int] = []  # and its packed key
    for key in sorted(keys):
        start = key >> 8
        while lasts and lasts[-1] < start:
            lasts.pop()
            outers.pop()
        if lasts:
            yield key, outers[-1]
        lasts.append(start | ((1 << (bits - (key & 0xFF))) - 1))
        outers.append(key)


# --- in bulk --------------------------------------------------------------------------------

_V4MAPPED_BYTES = bytes(10) + b"\xff\xff"   # the first 12 bytes of ::ffff:0:0/96
_CHUNK = 1 << 20   # characters of rows parsed at a time: their objects stay in the caches
_TYPE = {t: t for t in TYPES}
_HOST_BITS4 = [(1 << (32 - plen)) - 1 for plen in range(33)]   # by prefix length
# Not in a plain file's rows: ASCII control characters but "\n" (among them all that
# str.strip() removes but " ": no field is stripped), blanks, quotes, scoped addresses.
_NOT_PLAIN = "".join(map(chr, (*range(10), *range(11, 32), 127))) + ' "%'


def read_columns(path: str, strict: bool = False, limit: int = SOURCE_BYTES) -> Parsed:
    """The subscriber file at ``path`` as (hosts, prefixes) columns and its contracts (see
    parse_columns)."""
    return parse_columns(read_source(path, limit), path, strict)


def parse_columns(text: str, path: str = "<subscribers>", strict: bool = False) -> Parsed:
    """Validate a subscriber CSV like :func:`parse_subscribers_text` and return its rows as
    columns: (rows of one address, prefix rows, contracts).

    A plain file is validated a column at a time; at the first doubt the row-by-row parser
    takes over, and its verdict stands: the same rows, or every problem with its line.
    """
    with paused_gc():
        bulk = _bulk(text, strict)
        return bulk or columns_of(_parse(text, path, strict))


def _no_rows() -> Columns:
    """Columns of no rows, to fill."""
    return Columns([], [], [], [], [], [])


def columns_of(rows: Iterable[Subscriber]) -> Parsed:
    """Parsed rows (in file order) as (rows of one address, prefix rows, contracts)
    columns."""
    hosts, prefixes = _no_rows(), _no_rows()
    named, bare = _no_rows(), _no_rows()
    for r in rows:
        net = r.network
        if r.user:
            for column, value in zip(named if net else bare, (r.user, r.sub_id, r.type,
                                     r.up_kbps, r.down_kbps, r.flags), strict=True):
                column.append(value)
        if net is None:
            continue
        addr = net.network_address.packed
        if net.version == 4:
            addr = _V4MAPPED_BYTES + addr
        if net.prefixlen == net.max_prefixlen:
            cols, key = hosts, addr
        else:
            cols, key = prefixes, (net.prefixlen + 128 - net.max_prefixlen, addr)
        for column, value in zip(cols, (key, r.sub_id, r.type, r.up_kbps, r.down_kbps, r.flags),
                                 strict=True):
            column.append(value)
    return Parsed(hosts, prefixes, _contract_rows(named, bare))


def _contract_rows(named: Columns, bare: Columns) -> Columns:
    """Parsed.contracts from the rows with a user, those with an address (``named``) and
    those without (``bare``), each in file order (``named`` is reversed in place)."""
    for column, more in zip(named, bare, strict=True):
        column.reverse()
        column += more
    return named


# Fields of a row in the order the bulk parser keeps them (Columns', the key's text first).
_FIELDS = ("address", "subscriber", "type", "up_kbps", "down_kbps", "flags", "user")


def _bulk(text: str, strict: bool) -> Parsed | None:
    """A plain file's columns, validated a column at a time; None at the first doubt.

    Plain: rows in printable ASCII, without quotes or blanks (comment lines and empty
    lines are fine). The rows are taken _CHUNK characters at a time, in three groups: IPv4
    addresses, IPv4 prefixes (each parsed a column at a time), and rows with a ":" (IPv6,
    few as a rule: parsed one by one by _parse_network, as the row-by-row parser does).
    The rows with a user are also kept in file order, for _contracts. With ``strict``, a
    file with a row inside another row's prefix is left to that parser (which names
    them).
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    end = -1
    while True:   # the header: the first line neither empty nor a comment
        start, end = end + 1, text.find("\n", end + 1)
        end = len(text) if end < 0 else end
        if start >= len(text):
            return None
        if text[start:end] and text[start] != "#":
            break
    columns, width, problems = _header(1, text[start:end])
    if problems:
        return None
    spans = []
    while end < len(text):
        start, end = end + 1, text.find("\n", end + 1 + _CHUNK)
        end = len(text) if end < 0 else end
        spans.append((start, end))
    # A large file's parts at once, on two CPUs; the child's a third: its rows come back
    # pickled, which takes it about half as long again as their parse (as long again with
    # a user column). Measured: a third or two fifths, the same without users; a third
    # 0.1 s better with them, where the rows' users come back too.
    half = (len(spans) * 2 + 2) // 3
    parts = (lambda: _bulk_chunks(text, spans[:half], columns, width),
             lambda: _bulk_chunks(text, spans[half:], columns, width))
    first, second = both(*parts) if half < len(spans) else (parts[0](), parts[1]())
    if first is None or second is None:
        return None
    cols, pools, words = list(first[:-2]), first[-2] | second[-2], first[-1] + second[-1]
    for whole, part in zip(cols, second[:-2], strict=True):
        whole += part
    n = len(Columns._fields)
    hosts, prefixes = cols[:n], cols[n:2 * n]
    named, bare = Columns(*cols[2 * n:3 * n]), Columns(*cols[3 * n:])
    # Rows of one address written as a.b.c.d/32, and IPv6 ones, go with the hosts.
    prefixes, full = _partition([k[0] == 128 for k in prefixes[0]], prefixes)
    if full[0]:
        full[0] = [a for _, a in full[0]]
        for whole, part in zip(hosts, full, strict=True):
            whole += part
    if not _distinct_hosts(words, full[0]) or len(set(prefixes[0])) != len(prefixes[0]):
        return None   # duplicates
    if strict and prefixes[0] and _overlapping(hosts[0], prefixes[0]):
        return None
    contracts = _contracts(named, bare, pools)
    if contracts is None:
        return None
    return Parsed(Columns(*hosts), Columns(*prefixes), contracts)


def _bulk_chunks(text: str, spans: list[tuple[int, int]], columns: dict[str, int], width: int
                 ) -> tuple[list[list], ...] | None:
    """The rows of ``text[start:end]`` for each of ``spans`` (whole lines) by _bulk_chunk, one
    after the other: (the columns of the hosts, of the prefixes, of the rows with a user
    and an address, of those without an address: 24 lists, then the pools' ids, then the
    hosts' four bytes each, joined)."""
    hosts: list[list] = [[] for _ in Columns._fields]
    prefixes: list[list] = [[] for _ in Columns._fields]
    named, bare = _no_rows(), _no_rows()   # rows with a user, with and without address
    pools: set[int] = set()
    words = []
    for start, end in spans:
        got = _bulk_chunk(text[start:end], columns, width)
        if got is None:
            return None
        for whole, part in zip((*hosts, *prefixes, *named, *bare),
                               (*got[0], *got[1], *got[2], *got[3]), strict=True):
            whole += part
        pools.update(got[4])
        words.append(got[5])
    return (*hosts, *prefixes, *named, *bare, pools, b"".join(words))


def _contracts(named: Columns, bare: Columns, pools: set[int]) -> Columns | None:
    """Parsed.contracts from the rows with a user, those with an address (``named``) and
    those without (``bare``), each in file order, and the ids of the pools; checked as
    _parse and _user_problems check them (each user is printable ASCII, not too long
    already), None at the first doubt."""
    if len(set(bare.keys)) != len(bare.keys):
        return None   # two rows without an address for one user
    contracts = _contract_rows(named, bare)
    users, ids = contracts.keys, contracts.ids
    # An id has one user if every row has the user of its id's last row; then a user has
    # one id if there are as many users as ids. (Ints are cheaper keys than the users.)
    user_of = dict(zip(ids, users, strict=True))
    if len(user_of) < len(ids) and list(map(user_of.__getitem__, ids)) != users:
        return None
    # (the pools, a few, looked up in the dict: set.isdisjoint would walk all of it)
    if len(set(users)) != len(user_of) or any(map(user_of.__contains__, pools)):
        return None   # a user of two ids, or a user's id a pool's
    return contracts


def _distinct_hosts(words: bytes, others: list[bytes]) -> bool:
    """Whether no host comes twice: the IPv4 address rows by their four bytes (``words``,
    joined) in numpy, with the IPv4 keys among the ``others`` (a.b.c.d/32 rows); the rest
    (IPv6) in a set. A set of the million keys took 0.15-0.2 s (a cache miss a key: their
    objects lie all over the heap by now)."""
    import numpy as np

    from xdpzoot.dataplane.dirs import distinct

    v4 = [k[12:] for k in others if k[:12] == _V4MAPPED_BYTES]
    six = [k for k in others if k[:12] != _V4MAPPED_BYTES]
    w = np.frombuffer(words + b"".join(v4), dtype=np.uint32)
    return len(distinct(w)) == len(w) and len(set(six)) == len(six)


def _overlapping(hosts: list[bytes], prefixes: list[tuple[int, bytes]]) -> bool:
    """Whether a row lies inside another row's prefix. One sweep over the maps' 128-bit
    space serves both families: IPv6 rows never reach into IPv4's ::ffff:0:0/96."""
    keys = [(v << 8) | 128 for v in map(_from_bytes, hosts, repeat("big"))]
    keys += [(_from_bytes(a, "big") << 8) | plen for plen, a in prefixes]
    return next(_nested(keys, 128), None) is not None


def _bulk_chunk(chunk: str, columns: dict[str, int], width: int
                ) -> tuple[Columns, Columns, Columns, Columns, set[int], bytes] | None:
    """The rows of one chunk of a plain file: (IPv4 addresses, all others with an
    address, the rows with an address and a user in file order and those without an
    address, both keyed by user, the ids of the pools when the file has a user column,
    the IPv4 addresses' four bytes each, joined)."""
    if "#" in chunk or "\n\n" in chunk:
        chunk = "\n".join(line for line in chunk.split("\n") if line and line[0] != "#")
    chunk = chunk.strip("\n")
    if not chunk:
        return _no_rows(), _no_rows(), _no_rows(), _no_rows(), set(), b""
    if not chunk.isascii() or any(c in chunk for c in _NOT_PLAIN):
        return None
    # Fields, each row's followed by a "\n" of its own: they sit every width + 1 fields
    # exactly when every row has width fields.
    n = chunk.count("\n") + 1
    flat = chunk.replace("\n", ",\n,").split(",")
    if len(flat) != n * (width + 1) - 1 or flat[width::width + 1].count("\n") != n - 1:
        return None
    addrs, ids, types, up, down, flags, users = (
        flat[columns[name]::width + 1] if name in columns else None for name in _FIELDS)
    rows = [addrs, _ids(ids), _types(types), _rates(up, n),  # type: ignore[arg-type]
            _rates(down, n), _flag_column(flags, n), users]
    if any(c is None for c in rows[1:6]):
        return None
    named, bare, pools = _no_rows(), _no_rows(), set()
    if users is not None:
        if max(map(len, users)) > USER_MAX:   # (ASCII: a character is a byte)
            return None
        if "" in addrs:  # type: ignore[operator]
            rows, without = _partition([not a for a in addrs], rows)  # type: ignore
            if "" in without[6]:
                return None   # an empty address without a user
            bare = Columns(without[6], *without[1:6])
            users = rows[6]
        named = Columns(users, *rows[1:6])
        if "" in users:
            named = Columns(*(list(compress(c, users)) for c in named))
    plain, other = _partition(["/" in a or ":" in a for a in rows[0]], rows)
    prefixes4, rest = _partition([":" in a for a in other[0]], other)
    packed = _ipv4_packed(plain[0])
    groups = [_keyed(prefixes4, _ipv4_prefix_keys), _keyed(rest, _network_keys)]
    if packed is None or groups[0] is None or groups[1] is None:
        return None
    hosts = Columns(list(map(_V4MAPPED_BYTES.__add__, packed)), *plain[1:6])
    prefixes = Columns(*(a + b for a, b in zip(*groups, strict=True)))
    if users is not None:   # pools: dynamic rows of a prefix (a /32 or /128 is a host)
        pool = [k[0] < 128 and t == "dynamic"
                for k, t in zip(prefixes.keys, prefixes.types, strict=True)]
        pools.update(compress(prefixes.ids, pool))   # (a pool's user: its id, a pool's)
    return hosts, prefixes, named, bare, pools, b"".join(packed)


def _keyed(rows: list[list], keys_of: Callable[[list[str]], list | None]) -> Columns | None:
    """Columns of rows (fields as _FIELDS) with the keys ``keys_of`` reads from their
    addresses, or None if it cannot."""
    keys = keys_of(rows[0]) if rows[0] else []
    return None if keys is None else Columns(keys, *rows[1:6])


def _types(texts: list[str]) -> list[str] | None:
    """The type column as our own strings (not the file's million copies), or None."""
    if not set(texts) <= set(TYPES):
        return None
    return list(map(_TYPE.__getitem__, texts))


def _ipv4_packed(addrs: list[str]) -> list[bytes] | None:
    """The four bytes of each IPv4 address, by inet_pton (as _parse_network does first)."""
    try:
        return list(map(_pton, repeat(_AF_INET), addrs))
    except OSError:
        return None


def _ipv4_prefix_keys(addrs: list[str]) -> list[tuple[int, bytes]] | None:
    """``(prefixlen + 96, 16-byte address)`` of IPv4 prefixes ``a.b.c.d/n`` a column at a
    time; spellings it does not know (netmasks, ...) go to _network_keys."""
    return _ipv4_prefixes(addrs) or _network_keys(addrs)


def _ipv4_prefixes(addrs: list[str]) -> list[tuple[int, bytes]] | None:
    """The keys of _ipv4_prefix_keys if every prefix is spelled a.b.c.d/n, else None."""
    nets, _, lengths = zip(*map(operator.methodcaller("partition", "/"), addrs), strict=True)
    if not set(map(len, lengths)) <= {1, 2} or not "".join(lengths).isdigit():
        return None
    plens = list(map(int, lengths))
    try:
        packed = list(map(_pton, repeat(_AF_INET), nets))
    except OSError:
        return None
    values = map(_from_bytes, packed, repeat("big"))
    if max(plens) > 32 or any(map(operator.and_, values, map(_HOST_BITS4.__getitem__, plens))):
        return None   # host bits set
    return list(zip(map((96).__add__, plens), map(_V4MAPPED_BYTES.__add__, packed),
                    strict=True))


def _network_keys(addrs: list[str]) -> list[tuple[int, bytes]] | None:
    """``(prefixlen over 128 bits, 16-byte address)`` of each address or prefix."""
    keys = []
    for text in addrs:
        got = _parse_network(text)
        if isinstance(got, str):
            return None
        version, value, plen = got
        if version == 4:
            keys.append((plen + 96, _V4MAPPED_BYTES + value.to_bytes(4, "big")))
        else:
            keys.append((plen, value.to_bytes(16, "big")))
    return keys


def _ids(texts: list[str]) -> list[int] | None:
    """Subscriber ids as _u32 reads them, 1..U32_MAX, or None."""
    lengths = set(map(len, texts))
    if 0 in lengths or max(lengths) > 10 or not "".join(texts).isdigit():
        return None
    ids = list(map(int, texts))
    return ids if min(ids) >= 1 and max(ids) <= U32_MAX else None


def _rates(texts: list[str] | None, n: int) -> list[int] | None:
    """A rate column (empty is 0), or None if a rate is bad; all 0 without the column."""
    if texts is None:
        return [0] * n
    value = {t: _u32(t) if t else 0 for t in set(texts)}
    return None if None in value.values() else list(map(value.__getitem__, texts))


def _flag_column(texts: list[str] | None, n: int) -> list[frozenset[str]] | None:
    """The flags column as flag sets, or None if one is bad; all empty without the column."""
    if texts is None:
        return [_NO_FLAGS] * n
    value = {t: _flags(t) for t in set(texts)}
    if any(isinstance(v, str) for v in value.values()):
        return None
    return list(map(value.__getitem__, texts))  # type: ignore[arg-type]


def _partition(mask: list[bool], columns: list) -> tuple[list, list]:
    """Each column's rows where ``mask`` is false, and those where it is true (a column
    of None stays None)."""
    if not any(mask):
        return columns, [None if c is None else [] for c in columns]
    return ([None if c is None else list(compress(c, map(operator.not_, mask)))
             for c in columns],
            [None if c is None else list(compress(c, mask)) for c in columns])
