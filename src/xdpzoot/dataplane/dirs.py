"""The subscribers' IPv4 /24 directory (``struct xz_dir`` in bpf/xdpzoot.h): 2 bits for
every IPv4 /24 that tell the data plane which lookups can find anything for an address
there; filters (``struct xz_filter``): IPv6, a bit per hash of a /64 (or shorter), the CSAM
list's and the subscriber host entries'; IPv4 (``struct xz_filter4``), the CSAM list's, a
bit per hash of a /24, or per /24 for a list that touches more than 2^20 of them;
the CSAM list's IPv4 entries in lines of one cache line; the subscribers' class index.

Production traffic goes to a different, random address on nearly every packet, and every
step of a hash or trie walk then misses the CPU cache. The subscribers' directory answers
most packets with one byte ("no host entry here", "no prefix covers it"); the CSAM list's
filter (128 KiB, in the cache) says "nothing listed in this /24" of most destinations, and
its lines answer for the rest with one line each. A directory of zeros means "look
everything up", so a fresh or stale one is never wrong, only slower: changes made one at a
time only clear what they must, and a whole load writes the exact directory.

Plain functions over bytes; reading and writing the maps is the caller's. numpy is imported
by the functions that build whole directories only: a command that changes a few entries
does not pay for it.
Addresses are 16 bytes (IPv4 mapped into ::ffff:0:0/96), prefixes ``(len/128, address)``.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from xdpzoot.dataplane import schema
from xdpzoot.dataplane.layout import LPM_KEY, joined

if TYPE_CHECKING:
    import numpy as np

C = schema.C
BYTES = C["XZ_DIR_BYTES"]
SLASH24 = BYTES * 4                    # 2^24 /24s, 2 bits each
V4MAPPED = bytes(10) + b"\xff\xff"
# subscriber bits
NO_PREFIX, NO_HOST = C["XZ_SUB_DIR_NO_PREFIX"], C["XZ_SUB_DIR_NO_HOST"]
if SLASH24 != 1 << 24:
    raise ImportError("XZ_DIR_BYTES is not 2 bits for each of the 2^24 IPv4 /24s")


def slash24(addr: bytes) -> int | None:
    """The /24 number of a 16-byte IPv4-mapped address (None for IPv6)."""
    return int.from_bytes(addr[12:15], "big") if addr[:12] == V4MAPPED else None


def span(plen: int, addr: bytes) -> tuple[int, int, bool] | None:
    """The /24s an IPv4 prefix touches: (first, how many, covered whole); None for IPv6."""
    first = slash24(addr)
    if first is None:
        return None
    n = plen - 96
    return (first, 1 << (24 - n), True) if n <= 24 else (first, 1, False)


def get(d: bytes | bytearray, i: int) -> int:
    """State of /24 number ``i``."""
    return d[i >> 2] >> ((i & 3) << 1) & 3


def put(d: bytearray, i: int, state: int) -> None:
    shift = (i & 3) << 1
    d[i >> 2] = d[i >> 2] & ~(3 << shift) & 0xFF | state << shift


def _pack(states: np.ndarray) -> bytes:
    import numpy as np

    s = states.reshape(-1, 4)
    return (s[:, 0] | s[:, 1] << 2 | s[:, 2] << 4 | s[:, 3] << 6).astype(np.uint8).tobytes()


def _unpack(d: bytes | bytearray) -> np.ndarray:
    import numpy as np

    b = np.frombuffer(d, dtype=np.uint8)
    return np.stack([b & 3, b >> 2 & 3, b >> 4 & 3, b >> 6 & 3], axis=1).reshape(-1)


def _joined(addrs: Iterable[bytes] | bytes) -> bytes:
    """16-byte addresses in one buffer (given so, or joined here)."""
    if isinstance(addrs, bytes):
        return addrs
    return joined(addrs if isinstance(addrs, list) else list(addrs))


_V4_WORDS = struct.unpack("=3I", V4MAPPED)   # ::ffff:0:0/96 as native words


def _rows(addrs: Iterable[bytes] | bytes) -> tuple[np.ndarray, np.ndarray]:
    """16-byte addresses (or their buffer) as the rows of an array, and which of them are
    IPv4."""
    import numpy as np

    raw = np.frombuffer(_joined(addrs), dtype=np.uint8).reshape(-1, 16)
    return raw, v4_rows(raw)


def v4_rows(raw: np.ndarray) -> np.ndarray:
    """Which rows of 16-byte addresses (uint8, each row's bytes contiguous) are IPv4-mapped:
    the prefix's three words compared at once, 8x faster than its twelve bytes."""
    import numpy as np

    w = raw.view(np.uint32)
    return (w[:, 0] == _V4_WORDS[0]) & (w[:, 1] == _V4_WORDS[1]) & (w[:, 2] == _V4_WORDS[2])


def _slash24s(raw: np.ndarray) -> np.ndarray:
    """/24 numbers of rows of IPv4 addresses."""
    import numpy as np

    return raw[:, 12].astype(np.int64) << 16 | raw[:, 13].astype(np.int64) << 8 | raw[:, 14]


class Prefixes(NamedTuple):
    """Prefixes as columns: their lengths over 128 bits (int64) and addresses (rows of 16
    bytes, uint8), in the order given."""

    plen: np.ndarray
    raw: np.ndarray


Pairs = Iterable[tuple[int, bytes]]   # prefixes as (len/128, 16-byte address)


def columns(prefixes: Pairs | Prefixes) -> Prefixes:
    """``(len/128, address)`` pairs as Prefixes (Prefixes as they are)."""
    import numpy as np

    if isinstance(prefixes, Prefixes):
        return prefixes
    prefixes = list(prefixes)
    plen = np.fromiter((p for p, _ in prefixes), dtype=np.int64, count=len(prefixes))
    return Prefixes(plen, _rows([a for _, a in prefixes])[0])


def lpm_columns(keys: list[bytes]) -> Prefixes:
    """Packed LPM keys (struct xz_lpm_key: the length as a native word, the address) as
    Prefixes, in bulk: no pair made and taken apart for each key."""
    import numpy as np

    raw = np.frombuffer(joined(keys), dtype=np.uint8).reshape(-1, LPM_KEY.size)
    return Prefixes(raw[:, :4].copy().view(np.uint32).ravel().astype(np.int64),
                    np.ascontiguousarray(raw[:, 4:]))


def runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each of ``starts`` followed by the next ``counts - 1`` integers, in turn: every /24
    of prefixes from their first /24s and how many they cover."""
    import numpy as np

    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(np.asarray(starts, dtype=np.int64), counts) + offsets


def _prefixes24(prefixes: Pairs | Prefixes) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                      np.ndarray]:
    """(covered, partial, rows, lengths): the /24 numbers that IPv4 prefixes of /24 or
    shorter cover whole, and those of longer ones; the IPv6 prefixes' rows and lengths."""

    plen, raw = columns(prefixes)
    v4 = v4_rows(raw)
    first, n = _slash24s(raw[v4]), plen[v4] - 96
    whole = n <= 24
    starts, counts = first[whole], 1 << (24 - n[whole])
    return runs(starts, counts), first[~whole], raw[~v4], plen[~v4]


def csam(hosts: Iterable[bytes] | bytes, prefixes: Pairs) -> tuple[bytes, bytes]:
    """The exact IPv4 and IPv6 filters of a CSAM list (its addresses, or their buffer: at a
    million entries, joining them is most of the work)."""
    import numpy as np

    raw, v4 = _rows(hosts)
    covered, partial, raw6, plen6 = _prefixes24(prefixes)
    return (_v4_filter(np.concatenate([_slash24s(raw[v4]), covered, partial])),
            _v6_filter(np.concatenate([raw[~v4], raw6]),
                       np.concatenate([np.full(int((~v4).sum()), 128), plen6])))


# ---- filters (struct xz_filter) ------------------------------------------------------------
# IPv6: one bit for each hash of an address's first ``plen`` bits (at most /64): a clear
# bit, no entry covers the address. As the programs compute it: the first 8 bytes as a
# native word, AND the mask, times the multiplier, the top XZ_FILTER_BITS bits; bit h is
# bit h % 64 of native word h // 64. The CSAM list's ``plen`` is its shortest IPv6 entry's;
# the subscriber host entries' is 64. IPv4 (the CSAM list's): the same hash of the /24
# number, a bit for every /24 that an entry lies in or covers.

FILTER_BITS, FILTER_MUL = C["XZ_FILTER_BITS"], C["XZ_FILTER_MUL"]
FILTER_HEAD = struct.Struct("=IIQ")            # on, plen, mask
FILTER_HEAD_WORDS = FILTER_HEAD.size // 8
FILTER_WORDS = 1 << (FILTER_BITS - 6)
FILTER_BYTES = FILTER_HEAD.size + 8 * FILTER_WORDS
V6_MAX_PLEN = 64                           # an address counts by its /64


def v6_mask(plen: int) -> int:
    """The mask of the first ``plen`` (<= 64) bits of an address's first 8 bytes, native."""
    return int.from_bytes((((1 << plen) - 1) << (64 - plen)).to_bytes(8, "big"), sys.byteorder)


def filter_bit(w: int) -> int:
    """A filter's bit for key ``w`` (already under the filter's mask): the hash."""
    return (w * FILTER_MUL) % (1 << 64) >> (64 - FILTER_BITS)


def v6_bit(addr: bytes, mask: int) -> int:
    """The filter's bit for a 16-byte address, under ``mask``."""
    return filter_bit(int.from_bytes(addr[:8], sys.byteorder) & mask)


def _filter_words(keys: np.ndarray) -> bytes:
    """The bits of a filter (as its native words' bytes) for keys (uint64, already under
    the filter's mask): filter_bit of each, at once."""
    import numpy as np

    bits = np.zeros(1 << FILTER_BITS, dtype=bool)
    bits[_bits4(keys, *HASHED)] = True   # the same hash
    return np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64).tobytes()


