"""The RADIUS service: the listener (sources/radius_server.py) with an instance behind it.

Sessions go into the maps through :meth:`Instance.apply_sessions` (each user's contract
from the subscriber file's ``user`` column), CoA and Disconnect through
:meth:`Instance.act` and into the audit log (rule ``coa``). The user -> contract table is
read from ``[sources] subscribers`` at start and again when the file changes (looked at
every ``WATCH_S`` seconds). At start, after a new read, and after a load of the file into
the maps (by the daemon or `subscribers load`: it counts its write of the directory),
every session of the table is written again and session entries the table does not hold
are removed, so the maps converge to the table after a restart, and a session of a user
the file has just gained enters the maps once its contract is loaded.

``xdpzoot radius`` runs it on the main thread (:meth:`run`); ``xdpzoot run`` on a thread of
its own (:meth:`start_thread`), with an Instance of its own: the flock is per open file, so
the daemon's instance and this one exclude each other, and neither object is shared
between threads. A new config (SIGHUP) is taken while serving (:meth:`reload`): sessions
and map entries are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from xdpzoot.bandwidth import accounting, store
from xdpzoot.dataplane.instance import Instance
from xdpzoot.sources.files import SourceError
from xdpzoot.sources.radius_server import Action, open_listener
from xdpzoot.sources.sessions import Change
from xdpzoot.sources.subscribers import read_columns

log = logging.getLogger("xdpzoot.radius")
WATCH_S = 2.0   # how often the subscriber file's stamp is looked at


def say(msg: str) -> None:
    """One line to stderr, as the daemon writes them."""
    print(f"xdpzoot: {msg}", file=sys.stderr, flush=True)


class RadiusService:
    """The listener of ``cfg.radius``, bound, its sessions restored and written again."""

    def __init__(self, cfg, pin_dir: str):
        """Reads the secrets, the session snapshot and the subscriber file, binds the
        sockets and writes the restored sessions; raises SourceError, KernelError or
        OSError before serving if any of it fails."""
        self.cfg = cfg
        self.inst = Instance(pin_dir, cfg.defines())
        self.users: dict[str, int] = {}
        self.counts: Counter[str] = Counter()   # apply_sessions': unknown, conflict, ...
        self.rated: set[int] = set()   # contracts whose rates a CoA set, until a load
        self._stamp: tuple[int, int] | None = None
        self._loads = -1   # the instance's count of whole directory writes (loads) seen
        self.listener, self.acct, self.coa = open_listener(cfg.radius, self.apply, self.act)
        b = cfg.bandwidth
        self.audit = store.AuditLog(b.audit, b.audit_retention_days * 86400)
        try:
            self.read_users()
            self.converge()
        except BaseException:
            self.close()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        for s in (self.acct, self.coa):
            if s is not None:
                s.close()
        self.inst.close()

    # --- the listener's callbacks ----------------------------------------------------------

    def apply(self, change: Change) -> None:
        self.counts.update(self.inst.apply_sessions(change, self.users))

    def act(self, action: Action) -> None:
        """Suspend or rate the contracts, then audit it (a failed audit write is logged:
        the action stands)."""
        sids = self.inst.act(action, self.users)
        if action.kind == "rate":
            self.rated.update(sids)
        rate = action.down_kbps if action.kind == "rate" else None
        values = ({"suspended": True} if action.kind == "suspend" else
                  {"up_kbps": action.up_kbps, "down_kbps": action.down_kbps})
        try:
            os.makedirs(os.path.dirname(self.audit.path) or ".", mode=0o700, exist_ok=True)
            self.audit.write([accounting.Action(time.time(), sid, "coa", action.kind, rate,
                                                values) for sid in sids])
        except OSError as e:
            log.error("radius: audit log %s: %s", self.audit.path, e.strerror)

    # --- the subscriber file ---------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int] | None:
        path = self.cfg.sources.subscribers
        try:
            st = os.stat(path) if path else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st else None

    def read_users(self) -> bool:
        """Read user -> subscriber id from the subscriber file if it changed; whether it
        did. A file with problems keeps the table as it was (logged)."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        path = self.cfg.sources.subscribers
        if not path:
            return False
        try:
            contracts = read_columns(path, False, self.cfg.limits.source_bytes).contracts
        except (SourceError, OSError) as e:
            log.error("radius: users not read: %s", e)
            return False
        self.users = dict(zip(contracts.keys, contracts.ids, strict=True))
        return True

    def converge(self) -> None:
        """Write every session of the table again (each with its contract as the maps now
        have it) and remove session entries the table does not hold."""
        table = self.listener.table
        self._loads = self.inst.maps.dir_writes()
        held = self.inst.session_networks()
        owner = table.owner
        self.apply(Change(tuple(table.held()), tuple(n for n in held if n not in owner)))

    async def _watch(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), WATCH_S)
            except TimeoutError:
                pass
            if stop.is_set():
                break
            # parsed on a thread: answers go on meanwhile (the GIL allowing)
            read = self._file_stamp() != self._stamp and \
                await loop.run_in_executor(None, self.read_users)
            loaded = self.inst.maps.dir_writes() != self._loads
            if loaded:
                self.rated.clear()   # a load gives every contract the file's rates again
            if read or loaded:
                self.converge()

    # --- serving ---------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Answer until ``stop`` is set; the snapshot is written at the end."""
        watch = asyncio.ensure_future(self._watch(stop))
        try:
            await self.listener.serve(self.acct, self.coa, stop, self.cfg.radius.state)
        finally:
            stop.set()
            await watch

    async def _reload(self, cfg) -> str:
        what = await self.listener.reconfigure(self.cfg.radius, cfg.radius)
        self.cfg = cfg   # the subscriber file's path too: _watch reads it if it changed
        b = cfg.bandwidth
        self.audit = store.AuditLog(b.audit, b.audit_retention_days * 86400)
        return what

    def reload(self, cfg, timeout: float = 60.0) -> str:
        """Serving on its thread (:meth:`start_thread`), take the [radius] section of
        ``cfg`` and its secret files as they are now, between two requests: sessions, map
        entries and the sockets of unchanged addresses stay. Returns what changed ("" if
        nothing); raises SourceError or OSError, and nothing changes, when a secret file
        is bad or an address cannot be bound; TimeoutError if the loop has not done it
        within ``timeout`` seconds (it is cancelled), RuntimeError if the loop has ended."""
        done = asyncio.run_coroutine_threadsafe(self._reload(cfg), self._loop)
        try:
            return done.result(timeout)
        finally:
            done.cancel()

    async def _hup(self, reread: Callable[[], object], one: asyncio.Lock) -> None:
        """SIGHUP of ``xdpzoot radius``: the config read again and taken, or kept; ``one``
        makes a second SIGHUP wait for the first."""
        async with one:
            try:
                cfg = reread()
                if not cfg.radius.listen and not cfg.radius.coa_listen:
                    raise ValueError("[radius] listen and coa_listen are both off")
                what = await self._reload(cfg)
            except (SourceError, OSError, ValueError) as e:
                say(f"radius: reload failed, keeping the old config: {e}")
                return
        say(f"radius: reloaded: {what}" if what else "radius: reloaded: nothing changed")

    def run(self, reread: Callable[[], object] | None = None) -> None:
        """On the main thread until SIGTERM or SIGINT; on SIGHUP, the config that
        ``reread`` returns is taken (:meth:`reload`). Says "serving" once the signals are
        handled."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            if reread is not None:
                one, hups = asyncio.Lock(), set()   # the loop holds tasks weakly: kept here

                def hup() -> None:
                    task = loop.create_task(self._hup(reread, one))
                    hups.add(task)
                    task.add_done_callback(hups.discard)

                loop.add_signal_handler(signal.SIGHUP, hup)
            r = self.cfg.radius
            say(f"radius: serving {', '.join(x for x in (r.listen, r.coa_listen) if x)} for "
                f"{self.inst.pin_dir}, {len(self.listener.table)} sessions restored")
            await self.serve(stop)

        try:
            asyncio.run(main())
        finally:
            self.close()

    def start_thread(self) -> RadiusService:
        """Serve on a thread of its own until :meth:`stop`."""
        ready = threading.Event()

        def body() -> None:
            self._loop = asyncio.new_event_loop()
            self._stop = asyncio.Event()
            ready.set()
            try:
                self._loop.run_until_complete(self.serve(self._stop))
            except Exception:
                log.exception("radius: the listener stopped")
            finally:
                self._loop.close()
                self.close()

        self._thread = threading.Thread(target=body, name="xdpzoot-radius", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def serving(self) -> bool:
        """Whether its thread (:meth:`start_thread`) serves still."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread (the snapshot written first)."""
        if self._thread is None or self._loop is None or self._stop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:   # the loop ended already
            pass
        self._thread.join(timeout)
