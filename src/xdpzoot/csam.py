"""The CSAM address list: parse and validate the file, then swap it into the kernel whole.

The list is confidential: no function here returns, logs or formats an entry of it in an
error; problems name the file and line only. The list is written nowhere but the maps.

Kernel side (bpf/maps.h): two generations of an exact-address hash and a prefix trie;
the idle generation is brought to the new list by diff, then one write of the control
word (``xz_control.csam``) switches every packet from the whole old list to the whole new
one. This module talks to the pinned maps through :class:`kernel.PinnedMap`, without
bcc, so that a small change is applied in well under a second.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import schema
from .kernel import KernelError, PinnedMap
from .sources import V4MAPPED_PROBLEM, SourceError, overlaps_v4mapped
from .tables import Key

V4MAPPED = bytes(10) + b"\xff\xff"
_WS = " \t\r\x0b\x0c"   # what bytes.strip() removes (and str.strip() more): one verdict
# Raw layouts of bpf/xdpzoot.h (checked against bcc's types in tests/test_csam.py).
LPM_KEY = struct.Struct("=I16s")          # struct xz_lpm_key
CONTROL = struct.Struct("=II")            # struct xz_control: its first two words, flags, csam
META = struct.Struct("=32sQIIII")         # struct xz_csam_meta
LISTED = b"\x01"
C = schema.C


@dataclass(frozen=True)
class CsamList:
    """A validated list: exact addresses (16 bytes) and prefixes ((len/128, address))."""

    hosts: frozenset[bytes]
    prefixes: frozenset[Key]
    sha256: bytes
    hosts4: int   # how many of the hosts are IPv4 (counted while parsing)

    def counts(self) -> dict[str, int]:
        p4 = sum(1 for _, a in self.prefixes if a[:12] == V4MAPPED)
        return {"hosts4": self.hosts4, "hosts6": len(self.hosts) - self.hosts4,
                "prefixes4": p4, "prefixes6": len(self.prefixes) - p4}





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
    return CsamList(frozenset(hosts), frozenset(prefixes), hashlib.sha256(data).digest(),
                    h4 + extra4)


def _parse_careful(data: bytes, path: str) -> CsamList:
    """Line by line, collecting every problem with its line number (never the entry)."""
    hosts: set[bytes] = set()
    prefixes: set[Key] = set()
    problems: list[tuple[int | None, str]] = []
    for n, line in enumerate(data.split(b"\n"), 1):
        s = line.split(b"#", 1)[0].strip() if b"#" in line else line.strip()
        if not s:
            continue
        h, p, problem = _parse_line(s)
        if problem:
            problems.append((n, problem))
        elif h is not None:
            hosts.add(h)
        else:
            prefixes.add(p)
    if problems:
        raise SourceError(path, problems)
    return CsamList(frozenset(hosts), frozenset(prefixes), hashlib.sha256(data).digest(),
                    sum(1 for a in hosts if a[:12] == V4MAPPED))


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
        self.control = p("xz_control")
        self.meta = p("xz_csam_meta")
        self.hits = p("xz_csam_hits")
        self.hosts = (p("xz_csam_h0"), p("xz_csam_h1"))
        self.prefixes = (p("xz_csam_p0"), p("xz_csam_p1"))

    def close(self) -> None:
        for m in (self.control, self.meta, self.hits, *self.hosts, *self.prefixes):
            m.close()

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


def load(maps: Maps, lst: CsamList, progress: Callable[[int], None] | None = None,
         now: Callable[[], float] = time.time) -> LoadResult:
    """Make ``lst`` the list in force: diff it into the idle generation, then switch.

    The same list (by digest) as the one in force writes nothing.
    """
    _, word = maps.word()
    gen = word & C["XZ_CSAM_GEN"]
    active = maps.read_meta(gen)
    if active["sha256"] == lst.sha256.hex():
        return LoadResult(0, 0, gen, False)
    idle = 1 - gen
    want_h = lst.hosts
    want_p = {LPM_KEY.pack(plen, a) for plen, a in lst.prefixes}
    have_h = set(maps.hosts[idle].keys())
    have_p = set(maps.prefixes[idle].keys())
    add_h, del_h = list(want_h - have_h), list(have_h - want_h)
    add_p, del_p = list(want_p - have_p), list(have_p - want_p)
    # Deletes first: the idle tables never hold more than the larger of old and new.
    maps.hosts[idle].delete_many(del_h, progress)
    maps.prefixes[idle].delete_many(del_p, progress)
    maps.hosts[idle].update_many(add_h, LISTED, progress)
    maps.prefixes[idle].update_many(add_p, LISTED, progress)
    c = lst.counts()
    maps.meta.update(struct.pack("=I", idle), META.pack(
        lst.sha256, int(now()), c["hosts4"], c["hosts6"], c["prefixes4"], c["prefixes6"]))
    new = idle | (C["XZ_CSAM_HOSTS"] if want_h else 0) | (C["XZ_CSAM_PREFIXES"] if want_p else 0)
    maps.set_word(new)
    return LoadResult(len(add_h) + len(add_p), len(del_h) + len(del_p), idle, True)


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
