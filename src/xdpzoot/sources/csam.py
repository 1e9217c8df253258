"""The CSAM address list file: read it (never world-readable in strict mode), validate every
line, and tell two versions of it apart line by line (so a load parses only what changed).

The list is confidential: no function here returns, logs or formats an entry of it in an
error; problems name the file and line only. Swapping it into the kernel is
``dataplane/blocklist.py``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import socket
import stat
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

from xdpzoot.dataplane.layout import LPM_KEY
from xdpzoot.sources.files import SOURCE_BYTES, SourceError, both, paused_gc, read_file
from xdpzoot.sources.subscribers import V4MAPPED_PROBLEM, overlaps_v4mapped
from xdpzoot.tables import Key

V4MAPPED = bytes(10) + b"\xff\xff"
_WS = " \t\r\x0b\x0c"   # what bytes.strip() removes (and str.strip() more): one verdict
_SPLIT_WS = _WS + "\x1c\x1d\x1e\x1f"   # what str.split() splits at besides "\n" (ASCII)
_COMMENT = re.compile(r"#[^\n]*")
LISTED = b"\x01"
HOST = struct.pack("=I", 128)             # LPM_KEY's length field of an exact address
COUNTS = ("hosts4", "hosts6", "prefixes4", "prefixes6")
HALVES_BYTES = 1 << 20   # a list this large is parsed in two processes (_parse_halves)
# A load's progress: given how many entries it will write, a callback for those written.
Progress = Callable[[int], Callable[[int], None] | None]


@dataclass(frozen=True, eq=False)
class CsamList:
    """A validated list: its exact addresses (16 bytes each, each once, in one buffer: what a
    whole load writes and makes its directory and lines of) and prefixes ((len/128,
    address)), and the entries written on more than one line, with how many (keys as
    :func:`entry_key`). Two lists are equal when they hold the same entries (in any order)."""

    joined: bytes
    prefixes: frozenset[Key]
    sha256: bytes
    hosts4: int   # how many of the addresses are IPv4 (counted while parsing)
    dups: dict[bytes, int]

    @functools.cached_property
    def hosts(self) -> frozenset[bytes]:
        """The exact addresses as a set: made on first use (a load into an empty
        generation writes ``joined`` and never needs it)."""
        j = self.joined
        return frozenset(j[i:i + 16] for i in range(0, len(j), 16))

    @property
    def n_hosts(self) -> int:
        return len(self.joined) // 16

    def counts(self) -> dict[str, int]:
        p4 = sum(1 for _, a in self.prefixes if a[:12] == V4MAPPED)
        return {"hosts4": self.hosts4, "hosts6": self.n_hosts - self.hosts4,
                "prefixes4": p4, "prefixes6": len(self.prefixes) - p4}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CsamList):
            return NotImplemented
        return ((self.hosts, self.prefixes, self.sha256, self.hosts4, self.dups)
                == (other.hosts, other.prefixes, other.sha256, other.hosts4, other.dups))

    __hash__ = None   # type: ignore[assignment]


def _of_set(hosts: set[bytes], prefixes: set[Key], data: bytes, hosts4: int,
            dups: dict[bytes, int]) -> CsamList:
    """A CsamList of addresses held in a set already (the set is its ``hosts``)."""
    lst = CsamList(b"".join(hosts), frozenset(prefixes), hashlib.sha256(data).digest(),
                   hosts4, dups)
    lst.__dict__["hosts"] = frozenset(hosts)
    return lst


def entry_key(host: bytes | None, prefix: Key | None) -> bytes:
    """One entry as one key: an LPM key, exact addresses with length 128 (a prefix never
    has it: a /32 or /128 is an exact address)."""
    return HOST + host if host is not None else LPM_KEY.pack(*prefix)


def _dups(contents: list[bytes], entries: int) -> dict[bytes, int]:
    """Entries that more than one of these (valid, stripped) lines write, and how many."""
    spellings = Counter(contents)
    if len(spellings) == entries:   # one spelling per entry: only repeated lines count
        return {entry_key(*_parse_line(s)[:2]): n for s, n in spellings.items() if n > 1}
    lines: Counter[bytes] = Counter()
    for s, n in spellings.items():
        lines[entry_key(*_parse_line(s)[:2])] += n
    return {k: n for k, n in lines.items() if n > 1}


def _parse_line(s: bytes) -> tuple[bytes | None, Key | None, str | None]:
    """(host, prefix, problem) for one stripped, non-comment line."""
    addr, slash, plen_s = s.partition(b"/")
    try:
        text = addr.decode("ascii")
        if b":" in addr:
            a, width, extra = socket.inet_pton(socket.AF_INET6, text), 128, 0
        else:
            a, width, extra = V4MAPPED + socket.inet_pton(socket.AF_INET, text), 32, 96
    except (OSError, ValueError):   # ValueError: undecodable, or a NUL inside
        return None, None, "not an IPv4 or IPv6 address or prefix"
    if slash and (not plen_s.isdigit() or len(plen_s) > 3 or int(plen_s) > width):
        return None, None, "bad prefix length"
    plen = int(plen_s) if slash else width
    n = int.from_bytes(a, "big")
    if width == 128 and overlaps_v4mapped(n, plen):
        return None, None, V4MAPPED_PROBLEM
    if not slash:
        return a, None, None
    if n & ((1 << (width - plen)) - 1):
        return None, None, "host bits set in the prefix"
    if plen == width:
        return a, None, None
    return None, (plen + extra, a), None


def parse_csam_bytes(data: bytes, path: str = "<csam>") -> CsamList:
    """Validate a list: one address or prefix per line, ``#`` comments, blank lines, and
    surrounding whitespace allowed; anything else is an error with its line number."""
    with paused_gc():   # a million small objects: collection passes would dominate
        return _parse_halves(data) or _parse_fast(data) or _parse_careful(data, path)


def _parse_halves(data: bytes) -> CsamList | None:
    """A large list in two halves at once (files.both); None at the first doubt: a half
    that _entries gives up on, or an entry that more than one line writes (the caller's
    whole parse then finds it)."""
    if len(data) < HALVES_BYTES:
        return None
    cut = data.find(b"\n", len(data) // 2) + 1
    if not cut:
        return None

    def half(part: bytes) -> tuple[bytes, set[bytes], set[Key], int] | None:
        e = _entries(part)   # (its lines counted: not sent back)
        return e and (e[0], e[1], e[2], len(e[3]))

    first, second = both(lambda: half(data[:cut]), lambda: half(data[cut:]))
    if first is None or second is None:
        return None
    (w1, h1, p1, lines1), (w2, h2, p2, lines2) = first, second
    words4 = _distinct4(w1 + w2)
    if (len(w1) // 4 + len(h1) + len(p1) != lines1   # (each half's entries distinct)
            or len(w2) // 4 + len(h2) + len(p2) != lines2
            or len(words4) != len(w1) + len(w2) or not h1.isdisjoint(h2)
            or not p1.isdisjoint(p2)):
        return None   # an entry on more than one line
    return CsamList(_mapped(words4) + b"".join(h1) + b"".join(h2), frozenset(p1 | p2),
                    hashlib.sha256(data).digest(), len(words4) // 4, {})


def _parse_fast(data: bytes) -> CsamList | None:
    """The common case, a valid file, in bulk; None at the first doubt (then the careful
    parser finds and reports every bad line)."""
    e = _entries(data)
    if e is None:
        return None
    words4, hosts6, prefixes, lines = e
    h4 = len(words4) // 4
    n = h4 + len(hosts6) + len(prefixes)
    dups = _dups([x.encode() for x in lines], n) if len(lines) != n else {}
    return CsamList(_mapped(words4) + b"".join(hosts6), frozenset(prefixes),
                    hashlib.sha256(data).digest(), h4, dups)


def _entries(data: bytes) -> tuple[bytes, set[bytes], set[Key], list[str]] | None:
    """The entries of a valid file, in bulk: its distinct IPv4 addresses (:func:`_distinct4`),
    its other addresses, its prefixes, and its lines that are not empty; None at the first
    doubt."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "#" in text:
        text = _COMMENT.sub("", text)
    if any(c in text for c in _SPLIT_WS):
        lines = [x for x in (y.strip(_WS) for y in text.split("\n")) if x]
    else:   # no whitespace but the line ends: the lines that are not empty
        lines = text.split()
    plain = [x for x in lines if "/" not in x]
    pton, af4, af6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6
    try:   # IPv4: the four bytes of each, joined (no object per address)
        packed4 = [b"".join(map(pton, repeat(af4), [x for x in plain if ":" not in x]))]
        hosts6 = {pton(af6, x) for x in plain if ":" in x}
    except (OSError, ValueError):
        return None
    if any(h[:12] == V4MAPPED for h in hosts6):
        return None   # IPv6 spelling of an IPv4-mapped address: an error, reported below
    prefixes: set[Key] = set()
    if len(plain) != len(lines):
        slashed = [x for x in lines if "/" in x]
        v4 = _prefixes4([x for x in slashed if ":" not in x])
        if v4 is None:
            return None
        prefixes, slash32 = v4
        packed4.append(slash32)
        for x in slashed:
            if ":" in x:
                h, p, problem = _parse_line(x.encode())
                if problem:
                    return None
                if h is None:
                    prefixes.add(p)
                else:   # a /128
                    hosts6.add(h)
    return _distinct4(b"".join(packed4)), hosts6, prefixes, lines


