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
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack

from xdpzoot.bandwidth.store import load_snapshot, save_snapshot
from xdpzoot.sources.radius import Accounting

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Key = tuple[str, str]   # (NAS identity, Acct-Session-Id)
SNAPSHOT_VERSION = 1


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
    """One live session."""

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


@dataclass(frozen=True)
class Plan:
    """A request's effect: the change to the maps, then the sessions to put (None: delete)
    and the stops to remember."""

    change: Change
    put: dict[Key, Session | None] = field(default_factory=dict)
    ended: dict[Key, float] = field(default_factory=dict)
    forget_ended: tuple[str, ...] = ()   # NAS whose stop memory a reboot clears


class SessionTable:
    """Sessions by key, and the owner of every address."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.sessions: dict[Key, Session] = {}
        self.owner: dict[IPNetwork, Key] = {}
        self.ended: dict[Key, float] = {}   # recently stopped, for late retransmissions
        self.version = 0   # counts commits: the snapshot is written when it moved

    def __len__(self) -> int:
        return len(self.sessions)

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
        old = self.sessions.get(key)
        before = old.networks if old else ()
        # Start and Interim only add: a late or repeated Start must not take back what an
        # Interim added (a new address is a new session). The session writes what it names
        # and does not hold yet; all it holds if its user changed.
        # A request without User-Name (or Class) keeps the session's.
        nets = tuple(dict.fromkeys(before + acct.networks))
        user = acct.user or (old.user if old else "")
        if old is not None and old.user != user:
            write = [n for n in nets if n in acct.networks or self.owner.get(n) == key]
        else:
            write = [n for n in acct.networks if self.owner.get(n) != key]
        session = Session(key[0], key[1], user, acct.cls or (old.cls if old else ()),
                          nets, old.started if old else now, now)
        return Plan(Change(tuple((n, user) for n in write)), {key: session})

    def _plan_stop(self, key: Key, now: float) -> Plan:
        old = self.sessions.get(key)
        if old is None:
            return Plan(Change(), ended={key: now})
        remove = tuple(n for n in old.networks if self.owner.get(n) == key)
        return Plan(Change((), remove), {key: None}, {key: now})

    def _plan_end(self, keys: Iterable[Key]) -> Plan:
        """Sessions gone without a Stop (reboot, expiry, Disconnect)."""
        put: dict[Key, Session | None] = dict.fromkeys(keys)
        remove = tuple(n for k in put for n in self.sessions[k].networks
                       if self.owner.get(n) == k)
        return Plan(Change((), remove), put)

    def _plan_reboot(self, nas: str) -> Plan:
        p = self._plan_end(k for k in self.sessions if k[0] == nas)
        return Plan(p.change, p.put, forget_ended=(nas,))

    def plan_end(self, keys: Iterable[Key]) -> Plan:
        """The effect of ending these sessions (a Disconnect-Request in "session" mode)."""
        return self._plan_end(k for k in keys if k in self.sessions)

    def plan_expiry(self, now: float) -> Plan:
        """Sessions with no Start or Interim for ``timeout`` seconds."""
        return self._plan_end(k for k, s in self.sessions.items()
                              if s.seen <= now - self.timeout)

    # --- committing -------------------------------------------------------------------------

    def commit(self, plan: Plan, now: float) -> None:
        """Make the plan true (after its change is in the maps)."""
        self.version += 1
        for nas in plan.forget_ended:
            self.ended = {k: t for k, t in self.ended.items() if k[0] != nas}
        for key, session in plan.put.items():
            old = self.sessions.pop(key, None)
            if old is not None:
                for n in old.networks:
                    if self.owner.get(n) == key and (session is None
                                                     or n not in session.networks):
                        del self.owner[n]
            if session is not None:
                self.sessions[key] = session
        for n, _user in plan.change.add:
            self.owner[n] = self._holder(plan, n)
        for key, when in plan.ended.items():   # kept in time order: oldest first
            self.ended.pop(key, None)
            self.ended[key] = when
        cutoff = now - self.timeout
        while self.ended:
            key, when = next(iter(self.ended.items()))
            if when > cutoff:
                break
            del self.ended[key]

    @staticmethod
    def _holder(plan: Plan, n: IPNetwork) -> Key:
        """The session of ``plan`` that writes ``n`` (one per plan)."""
        return next(k for k, s in plan.put.items() if s is not None and n in s.networks)

    # --- queries ----------------------------------------------------------------------------

    def select(self, nas: str, session_id: str, user: str,
               nets: Iterable[IPNetwork]) -> list[Key]:
        """Sessions a CoA/Disconnect-Request names: every given attribute must match (a NAS
        of "" matches any NAS of the client, prefix ``nas``)."""
        nets = set(nets)
        found = []
        for key, s in self.sessions.items():
            if nas and key[0] != nas:
                continue
            if session_id and s.session_id != session_id:
                continue
            if user and s.user != user:
                continue
            if nets and not nets <= {n for n in s.networks if self.owner.get(n) == key}:
                continue
            found.append(key)
        return found

    def counts(self) -> dict[str, dict[str, int]]:
        """Sessions by NAS, and addresses held by kind."""
        kinds = Counter("ipv4" if n.version == 4 else
                        ("ipv6_prefix" if n.prefixlen < 128 else "ipv6")
                        for n in self.owner)
        return {"by_nas": dict(Counter(k[0] for k in self.sessions)),
                "addresses": dict(kinds)}

    # --- snapshot ---------------------------------------------------------------------------

    def dump(self) -> bytes:
        """The table as msgpack."""
        return self.pack(self.frozen())

    def frozen(self) -> tuple:
        """What the snapshot holds, copied at once (sessions are immutable): packed on
        another thread (:meth:`pack`) while the table goes on changing."""
        return list(self.sessions.values()), dict(self.owner), list(self.ended.items())

    @staticmethod
    def pack(frozen: tuple) -> bytes:
        """:meth:`frozen` as msgpack, a record at a time (each a short hold of the
        interpreter lock, so the listener's loop keeps answering meanwhile)."""
        sessions, owner, ended = frozen
        p = msgpack.Packer(use_bin_type=True)
        out = [p.pack_map_header(3), p.pack("version"), p.pack(SNAPSHOT_VERSION),
               p.pack("sessions"), p.pack_array_header(len(sessions))]
        out += [p.pack([s.nas, s.session_id, s.user, list(s.cls), [str(n) for n in s.networks],
                        s.started, s.seen,
                        [str(n) for n in s.networks if owner.get(n) == s.key]])
                for s in sessions]
        out += [p.pack("ended"), p.pack_array_header(len(ended))]
        out += [p.pack([k[0], k[1], t]) for k, t in ended]
        return b"".join(out)

    @classmethod
    def load(cls, data: bytes, timeout: float) -> SessionTable:
        """A table from :meth:`dump`; ValueError if it is not one."""
        try:
            doc = msgpack.unpackb(data, raw=False)
            if doc.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {doc.get('version')!r}")
            t = cls(timeout)
            for nas, sid, user, cl, nets, started, seen, owned in doc["sessions"]:
                s = Session(nas, sid, user, tuple(cl),
                            tuple(ipaddress.ip_network(n) for n in nets),
                            float(started), float(seen))
                t.sessions[s.key] = s
                for n in owned:
                    t.owner[ipaddress.ip_network(n)] = s.key
            t.ended = {(nas, sid): float(when) for nas, sid, when in doc["ended"]}
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
