"""Bring the kernel maps to a desired state by writing only the difference.

Pure diff functions plus thin ``apply_*`` helpers that use :class:`kernel.Maps`. Subscriber
tables are :class:`kernel.ClassTable` columns: a load reads both maps whole, keeps the
suspensions, gives out state slots and diffs a million entries in bulk.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from xdpzoot.dataplane import dirs, schema
from xdpzoot.dataplane.kernel import KernelError, Maps
from xdpzoot.dataplane.layout import (
    CLASS,
    LPM_KEY,
    POOL_BITS_WORD,
    U32,
    WORDS,
    ClassTable,
    Entry,
    class_word,
    masked,
)
from xdpzoot.sources.files import check_room, check_shrink, paused_gc
from xdpzoot.tables import Key

if TYPE_CHECKING:
    import numpy as np

SUSPENDED = schema.C["XZ_F_SUSPENDED"]
SESSION = schema.C["XZ_F_SESSION"]
_SUSPENDED_WORD = class_word(0, SUSPENDED)
_SESSION_WORD = class_word(0, SESSION)
_TYPE_MASK = class_word(0xFF, 0)
_DYNAMIC_WORD = class_word(schema.TYPES["dynamic"], 0)
POOL_BITS = schema.C["XZ_POOL_MAX_BITS"]   # indexed pools: at most 2^16 addresses
_V4MAPPED = bytes(10) + b"\xff\xff"


@dataclass(frozen=True)
class Change:
    """What a sync wrote (or would write), as counts."""

    added: int = 0
    changed: int = 0
    removed: int = 0

    def __add__(self, o: Change) -> Change:
        return Change(self.added + o.added, self.changed + o.changed, self.removed + o.removed)

    @property
    def total(self) -> int:
        return self.added + self.changed + self.removed


def diff(current: dict, desired: dict) -> tuple[dict, list, Change]:
    """Entries to write (new or changed) and keys to delete to turn current into desired."""
    write = {k: v for k, v in desired.items() if current.get(k) != v}
    remove = [k for k in current if k not in desired]
    added = sum(1 for k in write if k not in current)
    return write, remove, Change(added, len(write) - added, len(remove))


class Diff(NamedTuple):
    """What turns a subscriber map's contents into the desired ones."""

    write: ClassTable     # entries new or changed
    remove: list[bytes]   # keys to delete
    change: Change


class Plan(NamedTuple):
    """A subscriber load: the writes to both maps and to the contracts, the state slots
    then free, and the IPv4 directory of what the maps then hold (dirs.py)."""

    hosts: Diff
    prefixes: Diff
    freed: set[int]
    dir: bytes
    pool_clear: list[tuple[int, int]]   # pool-address blocks that held another pool's state
    held: tuple[int, int] = (0, 0)      # host and prefix entries in the maps before
    contracts: Diff | None = None       # xz_contracts, keyed by U32 subscriber id
    # session entries re-resolved (in hosts/prefixes too): changed, removed, and of the
    # removed (in ``added``) those a row of the file takes over
    sessions: Change = Change()
    v6: bytes | None = None             # the exact IPv6 filter of the host entries
    # the prefix map's keys before, and its entries once the plan is written
    trie: tuple[list[bytes], ClassTable] | None = None

    @property
    def change(self) -> Change:
        """The file's entries: what the load changed, session entries left out (a row that
        takes over a session's address is added)."""
        total, s = self.hosts.change + self.prefixes.change, self.sessions
        return Change(total.added + s.added, total.changed - s.changed - s.added,
                      total.removed - (s.removed - s.added))


def diff_table(current: ClassTable, desired: ClassTable) -> Diff:
    """:func:`diff` for ClassTables, in bulk."""
    row = dict(zip(current.keys, range(len(current)), strict=True))
    at = list(map(row.get, desired.keys))   # desired entry -> its current row, or None
    added = at.count(None)
    if added == len(at):   # nothing in common: a first load
        return Diff(desired, list(current.keys), Change(added, 0, len(current)))
    n = CLASS.size
    old, new = current.values.tobytes(), desired.values.tobytes()
    write = [i for i, j in enumerate(at)
             if j is None or old[j * n:(j + 1) * n] != new[i * n:(i + 1) * n]]
    remove = []
    if len(at) - added < len(current):   # not every current entry stays
        kept = set(at)
        remove = [k for j, k in enumerate(current.keys) if j not in kept]
    return Diff(desired if len(write) == len(desired) else desired.take(write), remove,
                Change(added, len(write) - added, len(remove)))


