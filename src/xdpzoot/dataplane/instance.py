"""One xdpzoot instance: its pin directory, the lock on it, and every operation on its maps.

Commands and the daemon call an :class:`Instance`; nothing else opens a map. Every write of
a value that two writers share happens with the pin directory's lock held
(:func:`kernel.lock`, an flock): the control value (switches, parameters, the CSAM
generation word), throttles and throttles set by hand, suspensions, the subscriber maps,
the allow-list, the CSAM generations. Those writes are a read, a change and a write back:
unlocked, a daemon tick interleaved with a list swap could put the previous generation
back in force. Critical sections are short (one switch, one throttle, one tick's rates);
a list or subscriber load holds the lock for its whole run and a tick waits for it.

Reads (status, counters, volumes) take no lock: each map value is read whole.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING

from xdpzoot import sync, tables
from xdpzoot.dataplane import blocklist, dirs, kernel, loader, schema
from xdpzoot.dataplane.layout import LPM_KEY, WORDS, Entry, Event, Volume
from xdpzoot.sources import csam
from xdpzoot.sources.csam import CsamList

if TYPE_CHECKING:   # imported where used: a command's start stays quick
    import numpy as np

C = schema.C
Progress = blocklist.Progress


class Instance:
    """The instance pinned at ``pin_dir``. Maps are opened from their pins on first use; a
    bcc compile only creates maps that do not exist yet (:meth:`create`) and loads the
    programs (:meth:`attach`)."""

    def __init__(self, pin_dir: str, defines: Iterable[str] | None = None):
        """``defines``: the config's limits; maps pinned with others are refused."""
        self.pin_dir = pin_dir
        self.maps = kernel.Maps(pin_dir, defines)
        self.maps.guard = self._require_lock
        self._held = False
        self._dir: bytearray | None = None   # the subscriber directory as last read ...
        self._dir_writes = -1                 # ... and its count of whole writes then

    def close(self) -> None:
        self.maps.close()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the lock -----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the pin directory's lock (again inside an operation that holds it: an
        attach loads the lists under the same lock)."""
        if self._held:
            yield
            return
        with kernel.lock(self.pin_dir):
            self._held = True
            try:
                yield
            finally:
                self._held = False

    def _require_lock(self) -> None:
        if not self._held:
            raise kernel.KernelError(f"{self.pin_dir}: shared map written without the lock")

    # ---- maps and programs --------------------------------------------------------------
    def loaded(self) -> bool:
        """Whether the maps are pinned."""
        return kernel.pinned(self.pin_dir)

    def create(self, defines: Iterable[str]) -> None:
        """Create and pin the maps if they are not there yet (under the lock: two commands
        on a new instance must not both compile)."""
        with self.locked():
            if not self.loaded():
                kernel.compile_bpf(self.pin_dir, defines, maps_only=True).cleanup()
                self.maps.close()

    def attach(self, cfg, access: list[str], core: list[str], hook: str, mode: str
               ) -> list[loader.Attachment]:
        """Compile, load and attach (replacing what runs, keeping the maps)."""
        with self.locked():
            return loader.attach(cfg, self.maps, access, core, hook, mode)

    def detach(self) -> list[loader.Attachment]:
        """Take the programs off every interface and remove the pins."""
        with self.locked():
            self.maps.close()
            return loader.detach(self.pin_dir)

    def configure(self, cfg) -> None:
        """The config's switches, parameters and allow-lists into the maps."""
        with self.locked():
            loader.configure(self.maps, cfg)

    def attachments(self) -> list[loader.Attachment]:
        return loader.attachments(self.pin_dir)

    # ---- subscribers --------------------------------------------------------------------
    def plan_subscribers(self, hosts, prefixes, path: str = "<subscribers>",
                         contracts: dict[str, Entry] | None = None) -> sync.Plan:
        """What a load of ``hosts``/``prefixes`` would write (nothing written)."""
        return sync.plan_subscribers(self.maps, hosts, prefixes, path=path,
                                     contracts=contracts)

    def load_subscribers(self, hosts, prefixes, progress: Progress | None = None,
                         max_shrink: float | None = None, path: str = "<subscribers>",
                         contracts: dict[str, Entry] | None = None) -> sync.Change:
        """Bring the subscriber maps to ``hosts``/``prefixes`` and the RADIUS contracts to
        ``contracts`` (user -> entry; suspensions kept, session entries kept and given
        their contract's class as it is now); refused before any write when the maps
        cannot hold them or, given ``max_shrink``, when the file is empty or much shorter
        (sync.plan_subscribers)."""
        with self.locked():
            plan = sync.plan_subscribers(self.maps, hosts, prefixes, max_shrink, path,
                                         contracts)
            return sync.apply_plan(self.maps, plan,
                                   progress(plan.change.total) if progress else None)

    # ---- RADIUS sessions ----------------------------------------------------------------
    def apply_sessions(self, change, users: Mapping[str, int]) -> Counter[str]:
        """Write a session change (sources.sessions.Change: ``add`` (network, user),
        ``remove`` networks) into the maps. An address or prefix of a user's session gets
        its contract's class (xz_contracts: id, type, flags, rates, state slot) marked
        XZ_F_SESSION; ``users`` names each user's subscriber id (the file's ``user``
        column). Counts: ``written``, ``removed``; ``unknown``: a user with no contract
        (not written: the pool row's treatment applies); ``conflict``: the maps hold an
        entry of the file's (or of ``suspend ADDRESS``) there, which stays. A remove
        deletes session entries only."""
        n: Counter[str] = Counter()
        with self.locked():
            m = self.maps
            records: dict[int, Entry | None] = {}
            writes = []
            for net, user in change.add:
                sid = users.get(user, 0)
                if sid not in records:
                    records[sid] = m.get_contract(sid) if sid else None
                rec = records[sid]
                if rec is None:
                    n["unknown"] += 1
                    continue
                writes.append((tables.is_host(net), _map_key(net), sync.session_entry(rec)))
            if writes:   # first, so that no new entry is hidden for a moment
                self._open_dir([k for host, k, _ in writes if host],
                               [LPM_KEY.unpack(k) for host, k, _ in writes if not host])
            for host, key, e in writes:
                mp = m.host_map if host else m.prefix_map
                if m.add_new(mp, key, e):
                    n["written"] += 1
                    continue
                held = m.get_class(mp, key)   # there exactly: the trie's longest is it
                if held is not None and held.flags & sync.SESSION:
                    if held != e:   # another session's, or this one's again
                        m.put_class(mp, key, e)
                    n["written"] += 1
                else:
                    n["conflict"] += 1
            for net in change.remove:
                mp = m.host_map if tables.is_host(net) else m.prefix_map
                key = _map_key(net)
                held = m.get_class(mp, key)
                if held is not None and held.flags & sync.SESSION:
                    m.delete_if_there(mp, key)
                    n["removed"] += 1
        return n

    def _open_dir(self, hosts: list[bytes], prefixes: list[tuple[int, bytes]]) -> None:
        """The directory stops saying "absent" where these entries go. Reading it is 4 MiB:
        a copy is kept, trusted to say what is already open until a whole write of the
        directory (a load, which may close /24s) is counted; a change is made on a fresh
        read (other writers open /24s too)."""
        count = self.maps.dir_writes()
        if self._dir is not None and self._dir_writes == count and \
                not _closed(self._dir, hosts, prefixes):
            return
        d = self.maps.read_dir()
        if dirs.subscriber_added(d, hosts, prefixes):
            self.maps.write_dir(d)
        self._dir, self._dir_writes = d, count

    def act(self, action, users: Mapping[str, int]) -> list[int]:
        """A CoA or Disconnect-Request's action (radius_server.Action: kind "suspend" or
        "rate", users, up/down kbps or None) on the users' contracts: the contract and
        every entry of it, file rows and sessions. A suspension is sticky (reloads and new
        sessions keep it, until ``resume``); rates last until the subscriber file is
        loaded again. Returns the subscriber ids; KernelError if no user has a
        contract."""
        sids = sorted({users[u] for u in action.users if u in users})
        done = []
        with self.locked():
            for sid in sids:
                if self.maps.get_contract(sid) is None:
                    continue
                if action.kind == "suspend":
                    sync.set_suspended(self.maps, sid, True)
                else:
                    sync.set_rates(self.maps, sid, action.up_kbps, action.down_kbps)
                done.append(sid)
        if not done:
            raise kernel.KernelError(f"no contract for {', '.join(action.users)}")
        return done

    def session_networks(self) -> list[tables.IPNetwork]:
        """Every address and prefix the maps hold a session entry for."""
        hosts = sync.split_sessions(self.maps.host_table())[1]
        prefixes = sync.split_sessions(self.maps.prefix_table())[1]
        return [ipaddress.ip_network(tables.ip_of(a)) for a in hosts.keys] + \
            [tables.net_of(LPM_KEY.unpack(k)) for k in prefixes.keys]

    def contracts(self) -> dict[int, Entry]:
        """The RADIUS contracts in force, by subscriber id."""
        return {e.sub_id: e for _, e in self.maps.read_contracts().items()}

    def subscriber_changes(self, plan: sync.Plan) -> list[tuple[bytes, Entry | None,
                                                                Entry | None]]:
        """Each change of a plan: (key, before, after); after None: removed."""
        cur_p = dict(self.maps.prefix_table().items())
        old = {a: self.maps.get_host(a) for a in plan.hosts.write.keys}
        old.update((k, cur_p.get(k)) for k in plan.prefixes.write.keys)
        return [(k, old[k], e) for k, e in (*plan.hosts.write.items(),
                                            *plan.prefixes.write.items())] + \
            [(k, None, None) for k in plan.hosts.remove + plan.prefixes.remove]

    def classify(self, addr: bytes) -> tuple[str, Entry] | None:
        """Which entry classifies ``addr``: ("host", entry), (prefix text, entry) or None."""
        host = self.maps.get_host(addr)
        if host:
            return "host", host
        m = self.maps.match_prefix(addr)
        return (str(tables.net_of(m[0])), m[1]) if m else None

    def suspend(self, target: int | bytes, on: bool) -> list[str]:
        """Suspend or resume a subscriber id or an address; what changed."""
        with self.locked():
            return sync.set_suspended(self.maps, target, on)

    def suspend_ids(self, want: dict[int, bool]) -> list[str]:
        """Suspend (True) or resume (False) subscribers by id, all in one pass over the
        maps (a tick's decisions); what changed."""
        with self.locked():
            return sync.set_suspended_ids(self.maps, want)

    def subscriber_slot(self, target: int | bytes, name: str) -> tuple[int, int]:
        """(subscriber id, state slot) of a subscriber id or an address (``name``: as
        the operator wrote it, for the error)."""
        if isinstance(target, bytes):
            c = self.classify(target)
            if c is None:
                raise kernel.KernelError(f"no subscriber {name}")
            target = c[1].sub_id
        contract = self.maps.get_contract(target)
        if contract is not None and contract.slot:
            return target, contract.slot
        for _, e in (*self.maps.host_items(), *self.maps.prefix_items()):
            if e.sub_id == target and e.slot and not e.pool_bits:
                return target, e.slot
        raise kernel.KernelError(f"no subscriber {name} with a state slot "
                                 "(addresses of a pool have per-address state only)")

    def subscriber_state(self, sid: int) -> dict | None:
        """What the maps hold for subscriber ``sid`` now (no volume rule needed): its class
        (a RADIUS contract's, else its first entry's), the counters of its state slot (the
        abuse signals too) and the throttle in force there; None when it has no slot of its
        own (a pool)."""
        try:
            _, slot = self.subscriber_slot(sid, str(sid))
        except kernel.KernelError:
            return None
        e = self.maps.get_contract(sid) or next(
            (e for _, e in (*self.maps.host_items(), *self.maps.prefix_items())
             if e.sub_id == sid), None)
        v = self.volumes([slot])[slot]
        up, down = self.get_throttle(slot)
        hand = self.manual_throttles().get(slot)
        return {"slot": slot, "up_bytes": v.up_bytes, "down_bytes": v.down_bytes,
                "op25b": v.op25b, "scans": v.scans,
                "up_kbps": e.up_kbps if e else 0, "down_kbps": e.down_kbps if e else 0,
                "suspended": bool(e and e.flags & schema.C["XZ_F_SUSPENDED"]),
                "throttle_up_kbps": up, "throttle_down_kbps": down,
                "throttle_by_hand_kbps": hand[0] if hand else 0}

    # ---- CSAM list ----------------------------------------------------------------------
    def load_csam(self, data: bytes, path: str, lst: CsamList | None = None,
                  progress: Progress | None = None, max_shrink: float | None = None) -> dict:
        """Make ``data`` the list in force (blocklist.load), holding the lock throughout;
        the result with the counts and digest of the generation in force."""
        with self.locked():
            res = blocklist.load(self.maps, data, path, lst, progress, max_shrink=max_shrink)
            meta = self.maps.read_meta(res.generation)
        return {**asdict(res), **{k: meta[k] for k in csam.COUNTS}, "sha256": meta["sha256"]}

    def csam_check(self, addr16: bytes) -> str | None:
        return blocklist.check(self.maps, addr16)

    def csam_status(self) -> dict:
        return blocklist.status(self.maps)

    # ---- switches -----------------------------------------------------------------------
    def control_flags(self) -> int:
        return self.maps.control_flags()

    def control_params(self) -> dict[str, int]:
        return self.maps.control_params()

    def set_switch(self, bit: int, on: bool) -> None:
        """One switch on or off; every other field of the control value kept."""
        with self.locked():
            self.maps.set_switch(bit, on)

    def set_params(self, **params: int) -> None:
        with self.locked():
            self.maps.set_control_params(**params)

    def congestion(self, mode: str | None) -> tuple[str, bool]:
        """Set the congestion mode (on, off, auto; None: as it is); (mode, active now)."""
        bit = C["XZ_C_CONGESTION"]
        with self.locked():
            if mode:
                self.maps.set_control_params(congestion=tables.CONGESTION[mode])
                if mode != "auto":
                    self.maps.set_switch(bit, mode == "on")
            c = self.maps.control_value()
        name = {v: k for k, v in tables.CONGESTION.items()}[c.congestion]
        return name, bool(c.flags & bit)

    def congestion_auto(self, on: bool) -> bool:
        """The daemon's decision in mode auto; True when it switched. Checked again under
        the lock: an operator's `congestion on/off` since the daemon looked wins."""
        bit = C["XZ_C_CONGESTION"]
        with self.locked():
            c = self.maps.control_value()
            if c.congestion != C["XZ_CONGESTION_AUTO"] or bool(c.flags & bit) == on:
                return False
            self.maps.set_switch(bit, on)
            return True

    # ---- drop events ----------------------------------------------------------------------
    @contextlib.contextmanager
    def trace(self, rate: int, reasons: Iterable[str], addresses: bool = False,
              clock: Callable[[], float] = time.monotonic) -> Iterator[Trace]:
        """Drop events on for the block (XZ_C_TRACE, ``rate`` a second at most, of
        ``reasons``, with the addresses if ``addresses``) and off again however it ends.
        One trace at a time: refused while another's lease runs (KernelError). The flag
        carries a lease that :meth:`Trace.poll` renews every second: if this process
        dies, the data plane stops making events TRACE_LEASE_S seconds later."""
        reasons = list(reasons)
        bad = [r for r in reasons if r not in schema.TRACE_REASONS]
        if bad or not reasons:
            raise kernel.KernelError(f"not a reason that can be traced: {', '.join(bad)} "
                                     f"(one of {', '.join(schema.TRACE_REASONS)})")
        if not 0 < rate <= TRACE_MAX_RATE:
            raise kernel.KernelError(f"trace rate {rate}: from 1 to {TRACE_MAX_RATE} a second")
        bits = C["XZ_C_TRACE"] | (C["XZ_C_TRACE_ADDRS"] if addresses else 0)
        mask = sum(1 << schema.REASONS.index(r) for r in set(reasons))
        with kernel.RingBuffer(self.maps.trace_ring) as ring:
            with self.locked():
                c = self.maps.control_value()
                if c.flags & C["XZ_C_TRACE"] and c.trace_until > clock():
                    raise kernel.KernelError(
                        f"{self.pin_dir}: a trace runs already (one at a time; the lease of "
                        f"one that died runs out within {TRACE_LEASE_S} s)")
                ring.drain()   # what a trace that died left: not this one's
                t = Trace(self, ring, bits, clock)
                self.maps.write_control(c._replace(
                    flags=(c.flags & ~TRACE_BITS) | bits, trace_until=t.until,
                    trace_rate=rate, trace_reasons=mask))
            try:
                yield t
            finally:
                with self.locked():
                    c = self.maps.control_value()
                    if c.trace_until == t.until:   # still ours
                        self.maps.write_control(c._replace(flags=c.flags & ~TRACE_BITS,
                                                           trace_until=0))

    def trace_lost(self) -> int:
        """Drop events lost to a full ring buffer, since the maps were made."""
        return self.maps.trace_lost()

    # ---- throttles ----------------------------------------------------------------------
    def throttle(self, slot: int, kbps: int, until: int) -> None:
        """A throttle set by hand, in force at once (the lower of it and a rule's)."""
        with self.locked():
            self.maps.set_manual(slot, kbps, until)
            up, down = self.maps.get_throttle(slot)
            self.maps.set_throttle(slot, min(x for x in (up, kbps) if x),
                                   min(x for x in (down, kbps) if x))

    def unthrottle(self, slot: int) -> None:
        """Lift the throttle set by hand (a rule's comes back at the daemon's next tick)."""
        with self.locked():
            self.maps.del_manual(slot)
            self.maps.set_throttle(slot, 0, 0)

    def adopt_throttles(self) -> None:
        """Throttles in force without a record of why become throttles set by hand."""
        import numpy as np

        with self.locked():
            manual = self.maps.manual_throttles()
            rates = self.maps.throttle_rates()
            owned = self.maps.owner_ids() != 0
            for slot in np.flatnonzero(owned & rates.any(axis=1)).tolist():
                up, down = rates[slot].tolist()
                if slot not in manual:
                    self.maps.set_manual(slot, min(x for x in (up, down) if x), 0)

    def enforce_rates(self, now: float, rule_rates: dict[int, int], slots: Iterable[int]
                      ) -> tuple[list[int], set[int], int]:
        """The daemon's throttles: expire those set by hand whose time is up, then make
        every slot's throttle the lowest of the rules' (``rule_rates``, slot -> kbps) and
        the hand-set one, for those slots, the hand-set ones' and ``slots`` (owned slots
        that may hold a throttle: those in force at the last call, or every slot with one
        found by :meth:`throttle_rates`); the switch on while any is in force.
        One critical section: a `throttle` cannot come between the read of the hand-set
        ones and the switch. Returns the slots whose hand-set throttle expired, those
        with a throttle in force now, and how many of them have one set by hand."""
        with self.locked():
            manual = self.maps.manual_throttles()
            expired = [s for s, (_, until) in manual.items() if until and until <= now]
            for slot in expired:
                self.maps.del_manual(slot)
                del manual[slot]
            want = dict(rule_rates)
            for slot, (kbps, _) in manual.items():
                want[slot] = min(kbps, want.get(slot, kbps))
            for slot in set(want).union(slots):
                rate = want.get(slot, 0)
                if self.maps.get_throttle(slot) != (rate, rate):
                    self.maps.set_throttle(slot, rate, rate)
            self.maps.set_throttles_switch(bool(want))
        return expired, set(want), len(manual)

    # ---- what the daemon and `top` read -------------------------------------------------
    def owners(self) -> dict[int, int]:
        """State slot -> subscriber id: of the entries, and of the RADIUS contracts (one
        without a session has no entry)."""
        out = self.maps.owners()
        for e in self.contracts().values():
            out.setdefault(e.slot, e.sub_id)
        return out

    def class_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """The host and the prefix map's values as rows of struct xz_class
        (kernel.Maps.class_columns)."""
        return self.maps.class_columns()

    def owner_ids(self, columns: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Subscriber id per state slot, 0 where none (kernel.Maps.owner_ids), from
        ``columns`` (class_columns) when given."""
        return self.maps.owner_ids(columns)

    def state_words(self) -> np.ndarray:
        """The state array, a row per slot (kernel.Maps.state_words)."""
        return self.maps.state_words()

    def byte_counters(self, words: np.ndarray | None = None) -> np.ndarray:
        """Bytes up and down so far per state slot (kernel.Maps.byte_counters)."""
        return self.maps.byte_counters(words)

    def next_scan_window(self, now: float, length: int) -> tuple[int, int] | None:
        """Start a new window of the abuse signals when the one in force is ``length``
        seconds old (or from the future: the clock was set back); returns the window that
        ended, (start, end) in unix seconds, or None. The data plane zeroes a sketch of an
        older window at its next update (bpf/scan.h)."""
        with self.locked():
            start, end = self.maps.control_params()["scan_epoch"], int(now)
            if 0 <= end - start < length:
                return None
            self.maps.set_control_params(scan_epoch=end)
        return start, end

    def throttle_rates(self) -> np.ndarray:
        """Every slot's throttle, kbps up and down (kernel.Maps.throttle_rates)."""
        return self.maps.throttle_rates()

    def volumes(self, slots: Iterable[int]) -> dict[int, Volume]:
        return self.maps.volumes(slots)

    def pool_volumes(self) -> dict[bytes, Volume]:
        return self.maps.pool_volumes()

    def manual_throttles(self) -> dict[int, tuple[int, int]]:
        return self.maps.manual_throttles()

    def get_throttle(self, slot: int) -> tuple[int, int]:
        return self.maps.get_throttle(slot)

    # ---- counters and status ------------------------------------------------------------
    def counters_sum(self) -> dict[int, tuple[int, int]]:
        return self.maps.counters_sum()

    def fast_counters(self) -> dict[str, tuple[int, int]]:
        return self.maps.fast_counters()

    def fast_path(self) -> dict:
        return loader.fast_path(self.maps)

    def kernel(self) -> dict:
        """The running kernel: release, declared minimum, what it lacks, what is degraded."""
        return kernel.kernel_report()

    def allow_bits(self, addr: bytes) -> int:
        return self.maps.allow_bits(addr)

    def table_sizes(self) -> dict[str, int]:
        return {"hosts": len(self.maps.host_table()), "prefixes": len(self.maps.prefix_table()),
                "allow": len(self.maps.allow_items())}

    # ---- what the metrics read (xdpzoot/metrics.py) -------------------------------------
    def contract_columns(self) -> np.ndarray:
        """xz_contracts' values as rows of struct xz_class, read in batches (the row of
        the directory's count, key 0, included: its type is 0)."""
        import numpy as np

        raw = self.maps.contract_map.values()
        return np.frombuffer(raw, dtype=np.uint32).reshape(-1, WORDS)

    def subscriber_loads(self) -> int:
        """How many whole loads have written the subscriber maps (each counts its write
        of the subscriber directory: kernel.Maps.dir_writes)."""
        return self.maps.dir_writes()

    def entries(self, table: str) -> int:
        """How many entries a map holds, counted by reading it whole in batches (no
        count is kept for it): ``allow``, and the data plane's LRU tables ``flows`` and
        ``pool_lru``, whose reads take each hash bucket's lock for one copy."""
        m = {"allow": self.maps.allow, "flows": self.maps.flows,
             "pool_lru": self.maps.pool_state}[table]
        return len(m.values()) // m.value_size

    def uniform_classes(self) -> int:
        """Pools and blocks whose /24s the class index answers for (kernel.Maps
        .sync_uniform; the rest take the trie)."""
        return self.maps.uniform_counts()[0]

    def hosted_slash24s(self) -> int:
        """/24s with host entries that the class index answers for (their other
        addresses: the prefix's class; kernel.Maps._mark_hosts)."""
        return self.maps.hosted_in_use()

    def ipv6_prefix_lengths(self) -> int:
        """How many IPv6 prefix lengths the programs probe in xz_prefixes6 (0: the trie
        answers: no IPv6 prefix, or more lengths than dirs.V6_LENS)."""
        return len(dirs.lens_of(self.maps.v6_lens_map.lookup(kernel.ZERO_KEY)))

    def capacities(self) -> dict[str, int]:
        """Entries each table can hold (the maps' max_entries; a CSAM table's per
        generation, the state slots without slot 0, which is the pools')."""
        m = self.maps
        return {"hosts": m.host_map.max_entries, "prefixes": m.prefix_map.max_entries,
                "allow": m.allow.max_entries, "contracts": m.contract_map.max_entries,
                "subscriber_slots": m.slots - 1, "pool_addresses": m.pool_map.max_entries,
                "pool_lru": m.pool_state.max_entries, "flows": m.flows.max_entries,
                "manual_throttles": m.manual.max_entries,
                "uniform_classes": m.uniform_map.max_entries - 1,
                "hosted_slash24s": m.hosted_map.max_entries - 1,
                "ipv6_prefix_lengths": dirs.V6_LENS,
                "csam_hosts": m.csam_hosts[0].max_entries,
                "csam_prefixes": m.csam_prefixes[0].max_entries}

    def counter_slots(self) -> list[tuple[int, int]]:
        """(packets, bytes) of every counter slot, summed over CPUs (XZ_COUNTER order)."""
        return self.maps.counter_slots()

    def interfaces(self, names: list[str]) -> dict[str, tuple[loader.Attachment | None, dict]]:
        """Our program on each named interface, and its counters (loader.interfaces)."""
        return loader.interfaces(self.pin_dir, names)

    def contract_sizes(self) -> dict[str, int]:
        """RADIUS contracts, those suspended, and the session entries in the maps."""
        contracts = self.contracts().values()
        return {"contracts": len(contracts),
                "suspended": sum(1 for e in contracts if e.flags & sync.SUSPENDED),
                "session_entries": sum(len(sync.split_sessions(t)[1]) for t in (
                    self.maps.host_table(), self.maps.prefix_table()))}


TRACE_LEASE_S = 5        # a trace's lease: the data plane's events stop this long after ...
TRACE_RENEW_S = 1.0      # ... its last renewal, made this often
TRACE_MAX_RATE = 100_000
TRACE_BITS = C["XZ_C_TRACE"] | C["XZ_C_TRACE_ADDRS"]


class Trace:
    """A running trace (Instance.trace): its events as they come, its lease renewed."""

    def __init__(self, inst: Instance, ring: kernel.RingBuffer, bits: int,
                 clock: Callable[[], float]):
        self._inst, self._ring, self._bits, self._clock = inst, ring, bits, clock
        self._lost0 = inst.maps.trace_lost()
        self.until = 0
        self._renew_at = 0.0
        self._next_lease()

    def _next_lease(self) -> None:
        now = self._clock()
        self.until = int(now) + TRACE_LEASE_S
        self._renew_at = now + TRACE_RENEW_S

    def poll(self, timeout: float) -> list[Event]:
        """The events that arrive within ``timeout`` seconds (at most until the lease's
        next renewal, which this makes when due), oldest first."""
        if self._clock() >= self._renew_at:
            self._renew()
        wait = max(0.0, min(timeout, self._renew_at - self._clock()))
        return [Event.unpack(r) for r in self._ring.poll(int(wait * 1000))]

    def _renew(self) -> None:
        with self._inst.locked():
            c = self._inst.maps.control_value()
            if c.trace_until != self.until:
                raise kernel.KernelError("the trace's lease ran out (this process stood "
                                         f"still for over {TRACE_LEASE_S} s?): stopped")
            self._next_lease()
            self._inst.maps.write_control(c._replace(flags=c.flags | self._bits,
                                                     trace_until=self.until))

    @property
    def lost(self) -> int:
        """Events lost to a full ring buffer since this trace began."""
        return self._inst.maps.trace_lost() - self._lost0


def _map_key(net: tables.IPNetwork) -> bytes:
    """The host or prefix map's key of a network."""
    if tables.is_host(net):
        return tables.addr16(net.network_address)
    return LPM_KEY.pack(*tables.key_of(net))


def _closed(d: bytearray, hosts: list[bytes], prefixes: list[tuple[int, bytes]]) -> bool:
    """Whether the directory ``d`` says "absent" where one of these entries would go."""
    for a in hosts:
        i = dirs.slash24(a)
        if i is not None and dirs.get(d, i) & dirs.NO_HOST:
            return True
    for plen, a in prefixes:
        s = dirs.span(plen, a)
        if s and any(dirs.get(d, i) & dirs.NO_PREFIX for i in range(s[0], s[0] + s[1])):
            return True
    return False

