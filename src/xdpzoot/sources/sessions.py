"""The RADIUS session table: who holds which address now, learned from accounting.

Pure Python, no I/O but the snapshot. A session is keyed by (NAS, Acct-Session-Id); its
addresses become map entries owned by its user (the contract). The table answers each
accounting request with a :class:`Change` (entries to write, entries to delete) *before*
changing itself: the listener hands the change to the map writer and commits the plan
only when the write is done, so the table never holds what the maps do not.

- Start: the session and its addresses (a repeated or late Start only adds).
- Interim-Update: adds addresses that came late (DHCPv6-PD); an unknown session is started.
- Stop: the session's addresses go, except those another session has taken since.
- Accounting-On / -Off: every session of that NAS goes.
- A Start or Interim for a session stopped less than ``timeout`` ago changes nothing (a
  retransmission that arrived after the Stop); a session with no Interim for ``timeout``
  seconds expires.
Time is a parameter (``now``): tests inject it.

The table holds its sessions as plain tuples of strings and numbers, addresses as text:
the cycle collector does not look into such tuples, so a table of a million sessions
adds nothing to its pauses (a Session object with ipaddress objects is seven tracked
objects, and a table of 100k of them made every full collection 0.2 s). ``sessions`` and
``owner`` show them as Session objects and ipaddress networks.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import msgpack

from xdpzoot.bandwidth.store import load_snapshot, save_snapshot
from xdpzoot.sources.radius import Accounting

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Key = tuple[str, str]   # (NAS identity, Acct-Session-Id)
SNAPSHOT_VERSION = 1
Row = tuple   # (user, cls, networks as text, started, seen): a session as the table keeps it


@dataclass(frozen=True)
class Change:
    """What the maps must do: ``add`` writes an entry per (address or prefix, user),
    ``remove`` deletes entries. Plain values: the map writer decides what a user's entry
    holds (the contract's id, type, rates), the table only who holds which address."""

    add: tuple[tuple[IPNetwork, str], ...] = ()
    remove: tuple[IPNetwork, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


@dataclass(frozen=True)
class Session:
    """One live session, as :attr:`SessionTable.sessions` shows it."""

    nas: str
    session_id: str
    user: str
    cls: tuple[bytes, ...]
    networks: tuple[IPNetwork, ...]
    started: float
    seen: float   # last Start or Interim-Update

    @property
    def key(self) -> Key:
        return self.nas, self.session_id


def _session(key: Key, row: Row) -> Session:
    user, cls, nets, started, seen = row
    return Session(key[0], key[1], user, cls, tuple(map(ipaddress.ip_network, nets)),
                   started, seen)


class _Sessions(Mapping):
    """The table's sessions by key, as Session objects (made on access)."""

    def __init__(self, rows: dict[Key, Row]):
        self._rows = rows

    def __getitem__(self, key: Key) -> Session:
        return _session(key, self._rows[key])

    def __iter__(self) -> Iterator[Key]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows


class _Owner(Mapping):
    """The session key holding each address or prefix, by ipaddress network."""

    def __init__(self, owner: dict[str, Key]):
        self._owner = owner

    def __getitem__(self, n: IPNetwork) -> Key:
        return self._owner[str(n)]

    def __iter__(self) -> Iterator[IPNetwork]:
        return map(ipaddress.ip_network, self._owner)

    def __len__(self) -> int:
        return len(self._owner)


@dataclass(frozen=True)
class Plan:
    """A request's effect: the change to the maps, then the sessions to put (None: delete)
    and the stops to remember."""

    change: Change
    put: dict[Key, Row | None] = field(default_factory=dict)
    ended: dict[Key, float] = field(default_factory=dict)
    forget_ended: tuple[str, ...] = ()   # NAS whose stop memory a reboot clears


class SessionTable:
    """Sessions by key, and the owner of every address."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._rows: dict[Key, Row] = {}
        self._owner: dict[str, Key] = {}   # address or prefix as text -> session
        self.ended: dict[Key, float] = {}   # recently stopped, for late retransmissions
        self.version = 0   # counts commits: the snapshot is written when it moved
        # The snapshot's records, packed when a session or stop is committed (a few
        # microseconds each), in the order of the sessions and of ``ended``: a snapshot
        # of 100k sessions is then a join of bytes, not 100k packings that hold the
        # interpreter lock against the listener's loop.
        self._records: dict[Key, bytes] = {}
        self._ended_records: dict[Key, bytes] = {}
        self._packer = msgpack.Packer(use_bin_type=True)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def sessions(self) -> Mapping[Key, Session]:
        return _Sessions(self._rows)

    @property
    def owner(self) -> Mapping[IPNetwork, Key]:
        return _Owner(self._owner)

    # --- planning ---------------------------------------------------------------------------

    def plan(self, acct: Accounting, nas: str, now: float) -> Plan:
        """The effect of one accounting request from the NAS named ``nas`` (the client and
        the NAS identity the listener made of it)."""
        if acct.status in ("on", "off"):
            return self._plan_reboot(nas)
        if acct.status not in ("start", "interim", "stop"):
            return Plan(Change())
        key = (nas, acct.session_id)
        if acct.status == "stop":
            return self._plan_stop(key, now)
        if key in self.ended:
            return Plan(Change())
        return self._plan_update(key, acct, now)

    def _plan_update(self, key: Key, acct: Accounting, now: float) -> Plan:
        old = self._rows.get(key)
        named = {str(n): n for n in acct.networks}
        before = old[2] if old else ()
        # Start and Interim only add: a late or repeated Start must not take back what an
        # Interim added (a new address is a new session). The session writes what it names
        # and does not hold yet; all it holds if its user changed.
        # A request without User-Name (or Class) keeps the session's.
        nets = tuple(dict.fromkeys(before + tuple(named)))
        user = acct.user or (old[0] if old else "")
        if old is not None and old[0] != user:
            write = [n for n in nets if n in named or self._owner.get(n) == key]
        else:
            write = [n for n in named if self._owner.get(n) != key]
        row = (user, acct.cls or (old[1] if old else ()), nets,
               old[3] if old else now, now)
        return Plan(Change(tuple((named.get(n) or ipaddress.ip_network(n), user)
                                 for n in write)), {key: row})

    def _plan_stop(self, key: Key, now: float) -> Plan:
        old = self._rows.get(key)
        if old is None:
            return Plan(Change(), ended={key: now})
        return Plan(Change((), self._held(key, old)), {key: None}, {key: now})

    def _held(self, key: Key, row: Row) -> tuple[IPNetwork, ...]:
        """The networks of a session that it holds (not taken by another since)."""
        return tuple(ipaddress.ip_network(n) for n in row[2] if self._owner.get(n) == key)

    def _plan_end(self, keys: Iterable[Key]) -> Plan:
        """Sessions gone without a Stop (reboot, expiry, Disconnect)."""
        put: dict[Key, Row | None] = dict.fromkeys(keys)
        remove = tuple(n for k in put for n in self._held(k, self._rows[k]))
        return Plan(Change((), remove), put)

    def _plan_reboot(self, nas: str) -> Plan:
        p = self._plan_end(k for k in self._rows if k[0] == nas)
        return Plan(p.change, p.put, forget_ended=(nas,))

    def plan_end(self, keys: Iterable[Key]) -> Plan:
        """The effect of ending these sessions (a Disconnect-Request in "session" mode)."""
        return self._plan_end(k for k in keys if k in self._rows)

    def plan_expiry(self, now: float) -> Plan:
        """Sessions with no Start or Interim for ``timeout`` seconds. A session moves to
        the end of the table when it is seen, so the table is in order of last seen (as
        far as the clock went forward) and the search stops at the first one seen in
        time: a round costs the sessions that expire, not the table."""
        cutoff = now - self.timeout
        gone = []
        for k, row in self._rows.items():
            if row[4] > cutoff:
                break
            gone.append(k)
        return self._plan_end(gone)

    # --- committing -------------------------------------------------------------------------

    def commit(self, plan: Plan, now: float) -> None:
        """Make the plan true (after its change is in the maps)."""
        self.version += 1
        for nas in plan.forget_ended:
            self.ended = {k: t for k, t in self.ended.items() if k[0] != nas}
            self._ended_records = {k: self._ended_records[k] for k in self.ended}
        for key, row in plan.put.items():
            old = self._rows.pop(key, None)
            self._records.pop(key, None)
            if old is not None:
                for n in old[2]:
                    if self._owner.get(n) == key and (row is None or n not in row[2]):
                        del self._owner[n]
            if row is not None:
                self._rows[key] = row
                self._records[key] = b""   # packed below, once its addresses are owned
        displaced = set()
        for net, _user in plan.change.add:
            n = str(net)
            holder = next(k for k, r in plan.put.items() if r is not None and n in r[2])
            was = self._owner.get(n)
            if was is not None and was != holder and was in self._rows:
                displaced.add(was)
            self._owner[n] = holder
        for key in [*displaced, *(k for k, r in plan.put.items() if r is not None)]:
            self._records[key] = self._record(key, self._rows[key])
        for key, when in plan.ended.items():   # kept in time order: oldest first
            self.ended.pop(key, None)
            self._ended_records.pop(key, None)
            self.ended[key] = when
            self._ended_records[key] = self._packer.pack([key[0], key[1], when])
        cutoff = now - self.timeout
        while self.ended:
            key, when = next(iter(self.ended.items()))
            if when > cutoff:
                break
            del self.ended[key]
            del self._ended_records[key]

    def _record(self, key: Key, row: Row) -> bytes:
        """The snapshot record of a session (with the addresses it holds)."""
        user, cls, nets, started, seen = row
        return self._packer.pack([key[0], key[1], user, list(cls), list(nets), started, seen,
                                  [n for n in nets if self._owner.get(n) == key]])

    # --- queries ----------------------------------------------------------------------------

    def select(self, nas: str, session_id: str, user: str,
               nets: Iterable[IPNetwork]) -> list[Key]:
        """Sessions a CoA/Disconnect-Request names: every given attribute must match (a NAS
        of "" matches any NAS of the client, prefix ``nas``)."""
        want = {str(n) for n in nets}
        if want:   # the sessions holding them: no walk of the table
            candidates = [k for k in dict.fromkeys(self._owner.get(n) for n in sorted(want))
                          if k is not None]
        else:
            candidates = list(self._rows)
        found = []
        for key in candidates:
            row = self._rows[key]
            if nas and key[0] != nas:
                continue
            if session_id and key[1] != session_id:
                continue
            if user and row[0] != user:
                continue
            if want and not want <= {n for n in row[2] if self._owner.get(n) == key}:
                continue
            found.append(key)
        return found

    def users(self, keys: Iterable[Key]) -> set[str]:
        """The users of these sessions."""
        return {self._rows[k][0] for k in keys}

    def counts(self) -> dict[str, dict[str, int]]:
        """Sessions by NAS, and addresses held by kind."""
        kinds = Counter("ipv4" if ":" not in n else
                        ("ipv6" if n.endswith("/128") else "ipv6_prefix")
                        for n in self._owner)
        return {"by_nas": dict(Counter(k[0] for k in self._rows)),
                "addresses": dict(kinds)}

    def held(self) -> list[tuple[IPNetwork, str]]:
        """Every address and prefix held, with its session's user."""
        return [(ipaddress.ip_network(n), self._rows[k][0]) for n, k in self._owner.items()]

    # --- snapshot ---------------------------------------------------------------------------

    def dump(self) -> bytes:
        """The table as msgpack."""
        return self.pack(self.frozen())

    def frozen(self) -> tuple[list[bytes], list[bytes]]:
        """The snapshot's records, copied at once (a millisecond at 100k sessions):
        :meth:`pack` can join them on another thread while the table goes on changing."""
        return list(self._records.values()), list(self._ended_records.values())

    @staticmethod
    def pack(frozen: tuple[list[bytes], list[bytes]]) -> bytes:
        """:meth:`frozen` as one msgpack document."""
        sessions, ended = frozen
        p = msgpack.Packer(use_bin_type=True)
        return b"".join([p.pack_map_header(3), p.pack("version"), p.pack(SNAPSHOT_VERSION),
                         p.pack("sessions"), p.pack_array_header(len(sessions)), *sessions,
                         p.pack("ended"), p.pack_array_header(len(ended)), *ended])

    @classmethod
    def load(cls, data: bytes, timeout: float) -> SessionTable:
        """A table from :meth:`dump`; ValueError if it is not one."""
        try:
            doc = msgpack.unpackb(data, raw=False)
            if doc.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {doc.get('version')!r}")
            t = cls(timeout)
            for nas, sid, user, cl, nets, started, seen, owned in doc["sessions"]:
                key = (nas, sid)
                nets = tuple(str(ipaddress.ip_network(n)) for n in nets)
                t._rows[key] = (user, tuple(cl), nets, float(started), float(seen))
                for n in owned:
                    t._owner[str(ipaddress.ip_network(n))] = key
            t._records = {k: t._record(k, row) for k, row in t._rows.items()}
            t.ended = {(nas, sid): float(when) for nas, sid, when in doc["ended"]}
            t._ended_records = {k: t._packer.pack([k[0], k[1], when])
                                for k, when in t.ended.items()}
            return t
        except (ValueError, TypeError, KeyError, AttributeError,
                msgpack.UnpackException) as e:
            raise ValueError(f"not a session snapshot: {e}") from None

    def save(self, path: str) -> None:
        """Write the snapshot atomically (a crash leaves the old file or the new one)."""
        save_snapshot(path, self.dump())

    @classmethod
    def restore(cls, path: str, timeout: float) -> SessionTable:
        """The table saved at ``path``, or an empty one if there is none."""
        data = load_snapshot(path)
        return cls(timeout) if data is None else cls.load(data, timeout)