def keep_suspensions(cur_hosts: ClassTable, cur_prefixes: ClassTable,
                     hosts: ClassTable, prefixes: ClassTable) -> None:
    """Suspensions are sticky across reloads of the subscriber file: an entry suspended
    in the kernel stays suspended until ``resume``. A suspended address of a dynamic
    pool keeps its host entry while the pool is still in the file."""
    suspended_hosts, suspended_prefixes = _suspended(cur_hosts), _suspended(cur_prefixes)
    if not suspended_hosts and not suspended_prefixes:
        return
    host_row = dict(zip(hosts.keys, range(len(hosts)), strict=True))
    prefix_row = dict(zip(prefixes.keys, range(len(prefixes)), strict=True))
    for j in suspended_hosts:
        a = cur_hosts.keys[j]
        i = host_row.get(a)
        if i is not None:
            hosts.values[i * WORDS + 1] |= _SUSPENDED_WORD
            continue
        pool = _longest(prefix_row, a)
        if pool is not None and prefixes.values[pool * WORDS + 1] & _TYPE_MASK == _DYNAMIC_WORD:
            e = prefixes.entry(pool)
            hosts.append(a, e._replace(flags=e.flags | SUSPENDED))
    for j in suspended_prefixes:
        k = cur_prefixes.keys[j]
        i = prefix_row.get(k)
        if i is not None:
            prefixes.values[i * WORDS + 1] |= _SUSPENDED_WORD
            continue
        plen, a = LPM_KEY.unpack(k)   # a suspended /64 of an IPv6 pool (suspend ADDRESS)
        pool = _longest(prefix_row, a, 63) if plen == 64 and a[:12] != _V4MAPPED else None
        if pool is not None and prefixes.values[pool * WORDS + 1] & _TYPE_MASK == _DYNAMIC_WORD:
            e = prefixes.entry(pool)
            prefixes.append(k, e._replace(flags=e.flags | SUSPENDED))


def _suspended(t: ClassTable) -> list[int]:
    """Rows of ``t`` with the suspended flag."""
    return [i for i, w in enumerate(t.column(1)) if w & _SUSPENDED_WORD]


def _longest(prefix_row: dict[bytes, int], a: bytes, longest: int = 128) -> int | None:
    """Row of the longest prefix holding address ``a`` (of ``longest`` bits or fewer), as
    the trie finds it."""
    for plen in range(longest, -1, -1):
        i = prefix_row.get(LPM_KEY.pack(plen, masked(a, plen)))
        if i is not None:
            return i
    return None