def _v6_words(raw: np.ndarray, mask: int) -> bytes:
    """The bits of a filter for rows of IPv6 addresses."""
    import numpy as np

    w = np.ascontiguousarray(raw[:, :8]).view(np.uint64).ravel()
    return _filter_words(w & np.uint64(mask))


def _v6_filter(raw: np.ndarray, plens: np.ndarray) -> bytes:
    """The exact filter of IPv6 entries: their rows and lengths (its ``plen``: the
    shortest, at most 64)."""
    plen = int(min(V6_MAX_PLEN, plens.min(initial=V6_MAX_PLEN)))
    return FILTER_HEAD.pack(1, plen, v6_mask(plen)) + _v6_words(raw, v6_mask(plen))


# IPv4 (struct xz_filter4): a bit for every /24 that an entry lies in or covers, the key
# the /24 number: the hash of the IPv6 filters in its first 2^20 bits while the list
# touches at most that many /24s, else exact (the /24 number itself, 2^24 bits).
FILTER4_BITS = C["XZ_CSAM_V4_BITS"]
FILTER4_BYTES = FILTER_HEAD.size + (1 << FILTER4_BITS) // 8
HASHED = (64 - FILTER_BITS, FILTER_MUL)   # shift, mul (as the header has them)
EXACT = (0, 1)