def _prefixes4(lines: list[str]) -> tuple[set[Key], bytes] | None:
    """IPv4 prefix lines ("a.b.c.d/n", stripped), in bulk: the prefixes, and the /32s' four
    bytes each, joined; None at the first doubt (as :func:`_parse_line` would judge the line:
    a length of 1-3 digits up to 32, no host bits set)."""
    import numpy as np

    parts = [x.partition("/") for x in lines]
    lens = [p for _, _, p in parts]
    if not all(map(str.isdigit, lens)) or max(map(len, lens), default=0) > 3:
        return None
    try:
        packed = b"".join(map(socket.inet_pton, repeat(socket.AF_INET), [a for a, _, _ in parts]))
    except (OSError, ValueError):
        return None
    plen = np.array(list(map(int, lens)), dtype=np.int64)
    if len(plen) and plen.max() > 32:
        return None
    words = np.frombuffer(packed, dtype=">u4").astype(np.int64)
    if (words & ((1 << (32 - plen)) - 1)).any():
        return None   # host bits set
    host = plen == 32
    rows = np.frombuffer(packed, dtype=np.uint8).reshape(-1, 4)
    addrs = [V4MAPPED + a for a in map(bytes, rows[~host])]
    return set(zip((plen[~host] + 96).tolist(), addrs, strict=True)), rows[host].tobytes()


