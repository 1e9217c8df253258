"""The RADIUS listeners: accounting (sessions into the maps) and CoA/Disconnect.

Requests are handled one at a time, to the end, on an asyncio loop: find the client by the
source address (anyone else: no answer), verify with its secret, plan the change in the
session table, hand it to ``apply`` (the map writer), commit, answer. The answer goes only
after ``apply`` returned; if it raises, nothing is committed and nothing answered (the NAS
sends again). A CoA or Disconnect acts through ``act`` (suspend, rate) or, for a Disconnect
in "session" mode, ends the sessions through ``apply``.

Every request is counted: by what it was (``requests``), and by why it got no answer
(``drops``); :meth:`Listener.stats` gives them as a plain dict for status and metrics.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import socket
import stat
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from pyrad import packet as rp

from xdpzoot.bandwidth.store import save_snapshot
from xdpzoot.config import Radius, listen_address
from xdpzoot.sources import radius
from xdpzoot.sources.files import SourceError
from xdpzoot.sources.radius import Coa, Drop, Nak
from xdpzoot.sources.sessions import Change, Plan, SessionTable

log = logging.getLogger("xdpzoot.radius")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_SECRET = 256
DUPLICATE_S = 30.0   # how long an answer is kept for a retransmitted request
DUPLICATE_MAX = 65536
CLIENT_CACHE = 4096   # sources remembered with their client (or none)
PORTS = (("acct", "listen"), ("coa", "coa_listen"))   # the sockets, by their [radius] key


@dataclass(frozen=True)
class Client:
    """A NAS that may send: its name, source prefixes and shared secret."""

    name: str
    source: tuple[IPNetwork, ...]
    secret: bytes

    def __repr__(self) -> str:   # never show the secret
        return f"Client({self.name!r}, {[str(n) for n in self.source]})"


@dataclass(frozen=True)
class Action:
    """What a CoA or Disconnect-Request asks of a contract: "suspend", or "rate" with the
    new rates (None: unchanged). Carried out by the ``act`` function given to the listener
    (the instance: the contract's entries, the audit log)."""

    kind: str
    users: tuple[str, ...]
    up_kbps: int | None = None
    down_kbps: int | None = None


def read_secret(path: str, key: str) -> bytes:
    """The shared secret in ``path`` (trailing newline dropped). The file must be a regular
    file no one but its owner can read or write (0600 or stricter); the secret itself never
    appears in a message."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SourceError(path, [(None, f"{key}: cannot open: {e.strerror or e}")]) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif st.st_mode & 0o077:
            problem = (f"mode {stat.S_IMODE(st.st_mode):04o} lets others read it "
                       "(chmod 600)")
        else:
            data = f.read(MAX_SECRET + 2).rstrip(b"\r\n")
            problem = ("empty" if not data else
                       f"longer than {MAX_SECRET} bytes" if len(data) > MAX_SECRET else "")
    if problem:
        raise SourceError(path, [(None, f"{key}: {problem}")])
    return data


def clients_of(cfg: Radius) -> list[Client]:
    """The configured clients with their secrets read."""
    return [Client(c.name, c.source, read_secret(c.secret_file,
                                                 f"radius.client {c.name!r} secret_file"))
            for c in cfg.client]


def _bind(spec: str) -> socket.socket:
    host, port = listen_address(spec)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise OSError(e.errno, f"{spec}: {e.strerror}") from None
    s.setblocking(False)
    return s


def _bind_all(specs: dict[str, str]) -> dict[str, socket.socket | None]:
    """A socket per kind bound to its "HOST:PORT" (None for ""): all of them, or none (a
    failure closes those already bound)."""
    out: dict[str, socket.socket | None] = {}
    try:
        for kind, spec in specs.items():
            out[kind] = _bind(spec) if spec else None
    except OSError:
        for s in out.values():
            if s is not None:
                s.close()
        raise
    return out


class Listener:
    """The accounting and CoA request handlers, with the session table and the counters."""

    def __init__(self, clients: Iterable[Client], table: SessionTable,
                 apply: Callable[[Change], None],
                 act: Callable[[Action], None] | None = None, *,
                 require_message_authenticator: bool = False, disconnect: str = "suspend",
                 clock: Callable[[], float] = time.time):
        self.clients = list(clients)
        self.table = table
        self.apply = apply
        self.act = act
        self.require_ma = require_message_authenticator
        self.disconnect = disconnect
        self.clock = clock
        self.requests: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()   # not about one request: the snapshot
        self.snapshot = ""   # where serve() writes the table
        self._client_cache: dict[str, Client | None] = {}
        self._answered: OrderedDict[tuple, tuple[float, bytes]] = OrderedDict()
        self._ports: dict[str, asyncio.DatagramTransport] = {}   # "acct", "coa" served

    def counters(self) -> dict[str, object]:
        """The request counters, and how many sessions and addresses the table holds, as
        plain values: cheap, and safe from another thread (the metrics'), since each is
        one step under the interpreter lock (a dict copied, a len)."""
        return {"sessions": len(self.table), "addresses_held": len(self.table.owner),
                "requests": dict(self.requests), "drops": dict(self.drops),
                "answers": dict(self.answers), "errors": dict(self.errors)}

    def stats(self) -> dict[str, object]:
        """The counters, and the table's sessions by NAS and addresses by kind (a walk of
        the table: on the listener's thread)."""
        return {**self.counters(), **self.table.counts()}

    def client_of(self, host: str) -> Client | None:
        """The client whose source prefixes hold ``host`` (remembered per source: the NAS
        are few, and parsing the address costs as much as a lookup in the table)."""
        try:
            return self._client_cache[host]
        except KeyError:
            pass
        if len(self._client_cache) >= CLIENT_CACHE:
            self._client_cache.clear()
        found = self._client_cache[host] = self._find_client(host)
        return found

    def _find_client(self, host: str) -> Client | None:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return next((c for c in self.clients if any(ip in n for n in c.source)), None)

    # --- one datagram ------------------------------------------------------------------------

    def handle(self, data: bytes, source: tuple, port_kind: str) -> bytes | None:
        """The answer to one datagram on the accounting ("acct") or CoA ("coa") port, or None.

        Never raises: a failure of the map writer is counted as ``apply_failed`` and logged,
        anything else unexpected as ``internal``."""
        try:
            return self._handle(data, source, port_kind)
        except Drop as d:
            self.drops[d.cause] += 1
        except Exception:
            self.drops["internal"] += 1
            log.exception("radius: request from %s not handled", source[0])
        return None

    def _handle(self, data: bytes, source: tuple, port_kind: str) -> bytes | None:
        client = self.client_of(source[0])
        if client is None:
            raise Drop("unknown_client")
        now = self.clock()
        data = data[:radius.check_frame(data)]
        # A retransmission (RFC 5080 section 2.2.2) is the same packet from the same port:
        # it gets the same answer again, without being handled twice.
        dup = (source[0], source[1], data)
        seen = self._answered.get(dup)
        if seen is not None and seen[0] > now - DUPLICATE_S:
            self.requests["duplicate"] += 1
            return seen[1]
        pkt = radius.verify(data, client.secret, self.require_ma)
        wanted = (radius.ACCOUNTING_REQUEST,) if port_kind == "acct" else (
            radius.COA_REQUEST, radius.DISCONNECT_REQUEST)
        if pkt.code not in wanted:
            raise Drop("code")
        if pkt.code == radius.ACCOUNTING_REQUEST:
            answer = self._accounting(client, pkt, source, now)
        else:
            answer = self._coa(client, pkt, now)
        self._remember(dup, now, answer)
        return answer

    def _remember(self, dup: tuple, now: float, answer: bytes) -> None:
        self._answered[dup] = (now, answer)
        while self._answered and (len(self._answered) > DUPLICATE_MAX or
                                  next(iter(self._answered.values()))[0] <= now - DUPLICATE_S):
            self._answered.popitem(last=False)

    def _nas(self, client: Client, nas: str, source: tuple) -> str:
        """The NAS a session belongs to: the client's name with what the packet names, so
        that one client can never touch another client's sessions."""
        return f"{client.name}/{nas or source[0]}"

    def _write(self, plan: Plan, now: float) -> None:
        """Apply, then commit; a failing apply leaves the table as it was."""
        if plan.change:
            try:
                self.apply(plan.change)
            except Exception:
                log.exception("radius: map write failed")
                raise Drop("apply_failed") from None
        self.table.commit(plan, now)

    def _accounting(self, client: Client, pkt: rp.Packet, source: tuple, now: float) -> bytes:
        acct = radius.accounting(pkt)
        self.requests[acct.status] += 1
        self._write(self.table.plan(acct, self._nas(client, acct.nas, source), now), now)
        self.answers["accounting_response"] += 1
        return radius.reply(pkt)

    def _coa(self, client: Client, pkt: rp.Packet, now: float) -> bytes:
        kind = "disconnect" if pkt.code == radius.DISCONNECT_REQUEST else "coa"
        self.requests[kind] += 1
        try:
            request = radius.coa(pkt)
            self._coa_act(client, request, now)
        except Nak as n:
            self.answers[f"{kind}_nak_{n.error_cause}"] += 1
            return radius.reply(pkt, n.error_cause)
        self.answers[f"{kind}_ack"] += 1
        return radius.reply(pkt)

    def _coa_act(self, client: Client, c: Coa, now: float) -> None:
        nas = f"{client.name}/{c.nas}" if c.nas else ""
        keys = [k for k in self.table.select(nas, c.session_id, c.user, c.networks)
                if k[0].startswith(client.name + "/")]
        if not keys:
            if nas and not any(k[0] == nas for k in self.table.sessions.keys()):
                raise Nak(radius.NAS_MISMATCH, "no such NAS")
            raise Nak(radius.SESSION_NOT_FOUND, "no such session")
        if c.disconnect and self.disconnect == "session":
            try:
                self._write(self.table.plan_end(keys), now)
            except Drop:
                raise Nak(radius.RESOURCES_UNAVAILABLE, "map write failed") from None
            return
        users = tuple(sorted(self.table.users(keys)))
        action = (Action("suspend", users) if c.disconnect
                  else Action("rate", users, c.up_kbps, c.down_kbps))
        try:
            if self.act is None:
                raise RuntimeError("no action configured")
            self.act(action)
        except Exception:
            log.exception("radius: %s failed", action.kind)
            raise Nak(radius.RESOURCES_UNAVAILABLE, "action failed") from None

    def expire(self) -> int:
        """End sessions without an Interim for the timeout; returns how many. A failing
        map write leaves them for the next round."""
        now = self.clock()
        plan = self.table.plan_expiry(now)
        if not plan.put:
            return 0
        try:
            self._write(plan, now)
        except Drop as d:
            self.drops[d.cause] += 1
            return 0
        self.requests["expired"] += len(plan.put)
        return len(plan.put)

    # --- serving -----------------------------------------------------------------------------

    async def listen(self, **socks: socket.socket | None) -> None:
        """From now on serve each kind named ("acct", "coa") on its bound socket (None: not
        at all); the others as they are. The new port opens before the one it replaces
        closes."""
        loop = asyncio.get_running_loop()
        for kind, sock in socks.items():
            old = self._ports.pop(kind, None)
            if sock is not None:
                self._ports[kind], _ = await loop.create_datagram_endpoint(
                    lambda kind=kind: _Protocol(self, kind), sock=sock)
            if old is not None:
                old.close()

    async def serve(self, acct: socket.socket | None, coa: socket.socket | None,
                    stop: asyncio.Event, snapshot: str = "", every: float = 5.0,
                    save_after: float = 1.0) -> None:
        """Answer on the given (bound) sockets until ``stop`` is set; expire sessions every
        ``every`` seconds; write the snapshot (if a path is given; ``self.snapshot`` from
        then on) soon after the table changed: ``save_after`` seconds, or ten times as long
        as the last write took if that is longer, and once more at the end. The table
        keeps its records packed (SessionTable.frozen): the loop copies the list of them (a
        millisecond at 100k sessions), a worker thread joins and writes them, so answers go
        on meanwhile."""
        loop = asyncio.get_running_loop()
        self.snapshot = snapshot
        await self.listen(acct=acct, coa=coa)
        saved = ("", -1)   # the path and version written; none by this listener yet
        expiry = loop.time() + every
        wait = save_after   # until the next write may be made
        last = loop.time()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), min(save_after, every))
                except TimeoutError:
                    pass
                now = loop.time()
                # The young generation, collected every round: a Stop storm frees more
                # objects than it makes, which holds off the automatic collection while
                # the stops it remembers pile up (100k of them: a 0.3 s pause later on).
                gc.collect(0)
                if now >= expiry:
                    self.expire()
                    expiry = now + every
                if now - last >= wait and (self.snapshot, self.table.version) != saved:
                    saved = await self._save_aside(saved)
                    last = loop.time()
                    wait = max(save_after, 10 * (last - now))
        finally:
            for t in self._ports.values():
                t.close()
            self._ports.clear()
            self._save(saved)

    async def reconfigure(self, old: Radius, new: Radius) -> str:
        """Serving with config ``old``, take ``new`` between two requests, the session
        table and the counters kept: the clients with their secrets read again (a rotated
        secret file counts), the rules, the snapshot path, and a new socket for each
        address that changed (the others stay open: nothing queued on them is lost).
        Returns what changed, in words ("" if nothing; a secret never appears). A bad
        secret file or an address that cannot be bound raises SourceError or OSError, and
        nothing changes."""
        clients = clients_of(new)
        was = {c.name: c for c in self.clients}
        what = [f"{f.name} {_shown(getattr(old, f.name))} -> {_shown(getattr(new, f.name))}"
                for f in fields(Radius)
                if f.name != "client" and getattr(old, f.name) != getattr(new, f.name)]
        what += [f"client {n} removed" for n in was if n not in {c.name for c in clients}]
        for c in clients:
            what += ([f"client {c.name} added"] if c.name not in was else
                     [f"client {c.name} {x} changed" for x in ("source", "secret")
                      if getattr(c, x) != getattr(was[c.name], x)])
        await self.listen(**_bind_all({k: getattr(new, f) for k, f in PORTS
                                       if getattr(new, f) != getattr(old, f)}))
        self.clients = clients
        self._client_cache.clear()
        self.require_ma = new.require_message_authenticator
        self.disconnect = new.disconnect
        self.table.timeout = new.session_timeout
        self.snapshot = new.state
        return ", ".join(what)

    async def _save_aside(self, saved: tuple[str, int]) -> tuple[str, int]:
        """:meth:`_save` with the join and the write on a worker thread."""
        path, version = self.snapshot, self.table.version
        if not path or (path, version) == saved:
            return saved
        frozen = self.table.frozen()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: save_snapshot(path, SessionTable.pack(frozen)))
        except OSError as e:
            self.errors["snapshot"] += 1
            log.error("radius: cannot write the session snapshot %s: %s", path, e)
            return saved
        return path, version

    def _save(self, saved: tuple[str, int]) -> tuple[str, int]:
        """Write the table to ``self.snapshot`` if it is not what ``saved`` says was
        written (path, table version); what is written now (``saved`` if the write failed:
        it is tried again)."""
        path, version = self.snapshot, self.table.version
        if not path or (path, version) == saved:
            return saved
        try:
            self.table.save(path)
        except OSError as e:
            self.errors["snapshot"] += 1
            log.error("radius: cannot write the session snapshot %s: %s", path, e)
            return saved
        return path, version


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, listener: Listener, kind: str):
        self.listener = listener
        self.kind = kind
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        answer = self.listener.handle(data, addr, self.kind)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


def open_listener(cfg: Radius, apply: Callable[[Change], None],
                  act: Callable[[Action], None]
                  ) -> tuple[Listener, socket.socket | None, socket.socket | None]:
    """The listener of a config (secrets read, sessions restored from ``cfg.state``) and
    its accounting and CoA sockets, bound (None where off); serve with
    ``Listener.serve(acct, coa, stop, cfg.state)``. A bad secret file or snapshot raises
    SourceError before any socket is bound."""
    clients = clients_of(cfg)
    try:
        table = (SessionTable.restore(cfg.state, cfg.session_timeout) if cfg.state
                 else SessionTable(cfg.session_timeout))
    except ValueError as e:
        raise SourceError(cfg.state, [(None, str(e))]) from None
    listener = Listener(clients, table, apply, act,
                        require_message_authenticator=cfg.require_message_authenticator,
                        disconnect=cfg.disconnect)
    socks = _bind_all({k: getattr(cfg, f) for k, f in PORTS})
    return listener, socks["acct"], socks["coa"]


def _shown(value: object) -> str:
    return "off" if value == "" else str(value)