def filter4_bit(f: bytes | bytearray, i: int) -> int:
    """IPv4 filter ``f``'s bit for /24 number ``i``, as the programs compute it."""
    _, shift, mul = FILTER_HEAD.unpack_from(f)
    return (i * mul) % (1 << 64) >> shift & ((1 << FILTER4_BITS) - 1)


def _bits4(slash24s: np.ndarray, shift: int, mul: int) -> np.ndarray:
    """An IPv4 filter's bits for /24 numbers (filter4_bit of each, at once); with HASHED,
    the IPv6 filters' for their keys (filter_bit)."""
    import numpy as np

    return (slash24s.astype(np.uint64) * np.uint64(mul)) >> np.uint64(shift)


def filter4(slash24s: np.ndarray, kind: tuple[int, int]) -> bytes:
    """The IPv4 filter of ``kind`` (HASHED or EXACT) with the bits of /24 numbers
    ``slash24s``."""
    import numpy as np

    bits = np.zeros(1 << (FILTER4_BITS if kind == EXACT else FILTER_BITS), dtype=bool)
    bits[_bits4(slash24s, *kind)] = True
    return _packed4(bits, kind)


def _packed4(bits: np.ndarray, kind: tuple[int, int]) -> bytes:
    """An IPv4 filter of ``kind`` with ``bits`` (bool) first, zeros after them."""
    import numpy as np

    return (FILTER_HEAD.pack(1, *kind) + np.packbits(bits, bitorder="little").tobytes()
            + bytes(FILTER4_BYTES - FILTER_HEAD.size - len(bits) // 8))


def _v4_filter(slash24s: np.ndarray) -> bytes:
    """The IPv4 /24 filter of a CSAM list from the /24 numbers its entries lie in or cover:
    hashed while there are at most as many as its hash has bits, else exact (hashed, it
    would be mostly ones and spare few lookups)."""
    import numpy as np

    if len(slash24s) <= 1 << FILTER_BITS:
        return filter4(slash24s, HASHED)
    bits = np.zeros(1 << FILTER4_BITS, dtype=bool)   # exact: its bits count the /24s
    bits[slash24s] = True
    if np.count_nonzero(bits) <= 1 << FILTER_BITS:
        return filter4(slash24s, HASHED)
    return _packed4(bits, EXACT)


def filter_bits(f: bytes | bytearray) -> int | None:
    """How many bits a filter uses: 2^20 hashed (an IPv4 filter's first 2^20), 2^24 an
    exact IPv4 one; None when it is off."""
    on, shift, _ = FILTER_HEAD.unpack_from(f)
    if not on:
        return None
    return 1 << FILTER_BITS if len(f) != FILTER4_BYTES or shift else 1 << FILTER4_BITS


def filter_fill(f: bytes | bytearray) -> float | None:
    """The share of a filter's bits in use (filter_bits) that are set; None when it is off."""
    n = filter_bits(f)
    if n is None:
        return None
    return int.from_bytes(memoryview(f)[FILTER_HEAD.size:][:n // 8], "little").bit_count() / n


def sub_v6_bit(addr: bytes) -> int:
    """The subscribers' IPv6 host filter's bit for a 16-byte address (plen 64)."""
    return v6_bit(addr, v6_mask(V6_MAX_PLEN))


def csam_v4_add(f: bytearray, added: Iterable[tuple[int, bytes]]) -> bool:
    """Set the bits of the /24s that ``added`` IPv4 entries lie in or cover in IPv4 filter
    ``f``; False (``f`` unchanged) when a hashed one would then hold more than its hash
    has bits, ones mostly: to be made anew (exact). One that is off stays off (it looks
    everything up). A removed entry leaves its bits, as in csam_v6_add."""
    import numpy as np

    on, shift, mul = FILTER_HEAD.unpack_from(f)
    spans = [s for s in (span(p, a) for p, a in added) if s]
    if not on or not spans:
        return True
    first, count = np.array([s[0] for s in spans]), np.array([s[1] for s in spans])
    if shift and int(count.sum()) > 1 << FILTER_BITS:
        return False
    h = _bits4(runs(first, count), shift, mul)
    words = np.frombuffer(f, dtype=np.uint64, offset=FILTER_HEAD.size).copy()
    np.bitwise_or.at(words, (h >> np.uint64(6)).astype(np.int64),
                     np.uint64(1) << (h & np.uint64(63)))
    if shift and np.bitwise_count(words).sum() > (1 << FILTER_BITS) * (1 - math.exp(-1)):
        return False   # fuller than 2^20 distinct /24s make it
    f[FILTER_HEAD.size:] = words.tobytes()
    return True


def csam_v6_add(f: bytearray, added: Iterable[tuple[int, bytes]]) -> bool:
    """Set the bits of ``added`` entries in filter ``f``; False (``f`` unchanged) when it
    cannot follow: it is off, or an IPv6 entry is shorter than its length while it holds
    any (an empty filter takes the new length). A removed entry leaves its bit, which may
    be another's too: a stale bit costs a lookup, never a miss."""
    on, plen, mask = FILTER_HEAD.unpack_from(f)
    words = memoryview(f)[FILTER_HEAD.size:].cast("Q")
    v6 = [(p, a) for p, a in added if a[:12] != V4MAPPED]
    shortest = min([V6_MAX_PLEN, *(p for p, _ in v6)])
    if not on or (shortest < plen and any(words)):
        return False
    if shortest < plen:
        plen, mask = shortest, v6_mask(shortest)
        FILTER_HEAD.pack_into(f, 0, on, plen, mask)
    for _, a in v6:
        h = v6_bit(a, mask)
        words[h >> 6] |= 1 << (h & 63)
    return True


def subscribers(hosts: Iterable[bytes], prefixes: Pairs | Prefixes) -> tuple[bytes, bytes]:
    """The exact IPv4 directory of the subscriber maps (host addresses and prefixes), and
    the exact IPv6 filter of their host addresses (plen 64): the host addresses joined
    once for both."""
    import numpy as np

    st = np.full(SLASH24, NO_PREFIX | NO_HOST, dtype=np.uint8)
    raw, v4 = _rows(hosts)
    st[_slash24s(raw[v4])] = NO_PREFIX
    covered, partial, _, _ = _prefixes24(prefixes)
    st[np.concatenate([covered, partial])] &= NO_HOST
    return _pack(st), _v6_filter(raw[~v4], np.zeros(0, dtype=np.int64))


V6_LENS = C["XZ_V6_LENS"]
LENS_FULL = bytes([0, 255]) + bytes(V6_LENS - 2)   # more lengths than it holds: off


def v6_prefix_keys(keys: Iterable[bytes]) -> list[tuple[int, bytes]]:
    """(position, key of xz_prefixes6) of the IPv6 keys among packed LPM keys: the same
    key, its address masked to its length (as the program builds it)."""
    from xdpzoot.dataplane.layout import masked

    keys = list(keys)
    if len(keys) > 64:   # a load: all at once
        return _v6_prefix_keys(keys)
    out = []
    for i, k in enumerate(keys):
        if k[4:16] != V4MAPPED:
            plen, addr = LPM_KEY.unpack(k)
            out.append((i, LPM_KEY.pack(plen, masked(addr, plen))))
    return out


def _v6_prefix_keys(keys: list[bytes]) -> list[tuple[int, bytes]]:
    """v6_prefix_keys with numpy: the rows of IPv6 keys, each address ANDed with its
    length's mask."""
    import numpy as np

    raw = np.frombuffer(joined(keys), dtype=np.uint8).reshape(-1, LPM_KEY.size)
    six = np.flatnonzero(~v4_rows(raw[:, 4:]))
    rows = raw[six].copy()
    plen = np.minimum(rows[:, :4].copy().view(np.uint32).ravel(), 128)
    bits = np.arange(128)
    masks = np.packbits(bits[None, :] < np.arange(129)[:, None], axis=1)   # length -> mask
    rows[:, 4:] &= masks[plen]
    return list(zip(six.tolist(), [r.tobytes() for r in rows], strict=True))


def lens_word(lengths: Iterable[int]) -> bytes:
    """struct xz_v6_lens of a set of prefix lengths: longest first, zeros after; LENS_FULL
    for more than it holds (the trie answers)."""
    ls = sorted(set(lengths), reverse=True)
    return LENS_FULL if len(ls) > V6_LENS else bytes(ls) + bytes(V6_LENS - len(ls))


def lens_of(raw: bytes) -> list[int]:
    """The lengths a struct xz_v6_lens has the programs probe (none: the trie answers)."""
    return [] if raw == LENS_FULL else [n for n in raw if n]


def lens_add(raw: bytes, lengths: Iterable[int]) -> bytes:
    """struct xz_v6_lens with ``lengths`` too; LENS_FULL stays (until a whole sync)."""
    return raw if raw == LENS_FULL else lens_word([*lens_of(raw), *lengths])


def union(a: bytes, b: bytes) -> bytes:
    """A subscriber directory right for the entries of both ``a`` and ``b`` (a bit that
    says something is absent stays only where both say so)."""
    import numpy as np

    return (np.frombuffer(a, dtype=np.uint8) & np.frombuffer(b, dtype=np.uint8)).tobytes()


def subscriber_added(d: bytearray, hosts: Iterable[bytes],
                     prefixes: Iterable[tuple[int, bytes]]) -> bool:
    """Clear what the directory says is absent where new entries go; whether anything
    changed."""
    changed = False
    for i, bit in [(slash24(a), NO_HOST) for a in hosts] + [
            (i, NO_PREFIX) for plen, addr in prefixes
            for s in [span(plen, addr)] if s for i in range(s[0], s[0] + s[1])]:
        if i is not None and get(d, i) & bit:
            put(d, i, get(d, i) & ~bit)
            changed = True
    return changed


# ---- the class index (struct xz_sub_idx, xz_uniform, xz_sub_hosted) -----------------------
# For each IPv4 /24 a 16-bit lane: 0, "look it up", or the index in xz_uniform of the class
# of the one prefix that answers for every address of the /24: the longest IPv4 prefix of
# /8../24 covering it whole, where no longer prefix lies and no host entry does. A pool
# address's class is then two loads of small, hot arrays, not a walk of the trie. A /24
# where host entries lie (static hosts in a pool, RADIUS sessions) has instead a lane of
# HOSTED | n, entry n of xz_sub_hosted naming the /24, the class and which addresses are
# host entries (those look up; the rest have the class; a mark without a host entry only
# costs a lookup). Writers keep it true: every write of a prefix first zeroes the lanes of
# the /24s the key touches, a host entry's write first marks its address (Maps._unshare),
# and a sync (Maps.sync_uniform) sets everything from the maps again.

LANES = C["XZ_IDX_LANES"]
UNIFORM_MIN = 8    # prefixes shorter than /8 own no lanes (a /8 is 65,536 of them)


def index_rows(prefixes: Pairs | Prefixes) -> list[int]:
    """The xz_sub_idx entries (LANES /24s each) that hold the lanes of the /24s where
    ``prefixes`` lie, in order."""

    _, first, count, _ = _v4_spans(columns(prefixes))
    r0, k = first // LANES, (first + count - 1) // LANES - first // LANES + 1
    return distinct(runs(r0, k)).tolist()


def _v4_spans(prefixes: Prefixes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Of the IPv4 prefixes of /8 or longer among ``prefixes`` (the others, shorter or
    IPv6, never own a lane, so that writing them changes none): their positions in
    ``prefixes``, first /24s, how many /24s each touches, and lengths (len/128)."""
    import numpy as np

    plen, raw = prefixes
    pos = np.flatnonzero(v4_rows(raw) & (plen - 96 >= UNIFORM_MIN))
    n = plen[pos] - 96
    count = np.where(n <= 24, np.left_shift(1, np.clip(24 - n, 0, 24)), 1)
    return pos, _slash24s(raw[pos]), count, plen[pos]


def uniform(prefixes: Pairs | Prefixes, d: bytes | bytearray, cap: int,
            hosts: Callable[[], Iterable[bytes]], hosted_cap: int,
            ) -> tuple[np.ndarray, np.ndarray, list[int], dict[int, int]]:
    """The lanes the prefix map's ``prefixes`` make with the
    subscriber directory ``d`` and the host entries (``hosts()``, read only when the
    directory says a /24 that a prefix covers whole may hold one): (/24 numbers, their
    class's index, the prefix of each index: ``owners[i - 1]`` is the position in
    ``prefixes`` of index i, {/24: a 256-bit mask of the addresses that are host entries}
    for the /24s of the first array that hold any). At most ``cap - 1`` indexes (index 0
    means none) and ``hosted_cap - 1`` /24s with hosts: those past them get no lane. The
    indexes go to the prefixes by their first /24 and length, whatever their order in
    ``prefixes`` (the trie's, read back, or the file's)."""
    import numpy as np

    prefixes = columns(prefixes)
    pos, first, count, plen = _v4_spans(prefixes)   # pos: in ``prefixes``
    if not len(pos):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint16), [], {}
    whole = np.flatnonzero(plen <= 96 + 24)
    partial = first[plen > 96 + 24]
    whole = whole[np.argsort(-plen[whole], kind="stable")]   # longest first
    counts = count[whole]
    slash = runs(first[whole], counts)
    owner = np.repeat(whole, counts)   # (in pos)
    slash, at = np.unique(slash, return_index=True)   # each /24's longest
    owner = owner[at]
    keep = ~np.isin(slash, partial)
    slash, owner = slash[keep], owner[keep]
    b = np.frombuffer(d, dtype=np.uint8)
    maybe = ((b[slash >> 2] >> ((slash & 3) << 1)) & NO_HOST) == 0
    bits: dict[int, int] = {}
    if maybe.any():   # which of them hold a host entry, and where
        keys = np.frombuffer(joined(hosts()), dtype=np.uint8).reshape(-1, 16)
        keys = keys[(keys[:, :12] == np.frombuffer(V4MAPPED, dtype=np.uint8)).all(axis=1)]
        at24 = (keys[:, 12].astype(np.int64) << 16) | (keys[:, 13].astype(np.int64) << 8) \
            | keys[:, 14]
        there = np.isin(at24, slash[maybe])
        held, row = np.unique(at24[there], return_inverse=True)
        last = keys[there, 15].astype(np.uint64)
        words = np.zeros((len(held), 4), dtype=np.uint64)   # the mask's four words a /24
        np.bitwise_or.at(words, (row, (last >> np.uint64(6)).astype(np.int64)),
                         np.uint64(1) << (last & np.uint64(63)))
        bits = {i: sum(w << (64 * k) for k, w in enumerate(ws))
                for i, ws in zip(held.tolist(), words.tolist(), strict=True)}
        over = sorted(bits)[max(hosted_cap - 1, 0):]   # no room: these /24s look up
        for i in over:
            del bits[i]
        if over:
            room = ~np.isin(slash, over)
            slash, owner = slash[room], owner[room]
    owners = distinct(owner)
    owners = owners[np.lexsort((plen[owners], first[owners]))][:cap - 1]
    index = np.zeros(len(pos), dtype=np.int64)
    index[owners] = np.arange(1, len(owners) + 1)
    lanes = index[owner].astype(np.uint16)
    got = lanes != 0
    slash = slash[got]
    return (slash, lanes[got], pos[owners].tolist(),
            {i: bits[i] for i in slash.tolist() if i in bits})


def states(d: bytes | bytearray) -> np.ndarray:
    """Every /24's state (tests, status)."""
    return _unpack(d)


# ---- the CSAM list's IPv4 exact addresses in lines (struct xz_csam_line) -------------------
# Not a directory but the same kind of help: a generation's IPv4 addresses, in the line their
# hash names, so that the programs find one in one cache line instead of the hash's bucket
# and element. The hash keeps every address; ``more`` counts a line's addresses that are only
# there (the line was full, or the address is 0.0.0.0). Every change keeps the addresses that
# stay where they are: a program that reads a line while it is written finds each of them.
LINE_KEYS = C["XZ_CSAM_LINE_KEYS"]
LINE_WORDS = LINE_KEYS + 1            # the addresses, then ``more``
LINE_HASH = C["XZ_CSAM_HASH"]


def v4_words(addrs: Iterable[bytes] | bytes) -> np.ndarray:
    """The IPv4 ones of the 16-byte ``addrs`` (or their buffer) as the programs load them:
    the four bytes as a native word."""
    import numpy as np

    a, v4 = _rows(addrs)
    return np.ascontiguousarray(a[v4, 12:]).view(np.uint32).ravel()


def line_of(words: np.ndarray, nlines: int, by: int = 0) -> np.ndarray:
    """The line of each address word, in a table of ``nlines`` (a power of two) lines; of
    each prefix word by its /24 (``by`` NET_BY) in a table of net lines."""
    import numpy as np

    shift = 32 - (nlines.bit_length() - 1)
    return (((words.astype(np.uint64) >> by) * LINE_HASH & 0xFFFF_FFFF) >> shift
            ).astype(np.intp)


def lines_remove(t: np.ndarray, words: np.ndarray, by: int = 0) -> None:
    """Take the addresses ``words`` (each in the table, as often as it comes) out of the
    lines ``t`` (an ``(nlines, LINE_WORDS)`` uint32 array): a slot freed, or one less in
    ``more``. (``by``: as for line_of, here and below.)"""
    import numpy as np

    while len(words):
        if by:   # net words may come twice (two prefixes that cover one /24): once a pass
            _, first = distinct(words, first=True)
            rest = np.ones(len(words), dtype=bool)
            rest[first] = False
            words, later = words[first], words[rest]
        else:
            later = words[:0]
        li = line_of(words, len(t), by)
        hit = (t[li, :LINE_KEYS] == words[:, None]) & (words[:, None] != 0)
        found = hit.any(axis=1)
        t[li[found], hit[found].argmax(axis=1)] = 0
        np.subtract.at(t[:, LINE_KEYS], li[~found], 1)
        words = later


def stable_order(keys: np.ndarray) -> np.ndarray:
    """The order that sorts ``keys`` (integers from 0 to 2^32 - 1), equal ones in the order
    they come. Stable: with numpy's default sort, the ranks of 3,000 addresses came out
    negative under `make vmtest`'s emulated CPU (QEMU 7.2, TCG), never on a real one; its
    stable sort gives the right ones there too. Two passes of 16 bits: numpy's stable sort
    of 16-bit keys is a radix sort, 3-4x faster than its stable sort of wider ones."""
    import numpy as np

    order = np.argsort(keys.astype(np.uint16), kind="stable")
    return order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]


def heads(s: np.ndarray) -> np.ndarray:
    """Where each run of equal values of the sorted array ``s`` begins."""
    import numpy as np

    return np.concatenate(([True], s[1:] != s[:-1])) if len(s) else np.zeros(0, dtype=bool)


def distinct(a: np.ndarray, first: bool = False) -> Any:
    """The distinct values of ``a`` (integers from 0 to 2^32 - 1), in order; with ``first``,
    also the index in ``a`` of each one's first occurrence. (numpy's unique hashes here:
    0.24 s at 765k values.)"""
    order = stable_order(a)
    s = a[order]
    h = heads(s)
    return (s[h], order[h]) if first else s[h]


def _ranked(t: np.ndarray, words: np.ndarray, by: int = 0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The new addresses ``words`` of the lines ``t`` by line: (line, word, rank among the
    new ones of its line). 0.0.0.0 (a free slot would match it) is counted in its line's
    ``more`` here and left out."""
    import numpy as np

    zero = words == 0
    np.add.at(t[:, LINE_KEYS], line_of(words[zero], len(t), by), 1)
    words = words[~zero]
    li = line_of(words, len(t), by)
    order = stable_order(li)   # a line's addresses keep their order
    li, words = li[order], words[order]
    first = np.flatnonzero(heads(li))   # each line's
    return li, words, np.arange(len(li)) - np.repeat(first, np.diff(first, append=len(li)))


def lines_add(t: np.ndarray, words: np.ndarray, by: int = 0) -> None:
    """Put the addresses ``words`` (distinct, none in the table; net words may come twice
    or be there already) into the lines ``t``: each into a free slot of its line, or
    counted in its line's ``more``."""
    import numpy as np

    li, words, rank = _ranked(t, words, by)
    free = t[li, :LINE_KEYS] == 0
    nth = np.cumsum(free, axis=1, dtype=np.uint8)         # free slots up to each slot
    ok = nth[:, -1] > rank
    slot = np.argmax(free & (nth == (rank + 1)[:, None]), axis=1)
    t[li[ok], slot[ok]] = words[ok]
    np.add.at(t[:, LINE_KEYS], li[~ok], 1)


def lines_of(words: np.ndarray, nlines: int, by: int = 0) -> np.ndarray:
    """The lines of a table of ``nlines`` that holds exactly the addresses ``words``
    (lines_add into an empty table, where an address's slot is its rank)."""
    import numpy as np

    t = np.zeros((nlines, LINE_WORDS), dtype=np.uint32)
    li, words, rank = _ranked(t, words, by)
    ok = rank < LINE_KEYS
    t[li[ok], rank[ok]] = words[ok]
    np.add.at(t[:, LINE_KEYS], li[~ok], 1)
    return t


# ---- its IPv4 prefixes in net lines (struct xz_csam_line, XZ_CSAM_NETS) ------------------
# The same lines, by the prefix's /24: a prefix of /24../31 is its network in host order with
# the bit under the prefix set (never 0), so that the programs match it without knowing its
# length beforehand; a shorter one is a /24 word for each /24 it covers. Two prefixes that
# cover one /24 give it two like words: each goes with its own prefix. So a net line holds
# every prefix that covers an address of its /24s, or counts in ``more`` those that did
# not fit (their lookups go on to the trie).
NET_BY = 8                            # line_of's ``by`` for net lines: hashed by the /24


def net_count(plen: int, addr: bytes) -> int:
    """How many net words prefix ``(len/128, address)`` is (v4_nets; 0: IPv6, an address)."""
    return 1 << max(0, 120 - plen) if addr[:12] == V4MAPPED and plen < 128 else 0


def v4_nets(prefixes: Iterable[tuple[int, bytes]]) -> np.ndarray:
    """The IPv4 ones of ``prefixes`` (``(len/128, 16-byte address)``) as net words: one for
    each /24../31, one for each /24 a shorter one covers."""
    import numpy as np

    prefixes = [(p, a) for p, a in prefixes if a[:12] == V4MAPPED and p < 128]
    if not prefixes:
        return np.zeros(0, dtype=np.uint32)
    plen = np.fromiter((p for p, _ in prefixes), dtype=np.int64, count=len(prefixes)) - 96
    net = np.ascontiguousarray(_rows([a for _, a in prefixes])[0][:, 12:]
                               ).view(">u4").ravel().astype(np.int64)
    counts = np.left_shift(1, np.maximum(24 - plen, 0))   # the /24s each one is
    slash = runs(net >> 8, counts)
    low = np.repeat(np.where(plen > 24, net & 0xFF, 0), counts)   # within the /24
    bit = np.repeat(np.minimum(31 - plen, 7), counts)   # a /24 and shorter: the /24's bit
    return (slash << 8 | low | np.left_shift(1, bit)).astype(np.uint32)