def _distinct4(packed: bytes) -> bytes:
    """IPv4 addresses (4 bytes each, joined), each once, in the order of their bytes read as a
    native word."""
    import numpy as np

    from xdpzoot.dataplane.dirs import heads

    # Stable (see dirs.stable_order): numpy's timsort, which merges the two sorted halves
    # of _parse_halves in one pass (4 ms at 765k, where dirs.distinct's radix passes take
    # 25-40).
    w = np.sort(np.frombuffer(packed, dtype=np.uint32), kind="stable")
    return w[heads(w)].tobytes()


def _mapped(packed: bytes) -> bytes:
    """IPv4 addresses (4 bytes each, joined) as 16-byte IPv4-mapped ones, joined."""
    import numpy as np

    rows = np.empty((len(packed) // 4, 16), dtype=np.uint8)
    rows[:, :12] = np.frombuffer(V4MAPPED, dtype=np.uint8)
    rows[:, 12:] = np.frombuffer(packed, dtype=np.uint8).reshape(-1, 4)
    return rows.tobytes()


def _parse_careful(data: bytes, path: str) -> CsamList:
    """Line by line, collecting every problem with its line number (never the entry)."""
    hosts: set[bytes] = set()
    prefixes: set[Key] = set()
    contents: list[bytes] = []
    problems: list[tuple[int | None, str]] = []
    for n, line in enumerate(data.split(b"\n"), 1):
        s = _content(line)
        if not s:
            continue
        h, p, problem = _parse_line(s)
        if problem:
            problems.append((n, problem))
            continue
        contents.append(s)
        if h is not None:
            hosts.add(h)
        else:
            prefixes.add(p)
    if problems:
        raise SourceError(path, problems)
    n = len(hosts) + len(prefixes)
    return _of_set(hosts, prefixes, data, sum(1 for a in hosts if a[:12] == V4MAPPED),
                   _dups(contents, n) if len(contents) != n else {})


def _content(line: bytes) -> bytes:
    """A line without its comment and surrounding whitespace."""
    return line.split(b"#", 1)[0].strip() if b"#" in line else line.strip()


def parse_csam(path: str, strict: bool = False,
               limit: int = SOURCE_BYTES) -> tuple[CsamList, list[str]]:
    """Read and validate the list file; returns the list and warnings (world-readable)."""
    data, warnings = read_list(path, strict, limit)
    return parse_csam_bytes(data, path), warnings


def read_list(path: str, strict: bool = False,
              limit: int = SOURCE_BYTES) -> tuple[bytes, list[str]]:
    """The list file's bytes (a regular file of at most ``limit`` bytes: files.read_file),
    and a warning when everyone may read it (an error with ``strict``): the list is
    confidential."""
    data, st = read_file(path, limit)
    if not st.st_mode & stat.S_IROTH:
        return data, []
    if strict:
        raise SourceError(path, [(None, "readable by everyone (--strict): chmod o-r")])
    return data, [f"{path}: readable by everyone: chmod o-r {path}"]


def text_delta(old: bytes, new: bytes) -> dict[bytes, int] | None:
    """Per entry, how many more lines of ``new`` than of ``old`` write it (zeros left out),
    from the lines that differ; None when a differing line of ``new`` is not valid (the
    careful parser then names it) or when the files differ too much for this to pay."""
    lines = line_diff(old, new, len(new) // 4 + 65536)
    if lines is None:
        return None
    delta: dict[bytes, int] = {}
    for sign, part in ((-1, lines[0]), (1, lines[1])):
        for line in part:
            s = _content(line)
            if s:
                h, p, problem = _parse_line(s)
                if problem:
                    return None
                k = entry_key(h, p)
                delta[k] = delta.get(k, 0) + sign
    return {k: d for k, d in delta.items() if d}


def line_diff(old: bytes, new: bytes, budget: int) -> tuple[list[bytes], list[bytes]] | None:
    """Lines to take out of ``old`` and lines to put in so that it has the lines of ``new``
    (as multisets: enough to know the entries). Runs the two have in common are skipped by
    comparing bytes; None when the lines that differ add up to more than ``budget`` bytes."""
    old, new = _terminated(old), _terminated(new)
    removed: list[bytes] = []
    added: list[bytes] = []
    i = j = 0
    while True:
        nl = old.rfind(b"\n", i, i + _common(old, i, new, j))
        if nl >= 0:   # the common run, in whole lines
            j += nl + 1 - i
            i = nl + 1
        if i == len(old) and j == len(new):
            return removed, added
        # The lines at i and j differ: find the nearest pair of equal lines after them.
        size = 512
        while True:
            a, a_end = _lines(old, i, size)
            b, b_end = _lines(new, j, size)
            first: dict[bytes, int] = {}
            for y, line in enumerate(b):
                first.setdefault(line, y)
            x, y = len(a), len(b)
            for xx, line in enumerate(a):
                if xx >= x + y:
                    break
                yy = first.get(line)
                if yy is not None and xx + yy < x + y:
                    x, y = xx, yy
            if x < len(a) or (a_end and b_end):   # a pair, or the ends of both
                break
            size *= 4
            if size > budget:
                return None
        removed += a[:x]
        added += b[:y]
        di, dj = sum(map(len, a[:x])) + x, sum(map(len, b[:y])) + y
        i, j, budget = i + di, j + dj, budget - di - dj
        if budget < 0:
            return None


def _terminated(text: bytes) -> bytes:
    """``text`` with a newline at the end (what the last line says does not change)."""
    return text + b"\n" if text and not text.endswith(b"\n") else text


def _lines(text: bytes, i: int, size: int) -> tuple[list[bytes], bool]:
    """The whole lines from ``i`` on that start within ``size`` bytes, and whether they
    reach the end of ``text`` (which ends with a newline)."""
    end = text.find(b"\n", i + size)
    end = len(text) if end < 0 else end + 1
    lines = text[i:end].split(b"\n")
    lines.pop()   # after the last newline
    return lines, end == len(text)


def _common(a: bytes, i: int, b: bytes, j: int) -> int:
    """Length of the common prefix of ``a[i:]`` and ``b[j:]``: compared in growing blocks,
    then the differing block halved."""
    n = min(len(a) - i, len(b) - j)
    view = memoryview(a)
    lo, step = 0, 4096
    while lo < n and b.startswith(view[i + lo:i + min(lo + step, n)], j + lo):
        lo = min(lo + step, n)
        step *= 2
    hi = min(lo + step, n)   # a difference before hi, none before lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if b.startswith(view[i + lo:i + mid], j + lo):
            lo = mid
        else:
            hi = mid
    return lo
