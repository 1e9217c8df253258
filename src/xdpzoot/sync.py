"""Bring the kernel maps to a desired state by writing only the difference.

Pure diff functions plus thin ``apply_*`` helpers that use :class:`kernel.Maps`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import schema
from .kernel import Entry, KernelError, Maps
from .tables import Key, Tables

SUSPENDED = schema.C["XZ_F_SUSPENDED"]


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


def keep_suspensions(cur_hosts: dict[bytes, Entry], cur_prefixes: dict[Key, Entry],
                     hosts: dict[bytes, Entry], prefixes: dict[Key, Entry]) -> None:
    """Suspensions are sticky across reloads of the subscriber file: an entry suspended
    in the kernel stays suspended until ``resume``. A suspended address of a dynamic
    pool keeps its host entry while the pool is still in the file."""
    for a, e in cur_hosts.items():
        if not e.flags & SUSPENDED:
            continue
        if a in hosts:
            hosts[a] = hosts[a]._replace(flags=hosts[a].flags | SUSPENDED)
            continue
        pool = Tables(prefixes=prefixes).classify(a)
        if pool and pool.type == schema.TYPES["dynamic"]:
            hosts[a] = pool._replace(flags=pool.flags | SUSPENDED)
    for k, e in cur_prefixes.items():
        if e.flags & SUSPENDED and k in prefixes:
            prefixes[k] = prefixes[k]._replace(flags=prefixes[k].flags | SUSPENDED)


def assign_slots(cur_h: dict[bytes, Entry], cur_p: dict[Key, Entry],
                 hosts: dict[bytes, Entry], prefixes: dict[Key, Entry],
                 limit: int) -> set[int]:
    """Give every subscriber a state slot (rates, volume), shared by all its addresses.

    A subscriber keeps the slot it has in the kernel, so its counters survive a reload;
    pools (and addresses cut out of a pool) have per-address state instead (slot 0).
    Returns the slots nobody holds any more, to be cleared.
    """
    dynamic = schema.TYPES["dynamic"]
    pools = {e.sub_id for e in prefixes.values() if e.type == dynamic}
    held: dict[int, int] = {}
    for e in (*cur_h.values(), *cur_p.values()):
        if e.slot:
            held.setdefault(e.sub_id, e.slot)
    wanted = {e.sub_id for e in (*hosts.values(), *prefixes.values())} - pools
    used = {held[s] for s in wanted if s in held}
    free = (x for x in range(1, limit) if x not in used)
    slot_of: dict[int, int] = {}
    for sid in sorted(wanted):
        slot = held.get(sid) or next(free, None)
        if slot is None:
            raise KernelError(f"more subscribers than state slots ({limit - 1}): "
                              "raise [limits] subscribers")
        slot_of[sid] = slot
    for d in (hosts, prefixes):
        for k, e in d.items():
            slot = slot_of.get(e.sub_id, 0)
            if e.slot != slot:
                d[k] = e._replace(slot=slot)
    return set(held.values()) - set(slot_of.values())


def plan_subscribers(maps: Maps, hosts: dict[bytes, Entry], prefixes: dict[Key, Entry]):
    """The writes that make the subscriber maps equal ``hosts``/``prefixes``, and the
    state slots that are then free."""
    cur_h = dict(maps.host_items())
    cur_p = dict(maps.prefix_items())
    hosts, prefixes = dict(hosts), dict(prefixes)
    keep_suspensions(cur_h, cur_p, hosts, prefixes)
    freed = assign_slots(cur_h, cur_p, hosts, prefixes, len(maps.state))
    return diff(cur_h, hosts), diff(cur_p, prefixes), freed


def apply_subscribers(maps: Maps, hosts: dict[bytes, Entry],
                      prefixes: dict[Key, Entry]) -> Change:
    """Write the difference. Order: add/change prefixes and hosts, then delete, so that an
    address is never without its class while it stays in the file."""
    (hw, hr, hc), (pw, pr, pc), freed = plan_subscribers(maps, hosts, prefixes)
    for k, e in pw.items():
        maps.set_prefix(k, e)
    maps.set_hosts(hw)
    maps.del_hosts(hr)
    for k in pr:
        maps.del_prefix(k)
    maps.clear_state(freed)
    return hc + pc


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
    from .tables import ip_of, net_of

    done: list[str] = []
    if isinstance(target, bytes):
        host = maps.get_host(target)
        match = maps.match_prefix(target)
        if host is None and match is None:
            return []
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
    for a, e in list(maps.host_items()):
        if e.sub_id == target:
            maps.set_host(a, _flag(e, on))
            done.append(str(ip_of(a)))
    for k, e in list(maps.prefix_items()):
        if e.sub_id == target:
            maps.set_prefix(k, _flag(e, on))
            done.append(str(net_of(k)))
    return done


def _derived(host: Entry, pool: Entry) -> bool:
    """A host entry made by ``suspend ADDRESS`` from its pool."""
    return pool.type == schema.TYPES["dynamic"] and host._replace(flags=pool.flags) == pool


def _flag(e: Entry, on: bool) -> Entry:
    return e._replace(flags=(e.flags | SUSPENDED) if on else e.flags & ~SUSPENDED)