def assign_slots(cur_hosts: ClassTable, cur_prefixes: ClassTable,
                 hosts: ClassTable, prefixes: ClassTable, limit: int,
                 cur_contracts: ClassTable | None = None,
                 contracts: ClassTable | None = None) -> set[int]:
    """Give every subscriber a state slot (rates, volume), shared by all its addresses
    and, for a RADIUS contract (``contracts``, by subscriber id), its sessions' entries:
    a contract without any address in the file has a slot too.

    A subscriber keeps the slot it has in the kernel, so its counters survive a reload;
    pools (and addresses cut out of a pool) have per-address state instead (slot 0).
    New subscribers get the lowest free slots, in order of id. Returns the slots that
    their subscribers do not keep, to be cleared (a new subscriber may get one of them).
    """
    import numpy as np  # a million ids at once: numpy is here for the directory anyway

    def col(t: ClassTable, word: int) -> np.ndarray:   # a copy: the tables are written below
        return np.frombuffer(t.values, dtype=np.uint32)[word::WORDS].copy()

    contracts = contracts if contracts is not None else ClassTable()
    cur = (cur_hosts, cur_prefixes, cur_contracts or ClassTable())
    pools = dirs.distinct(col(prefixes, 0)[(col(prefixes, 1) & _TYPE_MASK) == _DYNAMIC_WORD])
    # sub_id -> its slot in the kernel: its first entry with one (a pool's block of
    # pool-address state is no subscriber's slot)
    cur_ids = np.concatenate([col(t, 0) for t in cur])
    cur_slots = np.concatenate([np.where(col(t, 1) & POOL_BITS_WORD, 0, col(t, 4)) for t in cur])
    has = cur_slots != 0
    held, first = dirs.distinct(cur_ids[has], first=True)
    held_slot = cur_slots[has][first]
    file_ids = np.concatenate([col(hosts, 0), col(prefixes, 0)])
    wanted = dirs.distinct(np.concatenate([file_ids[~_find(file_ids, pools)[1]],
                                       col(contracts, 0)]))   # sorted: new ones by id
    at, keeps = _find(wanted, held)
    slot = np.where(keeps, held_slot[at] if len(held) else 0, 0).astype(np.uint32)
    taken = np.zeros(max(limit, 1), dtype=bool)
    taken[0] = True   # slot 0 is per-address state
    kept = slot[keeps]
    taken[kept[kept < limit]] = True
    free = np.flatnonzero(~taken)
    if len(free) < len(wanted) - len(kept):
        raise KernelError(f"more subscribers than state slots: {len(wanted)} subscribers, "
                          f"{limit - 1} slots (limits.subscribers = {limit}, slot 0 is "
                          "per-address state): raise limits.subscribers; nothing was changed")
    slot[~keeps] = free[:len(wanted) - len(kept)]   # the lowest free ones
    for t in (hosts, prefixes, contracts):
        at, there = _find(col(t, 0), wanted)
        t.values[4::WORDS] = array("I", np.where(there, slot[at] if len(slot) else 0, 0)
                                   .astype(np.uint32).tobytes())
    # A slot its subscriber does not keep is cleared, given to another one or not.
    return set(held_slot.tolist()) - set(kept.tolist())


