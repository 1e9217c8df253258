"""The CSAM address list: parse and validate the file, then swap it into the kernel whole.

The list is confidential: no function here returns, logs or formats an entry of it in an
error; problems name the file and line only. The list is written nowhere but the maps.

Kernel side (bpf/maps.h): two generations of an exact-address hash and a prefix trie;
the idle generation is brought to the new list by diff, then one write of the control
word (``xz_control.csam``) switches every packet from the whole old list to the whole new
one. Each generation also has an IPv4 /24 directory (dirs.py) that answers most packets
without the hash or the trie: written whole with a whole list, changed entry by entry with
a difference. This module talks to the pinned maps through :class:`kernel.PinnedMap`,
without bcc, so that a small change is applied in well under a second.

Each generation also keeps, in a map of its own that no program uses (``xz_csam_t0/1``,
root only), the text of the file it was loaded from. A load compares the new file with the
idle generation's text and parses only the lines that differ: every other line was valid
when that list was loaded, and yields the entries the generation holds already.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import dirs, kernel, schema
from .kernel import LPM_KEY, ZERO_KEY, KernelError, PinnedMap
from .sources import V4MAPPED_PROBLEM, SourceError, overlaps_v4mapped
from .tables import Key

V4MAPPED = bytes(10) + b"\xff\xff"
_WS = " \t\r\x0b\x0c"   # what bytes.strip() removes (and str.strip() more): one verdict
# Raw layouts of bpf/xdpzoot.h (checked against bcc's types in tests/test_csam.py).
CONTROL = struct.Struct("=II")            # struct xz_control: its first two words, flags, csam
META = struct.Struct("=32sQIIII")         # struct xz_csam_meta
LISTED = b"\x01"
HOST = struct.pack("=I", 128)             # LPM_KEY's length field of an exact address
C = schema.C
COUNTS = ("hosts4", "hosts6", "prefixes4", "prefixes6")
# A load's progress: given how many entries it will write, a callback for those written.
Progress = Callable[[int], Callable[[int], None] | None]


@dataclass(frozen=True)
class CsamList:
    """A validated list: exact addresses (16 bytes) and prefixes ((len/128, address)), and
    the entries written on more than one line, with how many (keys as :func:`entry_key`)."""

    hosts: frozenset[bytes]
    prefixes: frozenset[Key]
    sha256: bytes
    hosts4: int   # how many of the hosts are IPv4 (counted while parsing)
    dups: dict[bytes, int]

    def counts(self) -> dict[str, int]:
        p4 = sum(1 for _, a in self.prefixes if a[:12] == V4MAPPED)
        return {"hosts4": self.hosts4, "hosts6": len(self.hosts) - self.hosts4,
                "prefixes4": p4, "prefixes6": len(self.prefixes) - p4}


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
    gc_was = gc.isenabled()
    gc.disable()   # a million small objects: collection passes would dominate
    try:
        return _parse_fast(data) or _parse_careful(data, path)
    finally:
        if gc_was:
            gc.enable()


def _parse_fast(data: bytes) -> CsamList | None:
    """The common case, a valid file, in bulk; None at the first doubt (then the careful
    parser finds and reports every bad line)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\n")
    if "#" in text:
        lines = [x.split("#", 1)[0] for x in lines]
    lines = [x for x in (y.strip(_WS) for y in lines) if x]
    plain = [x for x in lines if "/" not in x]
    pton, af4, af6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6
    try:
        hosts = {V4MAPPED + pton(af4, x) for x in plain if ":" not in x}
    except (OSError, ValueError):
        return None
    h4 = len(hosts)
    try:
        hosts6 = {pton(af6, x) for x in plain if ":" in x}
    except (OSError, ValueError):
        return None
    if any(h[:12] == V4MAPPED for h in hosts6):
        return None   # IPv6 spelling of an IPv4-mapped address: an error, reported below
    prefixes: set[Key] = set()
    if len(plain) != len(lines):
        for x in lines:
            if "/" in x:
                h, p, problem = _parse_line(x.encode())
                if problem:
                    return None
                if h is not None:
                    hosts6.add(h)   # a /32 or /128: counted below
                else:
                    prefixes.add(p)
    extra4 = sum(1 for a in hosts6 if a[:12] == V4MAPPED and a not in hosts)
    hosts |= hosts6
    n = len(hosts) + len(prefixes)
    dups = _dups([x.encode() for x in lines], n) if len(lines) != n else {}
    return CsamList(frozenset(hosts), frozenset(prefixes), hashlib.sha256(data).digest(),
                    h4 + extra4, dups)


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
    return CsamList(frozenset(hosts), frozenset(prefixes), hashlib.sha256(data).digest(),
                    sum(1 for a in hosts if a[:12] == V4MAPPED),
                    _dups(contents, n) if len(contents) != n else {})


