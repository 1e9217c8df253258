"""The CSAM list into the kernel: written whole into the idle generation, then switched in.

Kernel side (bpf/maps.h): two generations of an exact-address hash and a prefix trie;
the idle generation is brought to the new list by diff, then one write of the control
word (``xz_control.csam``) switches every packet from the whole old list to the whole new
one, and the generation that was in force, idle now, is brought to the new list too.
Each generation also has an IPv4 /24 filter and an IPv6 filter (dirs.py) that answer most
packets without any lookup: written whole with a whole list, their bits set entry by entry
with a difference (the IPv6 one made anew from the generation's keys when an entry shorter
than all before it comes); and its IPv4 exact addresses again in lines of one cache line
(dirs.lines_*, written through a mapping of the array), which the programs read instead of
the hash once the control word says so (``XZ_CSAM_LINED``), and its IPv4 prefixes in net
lines by their /24 (``XZ_CSAM_NETS``), read instead of the trie: changed with the hash and
the trie, or made anew with a whole list when the generation held nothing trusted or its
list's size asks for more or fewer lines. A generation uses as many
of its lines as its list's size asks for (:func:`used_lines`; the control word says how
many), so that a small list's lines lie in few pages. The
maps are :class:`kernel.Maps`, without bcc, so that a small change is applied in well
under a second. The caller holds the instance's lock for the whole load
(:meth:`Instance.load_csam`): the switch is a read, a change and a write of xz_control.

Each generation also keeps, in a map of its own that no program uses (``xz_csam_t0/1``,
root only), the text of the file it was loaded from. A load compares the new file with the
idle generation's text and parses only the lines that differ: every other line was valid
when that list was loaded, and yields the entries the generation holds already.

The list is confidential: nothing here returns, logs or formats an entry of it.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xdpzoot.config import csam_line_bits
from xdpzoot.dataplane import dirs, kernel, schema
from xdpzoot.dataplane.kernel import Maps
from xdpzoot.dataplane.layout import LPM_KEY, META
from xdpzoot.sources import csam
from xdpzoot.sources.csam import HOST, LISTED, CsamList
from xdpzoot.sources.files import check_room, check_shrink, paused_gc

if TYPE_CHECKING:
    import numpy as np

V4MAPPED = bytes(10) + b"\xff\xff"
C = schema.C
COUNTS = ("hosts4", "hosts6", "prefixes4", "prefixes6")   # entries; and "nets4", net words
# A load's progress: given how many entries it will write, a callback for those written.
Progress = Callable[[int], Callable[[int], None] | None]


def lines_word(maps: Maps, counts: dict[str, int]) -> int:
    """The control word's bits that say how many lines and net lines a generation uses for a
    list of ``counts``: as many as config.csam_line_bits says for its IPv4 addresses (its
    IPv4 prefixes' net words, ``nets4``: a /16 is 256), at most all of them."""
    word = 0
    for kind, shift, n in (("l", "XZ_CSAM_LINES_SHIFT", counts["hosts4"]),
                           ("n", "XZ_CSAM_NETS_SHIFT", counts["nets4"])):
        most = maps.csam_line_count(kind).bit_length() - 1
        word |= min(most, csam_line_bits(n)) << C[shift]
    return word


def word_of(maps: Maps, gen: int, counts: dict[str, int]) -> int:
    """The control word that puts generation ``gen``, written with a list of ``counts``, in
    force: its lines, and the kinds of entry it has."""
    return (gen | C["XZ_CSAM_LINED"] | C["XZ_CSAM_NETS"] | lines_word(maps, counts)
            | (C["XZ_CSAM_HOSTS"] if counts["hosts4"] + counts["hosts6"] else 0)
            | (C["XZ_CSAM_PREFIXES"] if counts["prefixes4"] + counts["prefixes6"] else 0))


def used_lines(maps: Maps, gen: int, counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The lines and net lines that generation ``gen`` uses for a list of ``counts``."""
    return word_lines(maps, gen | lines_word(maps, counts))


def word_lines(maps: Maps, word: int) -> tuple[np.ndarray, np.ndarray]:
    """The lines and net lines that the programs read for control word ``word`` (of
    :func:`lines_word`; 0 bits: all of the generation's)."""
    gen, out = word & C["XZ_CSAM_GEN"], []
    for kind, shift in (("l", "XZ_CSAM_LINES_SHIFT"), ("n", "XZ_CSAM_NETS_SHIFT")):
        t, bits = maps.csam_lines(gen, kind), word >> C[shift] & C["XZ_CSAM_BITS_MASK"]
        out.append(t[:1 << bits] if bits else t)
    return out[0], out[1]


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
         progress: Progress | None = None, now: Callable[[], float] = time.time,
         max_shrink: float | None = None) -> LoadResult:
    """Make the list in ``data`` the list in force: bring the idle generation to it, then
    switch, then bring the generation that was in force (idle now) to it too. A file with
    an error changes nothing (SourceError); the same list (by digest) as the one in force
    writes nothing. So does a list that a generation cannot hold
    (``limits.csam_*``) and, given ``max_shrink``, an empty list or one with fewer than
    ``1 - max_shrink`` of the entries in force (``csam.max_shrink``; --force gives None):
    SourceError, before anything is written.

    When a generation's text is kept and intact, only the lines that differ from it are
    parsed and written; else the whole file is parsed (``lst``, if the caller parsed it
    already) and compared with the generation's keys, read back. Since both generations
    hold the list in force after a load, the next load writes only its difference with it.
    """
    with paused_gc():   # a whole load holds millions of objects: see files.paused_gc
        return _load(maps, data, path, lst, progress, now, max_shrink)


def _load(maps: Maps, data: bytes, path: str, lst: CsamList | None, progress: Progress | None,
          now: Callable[[], float], max_shrink: float | None) -> LoadResult:
    maps.check_writer()
    sha = hashlib.sha256(data).digest()
    _, word = maps.word()
    gen = word & C["XZ_CSAM_GEN"]
    if maps.read_meta(gen)["sha256"] == sha.hex():
        return LoadResult(0, 0, gen, False)
    idle = 1 - gen
    # Both generations held the same list (the last load brought both to it): what the
    # idle one's text says, and the difference, hold for the other one too.
    sha_idle = maps.read_meta(idle)["sha256"]
    same = sha_idle is not None and sha_idle == maps.read_meta(gen)["sha256"]
    before = sum(maps.read_meta(gen)[k] for k in COUNTS)   # entries in force
    memo: dict = {}   # what the two writes of this load share (_write_list)
    added, removed, counts, lst, old = _bring(maps, idle, data, path, lst, progress,
                                              max_shrink=max_shrink, before=before,
                                              memo=memo)
    maps.meta.update(struct.pack("=I", idle), _meta(sha, int(now()), counts))
    maps.set_word(word_of(maps, idle, counts))
    # The generation that was in force is idle now. (A packet that read the control word
    # before the switch may still look it up for a few microseconds: it finds a mix of the
    # old and the new list, neither more nor less than one of them would list.) A load
    # killed from here on leaves its meta cleared: the next load takes the whole path.
    _, _, counts, _, _ = _bring(maps, gen, data, path, lst, None, old if same else None,
                                maps.text_path(idle), memo=memo)
    maps.meta.update(struct.pack("=I", gen), _meta(sha, int(now()), counts))
    return LoadResult(added, removed, idle, True)


def stage(maps: Maps, data: bytes, path: str = "<csam>", lst: CsamList | None = None) -> int:
    """Write the list in ``data`` into the idle generation without putting it in force, and
    return the control word that would (set_word): the two generations then hold two lists
    (bench_lists times both in one instance). The next load brings both to its own list."""
    maps.check_writer()
    idle = 1 - (maps.word()[1] & C["XZ_CSAM_GEN"])
    _, _, counts, _, _ = _bring(maps, idle, data, path, lst, None)
    return word_of(maps, idle, counts)


def _meta(sha: bytes, now: int, counts: dict[str, int]) -> bytes:
    return META.pack(sha, now, *(counts[k] for k in COUNTS), counts["nets4"], 0)


def _counts(lst: CsamList) -> dict[str, int]:
    """The list's counts (COUNTS), and its net words ("nets4", dirs.net_count)."""
    return {**lst.counts(), "nets4": sum(dirs.net_count(p, a) for p, a in lst.prefixes)}


def _bring(maps: Maps, gen: int, data: bytes, path: str, lst: CsamList | None,
           progress: Progress | None, old: Held | None = None, text: str | None = None,
           max_shrink: float | None = None, before: int = 0, memo: dict | None = None
           ) -> tuple[int, int, dict[str, int], CsamList | None, Held | None]:
    """Write the list in ``data`` into generation ``gen``, which is not in force, with its
    text, and leave its meta cleared (the caller writes it); (added, removed, counts, the
    list when it was parsed, what the generation held). ``old``: what it holds, when known
    already; ``text``: where this list's text is pinned already. Refused before any write
    (SourceError): more entries than a generation holds, and given ``max_shrink``, fewer
    than ``1 - max_shrink`` of ``before``, the entries in force. ``memo``: shared with
    the other write of the same list (its filters and lines are computed once)."""
    old = old or held(maps, gen)
    delta = csam.text_delta(old.text, data) if old else None
    if delta is not None and not _surely_fits(maps, old, delta, before, max_shrink):
        delta = None   # near a limit: decided on the whole list, parsed
    if delta is not None and not _same_lines(maps, old, delta):
        delta = None   # its size asks for more or fewer lines: they are made anew
    if delta is None:
        lst = lst or csam.parse_csam_bytes(data, path)   # the careful parser names bad lines
        if max_shrink is not None:
            check_shrink(path, "list entries", before, lst.n_hosts + len(lst.prefixes),
                         max_shrink, "csam.max_shrink")
        check_room(path, "addresses", lst.n_hosts, maps.csam_hosts[gen].max_entries,
                   "limits.csam_hosts")
        check_room(path, "prefixes", len(lst.prefixes), maps.csam_prefixes[gen].max_entries,
                   "limits.csam_prefixes")
    # Until it is written whole, the generation holds no list that anything may trust.
    maps.meta.update(struct.pack("=I", gen), bytes(META.size))
    # Its lines hold its hash's IPv4 addresses and its net lines its trie's IPv4 prefixes
    # when it held a list (the same writes change them); else they are made anew.
    lines, nets = used_lines(maps, gen, old.counts) if old else (None, None)
    if delta is None and old and lines_word(maps, old.counts) != lines_word(maps, _counts(lst)):
        lines = nets = None   # the new list uses more or fewer: made anew
    if delta is not None:
        added, removed, counts, dups = _write_delta(maps, gen, old, delta, progress, lines,
                                                    nets)
        new = [LPM_KEY.unpack(k) for k, d in delta.items() if d > 0]
        v4, v6 = maps.read_csam_v4(gen), maps.read_csam_v6(gen)
        v4_ok, v6_ok = dirs.csam_v4_add(v4, new), dirs.csam_v6_add(v6, new)
        if not (v4_ok and v6_ok):   # made anew from what the generation holds
            made = dirs.csam(maps.csam_hosts[gen].keys(),
                             map(LPM_KEY.unpack, maps.csam_prefixes[gen].keys()))
            v4 = v4 if v4_ok else made[0]
            v6 = v6 if v6_ok else made[1]
        maps.write_csam_v4(gen, v4)
        maps.write_csam_v6(gen, v6)
    else:
        added, removed = _write_list(maps, gen, lst, progress, {} if memo is None else memo,
                                     lines, nets)
        counts, dups = _counts(lst), lst.dups
    if text:
        kernel.repin(text, maps.text_path(gen))
    else:
        kernel.pin_blob(maps.text_path(gen), TEXT.pack(len(data), len(dups)) + data
                        + b"".join(DUP.pack(k, n) for k, n in dups.items()))
    return added, removed, counts, lst, old


def _gone_new(old: Held, delta: dict[bytes, int]) -> tuple[list[bytes], list[bytes]]:
    """The entries of ``old`` that ``delta`` leaves no line to write (they go), and those
    that some added line writes (in ``old`` already or not)."""
    return ([k for k, d in delta.items() if d < 0 and old.dups.get(k, 1) + d <= 0],
            [k for k, d in delta.items() if d > 0])


def _surely_fits(maps: Maps, old: Held, delta: dict[bytes, int], before: int,
                 max_shrink: float | None) -> bool:
    """Whether the list ``delta`` makes of ``old`` passes the guards of :func:`load` for
    sure, from bounds: each added entry may or may not be in ``old`` already."""
    gone, new = _gone_new(old, delta)
    hosts = old.counts["hosts4"] + old.counts["hosts6"] - sum(k[:4] == HOST for k in gone)
    prefixes = (old.counts["prefixes4"] + old.counts["prefixes6"]
                - sum(k[:4] != HOST for k in gone))
    new_h = sum(k[:4] == HOST for k in new)
    least = hosts + prefixes
    if max_shrink is not None and (not least or before - least > max_shrink * before):
        return False
    return (hosts + new_h <= maps.csam_hosts[0].max_entries
            and prefixes + len(new) - new_h <= maps.csam_prefixes[0].max_entries)


def _v4_kind(k: bytes) -> str:
    """The count an IPv4 entry key (csam.entry_key) is in."""
    return "hosts4" if k[:4] == HOST else "prefixes4"


def _same_lines(maps: Maps, old: Held, delta: dict[bytes, int]) -> bool:
    """Whether the list ``delta`` makes of ``old`` surely uses as many lines and net lines
    as ``old`` (:func:`lines_word`), from bounds: each added entry may or may not be in
    ``old`` already, each gone one is gone."""
    gone, new = _gone_new(old, delta)
    low, high = dict(old.counts), dict(old.counts)
    for k in gone:
        if k[4:16] == V4MAPPED:
            words = dirs.net_count(*LPM_KEY.unpack(k))
            for bound in (low, high):
                bound[_v4_kind(k)] -= 1
                bound["nets4"] -= words
    for k in new:
        if k[4:16] == V4MAPPED:
            high[_v4_kind(k)] += 1
            high["nets4"] += dirs.net_count(*LPM_KEY.unpack(k))
    return lines_word(maps, low) == lines_word(maps, old.counts) == lines_word(maps, high)


def _write_list(maps: Maps, gen: int, lst: CsamList, progress: Progress | None,
                memo: dict, lines: np.ndarray | None, nets: np.ndarray | None
                ) -> tuple[int, int]:
    """Bring generation ``gen`` to ``lst`` by the difference with its keys, read back,
    and its ``lines`` and ``nets`` with them (None: they may not hold its keys, and are
    made anew); (added, removed). ``memo["made"]`` (:func:`_made`, made on another thread
    while the kernel writes the first generation) and ``memo["want_p"]`` (the prefix keys):
    what both writes of one list share."""
    if "made" not in memo:
        sizes = [len(t) for t in used_lines(maps, gen, _counts(lst))]
        pool = ThreadPoolExecutor(1)
        memo["made"] = pool.submit(_made, lst, *sizes)
        pool.shutdown(wait=False)   # the job runs on; its thread ends with it
        memo["want_p"] = {LPM_KEY.pack(plen, a) for plen, a in lst.prefixes}
    want_p = memo["want_p"]
    have_h = set(maps.csam_hosts[gen].keys())
    have_p = set(maps.csam_prefixes[gen].keys())
    if have_h:
        add_h: list[bytes] | bytes = list(lst.hosts - have_h)
        n_add_h = len(add_h)
        del_h = list(have_h - lst.hosts)
    else:   # an empty table (a first load): every address, joined as the list holds them
        add_h, n_add_h, del_h = lst.joined, lst.n_hosts, []
    add_p, del_p = list(want_p - have_p), list(have_p - want_p)
    step = progress(n_add_h + len(del_h) + len(add_p) + len(del_p)) if progress else None
    # Deletes first: the tables never hold more than the larger of old and new.
    maps.csam_hosts[gen].delete_many(del_h, step)
    maps.csam_prefixes[gen].delete_many(del_p, step)
    # The trie first: its batches take one CPU (one lock for the whole trie), the hash's
    # both, and numpy's work for _made the other one meanwhile.
    maps.csam_prefixes[gen].update_many(add_p, LISTED, step)
    maps.csam_hosts[gen].update_many(add_h, LISTED, step)
    made = memo["made"].result()
    if lines is not None and nets is not None:   # (both or neither: the generation held)
        dirs.lines_remove(lines, dirs.v4_words(del_h))
        dirs.lines_add(lines, dirs.v4_words(add_h))
        dirs.lines_remove(nets, dirs.v4_nets(map(LPM_KEY.unpack, del_p)), dirs.NET_BY)
        dirs.lines_add(nets, dirs.v4_nets(map(LPM_KEY.unpack, add_p)), dirs.NET_BY)
    else:
        lines, nets = used_lines(maps, gen, _counts(lst))
        lines[:] = made["lines"]
        nets[:] = made["nets"]
    maps.write_csam_v4(gen, made["v4"])
    maps.write_csam_v6(gen, made["v6"])
    return n_add_h + len(add_p), len(del_h) + len(del_p)


def _made(lst: CsamList, n_lines: int, n_nets: int) -> dict:
    """The list's IPv4 and IPv6 filters, and its lines and net lines in tables of
    ``n_lines`` and ``n_nets`` lines (the sizes its counts ask for): numpy's work, which
    runs while the kernel takes the batches (system calls that hold no Python lock)."""
    v4, v6 = dirs.csam(lst.joined, lst.prefixes)
    return {"v4": v4, "v6": v6, "lines": dirs.lines_of(dirs.v4_words(lst.joined), n_lines),
            "nets": dirs.lines_of(dirs.v4_nets(lst.prefixes), n_nets, dirs.NET_BY)}


def _write_delta(maps: Maps, gen: int, old: Held, delta: dict[bytes, int],
                 progress: Progress | None, lines: np.ndarray, nets: np.ndarray
                 ) -> tuple[int, int, dict[str, int], dict[bytes, int]]:
    """Apply ``delta`` (per entry: lines that write it, added less removed) to generation
    ``gen``, which holds ``old``, and to its ``lines`` and ``nets``; (added, removed,
    counts, entries on more than one line).

    An entry goes when no line writes it any more: on one line unless ``old.dups`` says
    more. An entry some added line writes is written unless the generation has it (then
    some unchanged line wrote it, or a removed one)."""
    dups, counts = dict(old.dups), dict(old.counts)
    gone, new = _gone_new(old, delta)
    step = progress(len(gone) + len(new)) if progress else None
    hosts, prefixes = maps.csam_hosts[gen], maps.csam_prefixes[gen]
    gone_h = [k[4:] for k in gone if k[:4] == HOST]
    hosts.delete_many(gone_h, step)
    gone_p = [k for k in gone if k[:4] != HOST]
    prefixes.delete_many(gone_p, step)
    new_h = [k[4:] for k in new if k[:4] == HOST]
    had_h = hosts.add_new(new_h, LISTED)
    dirs.lines_remove(lines, dirs.v4_words(gone_h))
    dirs.lines_add(lines, dirs.v4_words(set(new_h) - set(had_h)))
    had = {HOST + a for a in had_h}
    new_p = [k for k in new if k[:4] != HOST]
    had_p = prefixes.add_new(new_p, LISTED)
    had.update(had_p)
    dirs.lines_remove(nets, dirs.v4_nets(map(LPM_KEY.unpack, gone_p)), dirs.NET_BY)
    dirs.lines_add(nets, dirs.v4_nets(map(LPM_KEY.unpack, set(new_p) - set(had_p))),
                   dirs.NET_BY)
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
            counts["nets4"] += dirs.net_count(*LPM_KEY.unpack(k)) * (1 if after else -1)
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
                {k: meta[k] for k in (*COUNTS, "nets4")})


def check(maps: Maps, addr16: bytes) -> str | None:
    """Whether the list in force holds ``addr16``: "exact", "prefix" or None."""
    _, word = maps.word()
    gen = word & C["XZ_CSAM_GEN"]
    if maps.csam_hosts[gen].lookup(addr16) is not None:
        return "exact"
    if maps.csam_prefixes[gen].lookup(LPM_KEY.pack(128, addr16)) is not None:
        return "prefix"
    return None


def status(maps: Maps) -> dict:
    """Generation in force, its counts, digest and time; hits; per family, its filter's
    bits (2^20 hashed, 2^24 the exact IPv4 one; None: off, every address is looked up) and
    the share of them that are set (the share of addresses with nothing listed that are
    looked up all the same). No entry, ever."""
    _, word = maps.word()
    gen = word & C["XZ_CSAM_GEN"]
    filters = {"ipv4": maps.read_csam_v4(gen), "ipv6": maps.read_csam_v6(gen)}
    return {"generation": gen, **maps.read_meta(gen), "hits": maps.hit_counts(),
            "filter_fill": {k: dirs.filter_fill(f) for k, f in filters.items()},
            "filter_bits": {k: dirs.filter_bits(f) for k, f in filters.items()}}