def _find(a: np.ndarray, sorted_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each value of ``a`` is in the sorted array ``sorted_``, and whether it is there
    (where it is not, the index is of no meaning)."""
    import numpy as np

    if not len(sorted_):
        return np.zeros(len(a), dtype=np.intp), np.zeros(len(a), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_, a), len(sorted_) - 1)
    return i, sorted_[i] == a


def assign_pool_blocks(cur_prefixes: ClassTable, hosts: ClassTable, prefixes: ClassTable,
                       limit: int) -> list[tuple[int, int]]:
    """Give every IPv4 dynamic pool of /16 or longer a block of xz_pool_addrs, one entry per
    address (its first index in ``slot``, its host bits in ``pool_bits``), so that a pool
    address's state is an array index, not a hash lookup and an insert. A pool keeps the
    block it has in the kernel; new ones take the first gap that fits, largest first; a pool
    that does not fit keeps per-address state in the LRU. The pool's own host entries
    (``suspend ADDRESS``) point at the same block. Returns the new blocks that overlap one
    that held another pool's state: to be cleared before they are used."""
    import numpy as np  # (the directory's import: here for 200,000 rows at once)

    old = {k: (e.slot, e.pool_bits) for k, e in cur_prefixes.items() if e.pool_bits}
    plen, raw = dirs.lpm_columns(prefixes.keys)
    bits = 128 - plen
    word = np.frombuffer(prefixes.values, dtype=np.uint32)[1::WORDS]
    pool = ((word & _TYPE_MASK) == _DYNAMIC_WORD) & (bits <= POOL_BITS) & dirs.v4_rows(raw)
    want = [(i, prefixes.keys[i], b) for i, b in   # row, key, host bits: IPv4 dynamic pools
            zip(np.flatnonzero(pool).tolist(), bits[pool].tolist(), strict=True)]
    base = {k: old[k][0] for _, k, bits in want
            if k in old and old[k][1] == bits and old[k][0] + (1 << bits) <= limit}
    kept = set(base)
    taken = sorted((b, b + (1 << old[k][1])) for k, b in base.items())
    gaps, pos = [], 0
    for lo, hi in taken:
        if lo > pos:
            gaps.append([pos, lo])
        pos = max(pos, hi)
    gaps.append([pos, limit])
    for _, k, bits in sorted((w for w in want if w[1] not in base), key=lambda w: -w[2]):
        g = next((g for g in gaps if g[1] - g[0] >= 1 << bits), None)
        if g is not None:
            base[k], g[0] = g[0], g[0] + (1 << bits)
    for i, k, bits in want:
        w = prefixes.values[i * WORDS + 1] & ~POOL_BITS_WORD
        prefixes.values[i * WORDS + 1] = w | (class_word(0, 0, bits) if k in base else 0)
        prefixes.values[i * WORDS + 4] = base.get(k, 0)
    _point_hosts_at_pools(hosts, prefixes, {prefixes.values[i * WORDS]: i for i, k, _ in want
                                            if k in base})
    stale = [(b, b + (1 << bits)) for k, (b, bits) in old.items() if k not in kept]
    return [(base[k], 1 << bits) for _, k, bits in want if k in base and k not in kept
            if any(lo < base[k] + (1 << bits) and base[k] < hi for lo, hi in stale)]


def _point_hosts_at_pools(hosts: ClassTable, prefixes: ClassTable, pool_row: dict[int, int]
                          ) -> None:
    """Host entries of a pool's own (its id, inside it) share the pool's block."""
    if not pool_row:
        return
    import numpy as np

    held = np.isin(np.frombuffer(hosts.values, dtype=np.uint32)[0::WORDS], list(pool_row))
    rows = np.flatnonzero(held).tolist()   # host entries with a pool's id
    if not rows:
        return
    prefix_row = dict(zip(prefixes.keys, range(len(prefixes)), strict=True))
    for j in rows:
        i = _longest(prefix_row, hosts.keys[j])
        if i is not None and i == pool_row[hosts.values[j * WORDS]]:
            hosts.values[j * WORDS + 1] = (hosts.values[j * WORDS + 1] & ~POOL_BITS_WORD) | (
                prefixes.values[i * WORDS + 1] & POOL_BITS_WORD)
            hosts.values[j * WORDS + 4] = prefixes.values[i * WORDS + 4]


def split_sessions(t: ClassTable) -> tuple[ClassTable, ClassTable]:
    """(the file's entries, RADIUS session entries) of a subscriber map's contents."""
    import numpy as np  # a million flags at once; numpy is here for the directory anyway

    words = np.frombuffer(t.values, dtype=np.uint32)[1::WORDS]
    rows = np.flatnonzero(words & _SESSION_WORD)
    if not len(rows):
        return t, ClassTable()
    mine = set(rows.tolist())
    return t.take([i for i in range(len(t)) if i not in mine]), t.take(rows.tolist())


def contract_table(contracts: dict[str, Entry]) -> ClassTable:
    """xz_contracts contents from the file's contracts (user -> entry): one per id."""
    by_id = {e.sub_id: e for e in contracts.values()}
    return ClassTable.of((U32.pack(i), e._replace(slot=0, pool_bits=0))
                         for i, e in sorted(by_id.items()))


def session_entry(contract: Entry) -> Entry:
    """What a session's address gets: its contract's class, marked."""
    return contract._replace(flags=contract.flags | SESSION, pool_bits=0)


def _resolve_sessions(sessions: ClassTable, file: ClassTable, records: dict[int, Entry]
                      ) -> tuple[ClassTable, Change]:
    """The session entries a load keeps, with their contract's class as it is now: those
    whose contract left the file go (its pool row's treatment applies again), and so do
    those the file now has a row of its own for. (kept, Change(of the removed those a row
    takes over, changed, removed))"""
    taken = set(file.keys) if sessions else set()
    kept, changed, removed, replaced = ClassTable(), 0, 0, 0
    for k, e in sessions.items():
        rec = records.get(e.sub_id)
        if rec is None or k in taken:
            removed += 1
            replaced += k in taken
            continue
        new = session_entry(rec)
        changed += new != e
        kept.append(k, new)
    return kept, Change(replaced, changed, removed)


def plan_subscribers(maps: Maps, hosts: ClassTable, prefixes: ClassTable,
                     max_shrink: float | None = None, path: str = "<subscribers>",
                     contracts: dict[str, Entry] | None = None) -> Plan:
    """The writes that make the subscriber maps equal ``hosts``/``prefixes`` (left as
    they are) and the contracts ``contracts`` (user -> entry), and the state slots that
    are then free.

    RADIUS session entries (XZ_F_SESSION) stay: each takes its contract's class as the
    file now gives it (its slot, sticky suspension), or goes when its contract left the
    file or the file has a row of its own for that address or prefix.

    Refused before anything is written (SourceError naming ``path``): more entries than a
    map holds (``limits.*``) and, given ``max_shrink``, no entries or fewer than
    ``1 - max_shrink`` of the file's entries in the maps (``sources.max_shrink``; --force
    gives None).
    """
    with paused_gc():
        cur_h, cur_p = maps.read(maps.host_map), maps.read(maps.prefix_map)
        cur_c = maps.read_contracts()
        (file_h, sess_h), (file_p, sess_p) = split_sessions(cur_h), split_sessions(cur_p)
        if max_shrink is not None:
            check_shrink(path, "subscriber entries", len(file_h) + len(file_p),
                         len(hosts) + len(prefixes), max_shrink, "sources.max_shrink")
        hosts, prefixes = hosts.copy(), prefixes.copy()
        keep_suspensions(file_h, file_p, hosts, prefixes)
        _check_room(maps, path, hosts, prefixes)   # the file's alone first, then sessions too
        want_c = contract_table(contracts or {})
        freed = assign_slots(cur_h, cur_p, hosts, prefixes, maps.slots, cur_c, want_c)
        pool_clear = assign_pool_blocks(file_p, hosts, prefixes, maps.pool_map.max_entries)
        # suspensions of contracts are sticky as the file's are
        old = {e.sub_id: e for _, e in cur_c.items()}
        for i, e in enumerate(want_c.column(0)):
            if old.get(e, Entry(0, 0)).flags & SUSPENDED:
                want_c.values[i * WORDS + 1] |= _SUSPENDED_WORD
        records = {e.sub_id: e for _, e in want_c.items()}
        keep_h, ch = _resolve_sessions(sess_h, hosts, records)
        keep_p, cp = _resolve_sessions(sess_p, prefixes, records)
        for t, kept in ((hosts, keep_h), (prefixes, keep_p)):
            t.keys.extend(kept.keys)
            t.values.extend(kept.values)
        _check_room(maps, path, hosts, prefixes)
        d, v6 = dirs.subscribers(hosts.keys, dirs.lpm_columns(prefixes.keys))
        # what the trie holds once written (a key given twice: the last one's class, which
        # the trie is read back for)
        trie = (cur_p.keys, prefixes) if len(set(prefixes.keys)) == len(prefixes) else None
        return Plan(diff_table(cur_h, hosts), diff_table(cur_p, prefixes), freed, d,
                    pool_clear, (len(cur_h), len(cur_p)), diff_table(cur_c, want_c),
                    ch + cp, v6, trie)


def _check_room(maps: Maps, path: str, hosts: ClassTable, prefixes: ClassTable) -> None:
    """Refuse entries the maps cannot hold (after keep_suspensions: a suspended pool
    address keeps a host entry of its own)."""
    check_room(path, "host entries", len(hosts), maps.host_map.max_entries, "limits.hosts")
    check_room(path, "prefix entries", len(prefixes), maps.prefix_map.max_entries,
               "limits.prefixes")


def apply_subscribers(maps: Maps, hosts: ClassTable, prefixes: ClassTable,
                      max_shrink: float | None = None, path: str = "<subscribers>",
                      contracts: dict[str, Entry] | None = None) -> Change:
    """Write the difference (see plan_subscribers, apply_plan)."""
    return apply_plan(maps, plan_subscribers(maps, hosts, prefixes, max_shrink, path,
                                             contracts))


def apply_plan(maps: Maps, p: Plan,
               progress: Callable[[int], None] | None = None) -> Change:
    """Write a plan; ``progress`` hears of each batch of entries written or deleted. Order:
    contracts, add/change prefixes and hosts (both at once), then delete, so that an
    address is never without its class while it stays in the file. The directory covers
    the old entries and the new ones while both are in the maps, and is exact once the old
    ones are gone.

    A map that cannot hold its old and new entries at once (plan_subscribers checked that
    it holds the new ones) has its deletes first: an address whose entry goes may then be
    without it for a moment, until the entry that replaces it is written. The class index
    (dirs.py) answers for nothing during the writes and is exact after them."""
    first_h = p.held[0] + p.hosts.change.added > maps.host_map.max_entries
    first_p = p.held[1] + p.prefixes.change.added > maps.prefix_map.max_entries
    if progress:   # (heard from two threads)
        progress = _serialized(progress)

    def prefixes() -> None:
        if first_p:
            maps.delete(maps.prefix_map, p.prefixes.remove, progress)
        maps.write(maps.prefix_map, p.prefixes.write, progress)

    # the class index off while the maps change; set again from them (and the exact
    # directory) at the end
    with maps.uniform_off(*(p.trie or (None, None))):
        maps.write_dir(dirs.union(maps.read_dir(), p.dir))
        maps.clear_pool_blocks(p.pool_clear)
        if p.contracts is not None and len(p.contracts.write):
            maps.write(maps.contract_map, p.contracts.write)
        # The trie's writes on a thread of their own while the host entries' go in: the
        # trie takes one CPU (one lock for all of it), the hash as many as it finds.
        with ThreadPoolExecutor(1) as pool:
            trie = pool.submit(prefixes)
            if first_h:
                maps.delete(maps.host_map, p.hosts.remove, progress)
            maps.write(maps.host_map, p.hosts.write, progress)
        trie.result()   # (its error, once both have stopped)
        if not first_h:
            maps.delete(maps.host_map, p.hosts.remove, progress)
        if not first_p:
            maps.delete(maps.prefix_map, p.prefixes.remove, progress)
        if p.contracts is not None and p.contracts.remove:
            maps.delete(maps.contract_map, p.contracts.remove)
        maps.write_dir(p.dir)
        if p.v6 is not None:
            maps.write_sub_v6(p.v6)
        maps.count_dir_write()
    maps.clear_state(p.freed)
    return p.change


def _serialized(f: Callable[[int], None]) -> Callable[[int], None]:
    """``f`` called by one thread at a time."""
    lock = threading.Lock()

    def g(n: int) -> None:
        with lock:
            f(n)
    return g


def apply_allow(maps: Maps, desired: dict[Key, int]) -> Change:
    write, remove, change = diff(maps.allow_items(), desired)
    for k, bits in write.items():
        maps.set_allow(k, bits)
    for k in remove:
        maps.del_allow(k)
    return change


def set_suspended(maps: Maps, target: int | bytes, on: bool) -> list[str]:
    """Suspend or resume a subscriber id, or the owner of an address.

    An address of a dynamic pool without an owner gets (on) or loses (off) a host
    entry of its own, so that only that address is cut off. Returns what changed,
    as descriptions; empty when ``target`` is unknown.
    """
    from xdpzoot.tables import ip_of, net_of

    if isinstance(target, bytes):
        host = maps.get_host(target)
        match = maps.match_prefix(target)
        if host is None and match is None:
            return []
        if host is None and target[:12] != _V4MAPPED:
            done = _suspend64(maps, target, match, on)
            if done is not None:
                return done
        owner = host or match[1]
        pool_addr = host is None and owner.type == schema.TYPES["dynamic"]
        if pool_addr or (host and match and _derived(host, match[1])):
            e = owner._replace(flags=(owner.flags | SUSPENDED) if on
                        else owner.flags & ~SUSPENDED)
            if not on and match and e == match[1]:
                maps.del_host(target)   # back to the pool's own entry
            else:
                maps.set_host(target, e)
            return [f"{ip_of(target)} (pool {net_of(match[0])})"]
        target = owner.sub_id
    return set_suspended_ids(maps, {target: on})


def _suspend64(maps: Maps, target: bytes, match, on: bool) -> list[str] | None:
    """An IPv6 address of a dynamic pool without an owner: its /64, which its state counts
    by (one customer's addresses), gets (on) or loses (off) a prefix entry of its own, the
    pool's class suspended. None: not such an address (the /64 is the file's, or the pool
    is a /64 or longer)."""
    from xdpzoot.tables import net_of

    key = (64, masked(target, 64))
    (plen, net), e = match
    pool = maps.match_prefix(target, 63)
    if pool is None or pool[1].type != schema.TYPES["dynamic"]:
        return None
    mine = (plen, net) == key
    if (mine and not _derived(e, pool[1])) or (not mine and plen > 64):
        return None
    if on:
        maps.set_prefix(key, _flag(pool[1], True))
    elif mine:
        maps.del_prefix(key)
    return [f"{net_of(key)} (pool {net_of(pool[0])})"]


def set_suspended_ids(maps: Maps, want: dict[int, bool]) -> list[str]:
    """Suspend (True) or resume (False) subscribers by id: each one's contract and every
    host and prefix entry of it, found in one pass over each map's values (a daemon's
    tick may suspend many of a million at once). Returns what changed, as descriptions."""
    import numpy as np

    from xdpzoot.tables import ip_of, net_of

    done: list[str] = []
    prefixes = False
    for sid, on in want.items():
        contract = maps.get_contract(sid)
        if contract is not None:   # sticky for its sessions to come, too
            maps.set_contract(sid, _flag(contract, on))
            done.append(f"contract {sid}")
    ids = np.array(sorted(want), dtype=np.uint32)
    for host, m in ((True, maps.host_map), (False, maps.prefix_map)):
        t = maps.read(m)
        owners = np.frombuffer(t.values, dtype=np.uint32)[0::WORDS]
        for i in np.flatnonzero(np.isin(owners, ids)).tolist():
            e = t.entry(i)
            if host:
                maps.set_host(t.keys[i], _flag(e, want[e.sub_id]))
                done.append(str(ip_of(t.keys[i])))
            else:
                key = LPM_KEY.unpack(t.keys[i])
                maps.set_prefix(key, _flag(e, want[e.sub_id]))
                done.append(str(net_of(key)))
                prefixes = True
    if prefixes:   # the class index answers for their /24s again
        maps.sync_uniform()
    return done


def set_rates(maps: Maps, sub_id: int, up: int | None, down: int | None) -> None:
    """A contract's rates (None: as they are) on its contract record and every entry of
    it (file rows and sessions)."""

    def rated(e: Entry) -> Entry:
        return e._replace(up_kbps=e.up_kbps if up is None else up,
                          down_kbps=e.down_kbps if down is None else down)

    contract = maps.get_contract(sub_id)
    if contract is not None:
        maps.set_contract(sub_id, rated(contract))
    for a, e in list(maps.host_items()):
        if e.sub_id == sub_id and rated(e) != e:
            maps.put_class(maps.host_map, a, rated(e))
    prefixes = [(k, e) for k, e in maps.prefix_items() if e.sub_id == sub_id and rated(e) != e]
    for k, e in prefixes:
        maps.put_class(maps.prefix_map, LPM_KEY.pack(*k), rated(e))
    if prefixes:   # the class index answers for their /24s again
        maps.sync_uniform()


def _derived(host: Entry, pool: Entry) -> bool:
    """A host entry made by ``suspend ADDRESS`` from its pool."""
    return pool.type == schema.TYPES["dynamic"] and host._replace(flags=pool.flags) == pool


def _flag(e: Entry, on: bool) -> Entry:
    return e._replace(flags=(e.flags | SUSPENDED) if on else e.flags & ~SUSPENDED)