def _content(line: bytes) -> bytes:
    """A line without its comment and surrounding whitespace."""
    return line.split(b"#", 1)[0].strip() if b"#" in line else line.strip()


def parse_csam(path: str, strict: bool = False) -> tuple[CsamList, list[str]]:
    """Read and validate the list file; returns the list and warnings (world-readable)."""
    data, warnings = read_list(path, strict)
    return parse_csam_bytes(data, path), warnings


def read_list(path: str, strict: bool = False) -> tuple[bytes, list[str]]:
    """The list file's bytes, and a warning when everyone may read it (an error with
    ``strict``): the list is confidential."""
    warnings: list[str] = []
    try:
        st = os.stat(path)
        if st.st_mode & stat.S_IROTH:
            msg = f"{path}: readable by everyone: chmod o-r {path}"
            if strict:
                raise SourceError(path, [(None, "readable by everyone (--strict): chmod o-r")])
            warnings.append(msg)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SourceError(path, [(None, f"cannot read: {e.strerror}")]) from e
    return data, warnings


# ---- kernel ------------------------------------------------------------------------------


class Maps:
    """The CSAM maps of one instance and its control word, opened without bcc."""

    def __init__(self, pin_dir: str):
        if not os.path.exists(os.path.join(pin_dir, "xz_csam_h0")):
            raise KernelError(f"xdpzoot is not loaded (no maps pinned under {pin_dir})")
        p = lambda n: PinnedMap(os.path.join(pin_dir, n))  # noqa: E731
        self.pin_dir = pin_dir
        self.control = p("xz_control")
        self.meta = p("xz_csam_meta")
        self.hits = p("xz_csam_hits")
        self.hosts = (p("xz_csam_h0"), p("xz_csam_h1"))
        self.prefixes = (p("xz_csam_p0"), p("xz_csam_p1"))
        self.dirs = (p("xz_csam_d0"), p("xz_csam_d1"))

    def close(self) -> None:
        for m in (self.control, self.meta, self.hits, *self.hosts, *self.prefixes, *self.dirs):
            m.close()

    def read_dir(self, gen: int) -> bytearray:
        """Generation ``gen``'s IPv4 /24 directory (dirs.py)."""
        return self.dirs[gen].lookup_into(ZERO_KEY)

    def write_dir(self, gen: int, d: bytes | bytearray) -> None:
        self.dirs[gen].update(ZERO_KEY, d)

    def __enter__(self) -> Maps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def word(self) -> tuple[int, int]:
        """(flags, csam) of the control entry."""
        return CONTROL.unpack_from(self.control.lookup(b"\0\0\0\0") or bytes(CONTROL.size))

    def set_word(self, csam: int) -> None:
        """Switch lists: one write of the control entry (every other field kept)."""
        value = bytearray(self.control.lookup(b"\0\0\0\0"))
        flags, _ = CONTROL.unpack_from(value)
        CONTROL.pack_into(value, 0, flags, csam)
        self.control.update(b"\0\0\0\0", bytes(value))

    def text_path(self, gen: int) -> str:
        """Where the text of generation ``gen``'s list is pinned."""
        return os.path.join(self.pin_dir, f"xz_csam_t{gen}")

    def read_meta(self, gen: int) -> dict:
        sha, loaded, h4, h6, p4, p6 = META.unpack(self.meta.lookup(struct.pack("=I", gen)))
        return {"sha256": sha.hex() if loaded else None, "loaded": loaded or None,
                "hosts4": h4, "hosts6": h6, "prefixes4": p4, "prefixes6": p6}

    def hit_counts(self) -> dict[str, int]:
        """Hits per generation and family, summed over CPUs."""
        out = {}
        for gen in (0, 1):
            for fam, name in ((0, "ipv4"), (1, "ipv6")):
                raw = self.hits.lookup(struct.pack("=I", gen * 2 + fam)) or b""
                out[f"gen{gen}_{name}"] = sum(struct.unpack(f"={len(raw) // 8}Q", raw))
        return out


@dataclass(frozen=True)
class LoadResult:
    """What a load did: entries written to the idle generation, and the switch."""

    added: int
    removed: int
    generation: int
    switched: bool


def in_force(maps: Maps, data: bytes) -> bool:
    """True when the list in force was loaded from exactly these bytes (by digest)."""
    _, word = maps.word()
    return maps.read_meta(word & C["XZ_CSAM_GEN"])["sha256"] == hashlib.sha256(data).hexdigest()


def load(maps: Maps, data: bytes, path: str = "<csam>", lst: CsamList | None = None,
         progress: Progress | None = None, now: Callable[[], float] = time.time
         ) -> LoadResult:
    """Make the list in ``data`` the list in force: bring the idle generation to it, then
    switch. A file with an error changes nothing (SourceError); the same list (by digest)
    as the one in force writes nothing.

    When the idle generation's text is kept and intact, only the lines that differ from it
    are parsed and written; else the whole file is parsed (``lst``, if the caller parsed it
    already) and compared with the idle generation's keys, read back.
    """
    sha = hashlib.sha256(data).digest()
    _, word = maps.word()
    gen = word & C["XZ_CSAM_GEN"]
    if maps.read_meta(gen)["sha256"] == sha.hex():
        return LoadResult(0, 0, gen, False)
    idle = 1 - gen
    old = held(maps, idle)
    # A directory of zeros was never written (an instance from before directories):
    # correct, but only a whole load makes it fast.
    old_dir = maps.read_dir(idle) if old else None
    delta = (text_delta(old.text, data) if old and old_dir.count(0) < len(old_dir)
             else None)
    if delta is None:
        lst = lst or parse_csam_bytes(data, path)   # the careful parser names bad lines
    key = struct.pack("=I", idle)
    # Until it is written whole, the idle generation holds no list that anything may trust.
    maps.meta.update(key, bytes(META.size))
    if delta is not None:
        added, removed, counts, dups = _write_delta(maps, idle, old, delta, progress)
        dirs.csam_change(old_dir, map(LPM_KEY.unpack, (k for k, d in delta.items() if d < 0)),
                         map(LPM_KEY.unpack, (k for k, d in delta.items() if d > 0)))
        maps.write_dir(idle, old_dir)
    else:
        added, removed = _write_list(maps, idle, lst, progress)
        counts, dups = lst.counts(), lst.dups
    kernel.pin_blob(maps.text_path(idle), TEXT.pack(len(data), len(dups)) + data
                    + b"".join(DUP.pack(k, n) for k, n in dups.items()))
    maps.meta.update(key, META.pack(sha, int(now()), *(counts[k] for k in COUNTS)))
    maps.set_word(idle | (C["XZ_CSAM_HOSTS"] if counts["hosts4"] + counts["hosts6"] else 0)
                  | (C["XZ_CSAM_PREFIXES"] if counts["prefixes4"] + counts["prefixes6"] else 0))
    return LoadResult(added, removed, idle, True)


def _write_list(maps: Maps, gen: int, lst: CsamList,
                progress: Progress | None) -> tuple[int, int]:
    """Bring generation ``gen`` to ``lst`` by the difference with its keys, read back;
    (added, removed)."""
    want_h = lst.hosts
    want_p = {LPM_KEY.pack(plen, a) for plen, a in lst.prefixes}
    have_h = set(maps.hosts[gen].keys())
    have_p = set(maps.prefixes[gen].keys())
    add_h, del_h = list(want_h - have_h), list(have_h - want_h)
    add_p, del_p = list(want_p - have_p), list(have_p - want_p)
    step = progress(len(add_h) + len(del_h) + len(add_p) + len(del_p)) if progress else None
    # Deletes first: the tables never hold more than the larger of old and new.
    maps.hosts[gen].delete_many(del_h, step)
    maps.prefixes[gen].delete_many(del_p, step)
    maps.hosts[gen].update_many(add_h, LISTED, step)
    maps.prefixes[gen].update_many(add_p, LISTED, step)
    maps.write_dir(gen, dirs.csam(lst.hosts, lst.prefixes))
    return len(add_h) + len(add_p), len(del_h) + len(del_p)


def _write_delta(maps: Maps, gen: int, old: Held, delta: dict[bytes, int],
                 progress: Progress | None
                 ) -> tuple[int, int, dict[str, int], dict[bytes, int]]:
    """Apply ``delta`` (per entry: lines that write it, added less removed) to generation
    ``gen``, which holds ``old``; (added, removed, counts, entries on more than one line).

    An entry goes when no line writes it any more: on one line unless ``old.dups`` says
    more. An entry some added line writes is written unless the generation has it (then
    some unchanged line wrote it, or a removed one)."""
    dups, counts = dict(old.dups), dict(old.counts)
    gone = [k for k, d in delta.items() if d < 0 and dups.get(k, 1) + d <= 0]
    new = [k for k, d in delta.items() if d > 0]
    step = progress(len(gone) + len(new)) if progress else None
    hosts, prefixes = maps.hosts[gen], maps.prefixes[gen]
    hosts.delete_many([k[4:] for k in gone if k[:4] == HOST], step)
    prefixes.delete_many([k for k in gone if k[:4] != HOST], step)
    had = {HOST + a for a in hosts.add_new([k[4:] for k in new if k[:4] == HOST], LISTED)}
    had.update(prefixes.add_new([k for k in new if k[:4] != HOST], LISTED))
    if step:
        step(len(new))
    for k, d in delta.items():
        before = dups.pop(k, 1) if d < 0 or k in had else 0
        after = max(before + d, 0)
        if after > 1:
            dups[k] = after
        if bool(before) != bool(after):
            kind = "hosts" if k[:4] == HOST else "prefixes"
            counts[kind + ("4" if k[4:16] == V4MAPPED else "6")] += 1 if after else -1
    return len(new) - len(had), len(gone), counts, dups


# ---- the text each generation was loaded from ----------------------------------------------
# In kernel memory only (kernel.pin_blob): this header, the file's bytes, then the entries
# that more than one line writes (as entry_key) and on how many lines.
TEXT = struct.Struct("=QI")               # length of the text, how many DUP records
DUP = struct.Struct("=20sI")


@dataclass(frozen=True)
class Held:
    """What a generation holds, as text: the file, its entries on more than one line, and
    the counts (from meta)."""

    text: bytes
    dups: dict[bytes, int]
    counts: dict[str, int]


def held(maps: Maps, gen: int) -> Held | None:
    """The text of generation ``gen``'s list; None unless it is kept, intact, and the list
    meta says the generation holds (meta is cleared while a generation is written)."""
    meta = maps.read_meta(gen)
    blob = kernel.read_blob(maps.text_path(gen)) if meta["loaded"] else None
    if blob is None:
        return None
    size, n = TEXT.unpack_from(blob)
    end = TEXT.size + size
    if end + n * DUP.size > len(blob):
        return None
    text = bytes(memoryview(blob)[TEXT.size:end])
    if hashlib.sha256(text).hexdigest() != meta["sha256"]:
        return None
    return Held(text, dict(DUP.iter_unpack(blob[end:end + n * DUP.size])),
                {k: meta[k] for k in COUNTS})


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


def check(maps: Maps, addr16: bytes) -> str | None:
    """Whether the list in force holds ``addr16``: "exact", "prefix" or None."""
    _, word = maps.word()
    gen = word & C["XZ_CSAM_GEN"]
    if maps.hosts[gen].lookup(addr16) is not None:
        return "exact"
    if maps.prefixes[gen].lookup(LPM_KEY.pack(128, addr16)) is not None:
        return "prefix"
    return None


def status(maps: Maps) -> dict:
    """Generation in force, its counts, digest and time; hits. No entry, ever."""
    _, word = maps.word()
    gen = word & C["XZ_CSAM_GEN"]
    return {"generation": gen, **maps.read_meta(gen), "hits": maps.hit_counts()}
