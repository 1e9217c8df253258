"""The ``xdpzoot`` command line: every operation an operator needs, ``--json`` on all
that reports. Exit codes: 0 ok, 1 operational error, 2 usage error."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import click

from . import csam, kernel, loader, model, schema, sync, tables
from .sources import SourceError, paused_gc

ENV_PIN_DIR = "XDPZOOT_PIN_DIR"


class Ctx:
    """Global options, resolved lazily so that --help needs no root and no config."""

    def __init__(self, config_path: str | None, pin_dir: str):
        self.config_path = config_path
        self.pin_dir = pin_dir
        self._cfg = None

    @property
    def cfg(self):
        if self._cfg is None:
            from .config import load_config  # here: most commands never read the config

            self._cfg = load_config(self.config_path)
        return self._cfg

    def maps(self, create: bool = False) -> kernel.Maps:
        if create and not kernel.pinned(self.pin_dir):
            return kernel.Maps(kernel.compile_bpf(self.pin_dir, self.cfg.defines(),
                                                  maps_only=True))
        return loader.open_maps(self.cfg, self.pin_dir)

    def subscriber_maps(self, create: bool = False) -> kernel.SubscriberMaps:
        """The subscriber maps, opened from their pins without a compile."""
        if not kernel.pinned(self.pin_dir):
            self.maps(create)   # creates the maps, or says that xdpzoot is not loaded
        return kernel.SubscriberMaps.open(self.pin_dir)


def _audit(o: Ctx, subscriber: int | str, action: str, rate_kbps: int | None = None,
           **values) -> None:
    """An operator's policy action, into the audit log that the daemon writes too.
    If it cannot be written: a warning, the action stands."""
    from . import accounting

    b = o.cfg.bandwidth
    try:
        os.makedirs(os.path.dirname(b.audit) or ".", mode=0o700, exist_ok=True)
        log = accounting.AuditLog(b.audit, b.audit_retention_days * 86400)
        log.write([accounting.Action(time.time(), subscriber, "operator", action, rate_kbps,
                                     values)])
    except OSError as e:
        click.echo(f"xdpzoot: warning: audit log {b.audit}: {e.strerror}", err=True)


def _fail(msg: str) -> None:
    click.echo(f"xdpzoot: error: {msg}", err=True)
    sys.exit(1)


def _run(fn: Callable[[], None]) -> None:
    """Operational errors become one line on stderr and exit code 1."""
    try:
        fn()
    except (kernel.KernelError, SourceError, OSError) as e:
        _fail(str(e))


def _emit(as_json: bool, data, text: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=None, sort_keys=True, default=str))
    else:
        text()


EXAMPLES = """\b
Examples:
  xdpzoot attach --access eth1 --core eth0
  xdpzoot --pin-dir /run/xdpzoot/r1 attach --hook tc --access v1 --core v0
  xdpzoot subscribers load /etc/xdpzoot/subscribers.csv
  xdpzoot explain --in access --src 100.64.1.10 --dst 203.0.113.10 \\
      --proto tcp --dport 25
  xdpzoot stats 1 5
  xdpzoot status --json
"""


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", default=None,
              help="Config file (default /etc/xdpzoot/xdpzoot.toml).")
@click.option("--pin-dir", metavar="DIR", envvar=ENV_PIN_DIR,
              default=kernel.DEFAULT_PIN_DIR, show_default=True,
              help=f"BPF pin directory of this instance (or ${ENV_PIN_DIR}).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, pin_dir: str) -> None:
    """xdpzoot: OP25B, IP53B and suspension at XDP/TC for an ISP edge router."""
    ctx.obj = Ctx(config_path, os.path.abspath(pin_dir))


json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


# ---- attach / detach / status -------------------------------------------------------------


@main.command(epilog="""\b
Examples:
  xdpzoot attach                       # interfaces from the config
  xdpzoot attach --access eth1 --core eth0 --hook tc
  xdpzoot attach --mode generic --json""")
@click.option("--access", multiple=True, metavar="IF", help="Subscriber-facing interface.")
@click.option("--core", multiple=True, metavar="IF", help="Internet-facing interface.")
@click.option("--hook", type=click.Choice(["xdp", "tc"]), default=None)
@click.option("--mode", type=click.Choice(["auto", "native", "generic"]), default=None,
              help="XDP attach mode (auto: native where the driver can, else generic).")
@json_opt
@click.pass_obj
def attach(o: Ctx, access, core, hook, mode, as_json) -> None:
    """Load the programs and attach them; again to replace them in place."""

    def go():
        cfg = o.cfg
        acc = list(access) or list(cfg.interfaces.access)
        cor = list(core) or list(cfg.interfaces.core)
        if not acc and not cor:
            raise click.UsageError("no interfaces: give --access/--core or [interfaces]")
        subs = lst = None
        if cfg.sources.subscribers:   # validate before any change
            _, *subs = tables.read_subscribers(cfg.sources.subscribers)
        if cfg.sources.csam:
            text, warnings = csam.read_list(cfg.sources.csam)
            lst = csam.parse_csam_bytes(text, cfg.sources.csam)
            for w in warnings:
                click.echo(f"xdpzoot: warning: {w}", err=True)
        with kernel.lock(o.pin_dir):
            maps, done = loader.attach(cfg, o.pin_dir, acc, cor, hook or cfg.interfaces.hook,
                                       mode or cfg.interfaces.mode)
            fast = loader.fast_path(maps)
            change = sync.apply_subscribers(maps, *subs) if subs is not None else None
            if lst is not None:
                with csam.Maps(o.pin_dir) as cm:
                    csam.load(cm, text, cfg.sources.csam, lst)
        if fast["enabled"]:
            for name in sorted(set(acc + cor) - set(fast["egress"])):
                click.echo(f"xdpzoot: warning: fast path: {name}: ifindex beyond the devmap, "
                           "its traffic goes through the kernel", err=True)
        data = {"pin_dir": o.pin_dir, "attached": [asdict(a) for a in done],
                "subscribers": asdict(change) if change else None,
                "csam": lst.counts() if lst else None,
                "fast_path": {k: fast[k] for k in ("enabled", "egress")}}
        _emit(as_json, data, lambda: [
            click.echo(f"attached {a.ifname:<12} {a.role:<7} {a.hook} ({a.mode})")
            for a in done] + ([click.echo(f"subscribers: {_change_text(change)}")]
                              if change else []))

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot detach
  xdpzoot --pin-dir /run/xdpzoot/r1 detach --json""")
@json_opt
@click.pass_obj
def detach(o: Ctx, as_json) -> None:
    """Remove the programs from every interface and delete the pinned maps."""

    def go():
        with kernel.lock(o.pin_dir):
            gone = loader.detach(o.pin_dir)
        _emit(as_json, {"detached": [asdict(a) for a in gone]}, lambda: click.echo(
            "\n".join(f"detached {a.ifname} ({a.role}, {a.hook})" for a in gone)
            or "nothing was attached"))

    _run(go)


def _totals(counters: dict[int, tuple[int, int]]) -> list[dict]:
    rows = []
    for slot, (pk, by) in sorted(counters.items()):
        per_role = len(schema.VERDICTS) * schema.REASON_SLOTS
        role, rest = divmod(slot, per_role)
        verdict, reason = divmod(rest, schema.REASON_SLOTS)
        rows.append({"role": schema.ROLES[role], "verdict": schema.VERDICTS[verdict],
                     "reason": schema.REASONS[reason], "packets": pk, "bytes": by})
    return rows


@main.command(epilog="""\b
Examples:
  xdpzoot status
  xdpzoot status --json | jq .interfaces""")
@json_opt
@click.pass_obj
def status(o: Ctx, as_json) -> None:
    """Show interfaces, switches, table sizes and totals."""

    def go():
        maps = o.maps()
        att = loader.attachments(o.pin_dir)
        flags = maps.control_flags()
        data = {
            "pin_dir": o.pin_dir,
            "interfaces": [asdict(a) for a in att],
            "switches": tables.control_names(flags),
            "tables": {"hosts": len(list(maps.host_items())),
                       "prefixes": len(list(maps.prefix_items())),
                       "allow": len(maps.allow_items())},
            "counters": _totals(maps.counters_sum()),
            "fast_path": loader.fast_path(maps),
        }

        def text():
            click.echo(f"Data plane: {o.pin_dir}")
            on = [k for k, v in data["switches"].items() if v]
            click.echo(f"  switches: {', '.join(on) or 'none'}")
            click.echo("\nInterfaces:")
            for a in att:
                click.echo(f"  {a.ifname:<15} {a.role:<7} {a.hook:<4} {a.mode}")
            if not att:
                click.echo("  No programs attached.")
            click.echo("\nTables:")
            for k, v in data["tables"].items():
                click.echo(f"  {k:<10} {v:>10}")
            click.echo("\nTotals:")
            _counter_table(data["counters"])
            fp = data["fast_path"]
            click.echo(f"\nFast path: {'on' if fp['enabled'] else 'off'}"
                       + (f" (XDP hook; egress {', '.join(fp['egress']) or 'none'})"
                          if fp["enabled"] else ""))
            _fast_table(fp["counters"])

        _emit(as_json, data, text)

    _run(go)


def _fast_table(counters: dict[str, dict], rates: dict | None = None) -> None:
    """The fast path's counters: forwarded, and each reason to hand a packet to the kernel."""
    rows = [(r, c) for r, c in counters.items() if c["packets"]]
    if not rows:
        click.echo("  No packets counted.")
        return
    click.echo(f"  {'REASON':<28} {'PACKETS':>12} {'BYTES':>14}"
               + (f" {'PPS':>10}" if rates is not None else ""))
    for reason, c in rows:
        label = reason if reason == "forwarded" else f"to kernel: {reason}"
        line = f"  {label:<28} {c['packets']:>12} {c['bytes']:>14}"
        if rates is not None:
            line += f" {rates.get(reason, 0):>10.0f}"
        click.echo(line)


def _counter_table(rows: list[dict], rates: dict | None = None) -> None:
    if not rows:
        click.echo("  No packets counted.")
        return
    click.echo(f"  {'ROLE':<7} {'VERDICT':<8} {'REASON':<11} {'PACKETS':>12} {'BYTES':>14}"
               + (f" {'PPS':>10}" if rates is not None else ""))
    for r in rows:
        line = (f"  {r['role']:<7} {r['verdict']:<8} {r['reason']:<11} {r['packets']:>12} "
                f"{r['bytes']:>14}")
        if rates is not None:
            line += f" {rates.get((r['role'], r['verdict'], r['reason']), 0):>10.0f}"
        click.echo(line)


@main.command(epilog="""\b
Examples:
  xdpzoot stats            # totals once
  xdpzoot stats 1          # every second, until interrupted
  xdpzoot stats 2 10 --json""")
@click.argument("interval", type=float, required=False)
@click.argument("count", type=int, required=False)
@json_opt
@click.pass_obj
def stats(o: Ctx, interval, count, as_json) -> None:
    """Packets and bytes by interface role, verdict and reason."""

    def go():
        maps = o.maps()
        prev = None
        n = 0
        while True:
            rows = _totals(maps.counters_sum())
            fast = {r: {"packets": p, "bytes": b} for r, (p, b) in maps.fast_counters().items()}
            now = time.monotonic()
            rates = fast_rates = None
            if prev is not None:
                dt = now - prev[0]
                old = {(r["role"], r["verdict"], r["reason"]): r["packets"] for r in prev[1]}
                rates = {(r["role"], r["verdict"], r["reason"]):
                         (r["packets"] - old.get((r["role"], r["verdict"], r["reason"]), 0)) / dt
                         for r in rows}
                fast_rates = {r: (c["packets"] - prev[2][r]["packets"]) / dt
                              for r, c in fast.items()}
            if as_json:
                click.echo(json.dumps({"time": time.time(), "counters": rows,
                                       "fast_path": fast}))
            else:
                if prev is not None:
                    click.echo("")
                _counter_table(rows, rates)
                if any(c["packets"] for c in fast.values()):
                    click.echo("Fast path:")
                    _fast_table(fast, fast_rates)
            n += 1
            if interval is None or (count is not None and n >= count):
                return
            prev = (now, rows, fast)
            time.sleep(interval)

    _run(go)


# ---- subscribers --------------------------------------------------------------------------


def _change_text(c: sync.Change) -> str:
    return f"{c.added} added, {c.changed} changed, {c.removed} removed"


@main.group(epilog="""\b
Examples:
  xdpzoot subscribers load /etc/xdpzoot/subscribers.csv
  xdpzoot subscribers show 100.64.1.10 --json""")
def subscribers() -> None:
    """The subscriber IP-type database (dynamic/static, flags, rates)."""


@subscribers.command("load", epilog="""\b
Examples:
  xdpzoot subscribers load subscribers.csv
  xdpzoot subscribers load --strict subscribers.csv --json""")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Overlapping entries are errors.")
@json_opt
@click.pass_obj
def subscribers_load(o: Ctx, file, strict, as_json) -> None:
    """Validate FILE, then write only what differs from the kernel's maps."""

    def go():
        with paused_gc():   # a million rows: see sources.paused_gc
            rows, hosts, prefixes = tables.read_subscribers(file, strict)
            with kernel.lock(o.pin_dir), o.subscriber_maps(create=True) as maps:
                plan = sync.plan_subscribers(maps, hosts, prefixes)
                bar, step = _progress(plan.change.total, "writing subscribers")
                try:
                    change = sync.apply_plan(maps, plan, step)
                finally:
                    if bar:
                        bar.render_finish()
        _emit(as_json, {"rows": rows, **asdict(change)},
              lambda: click.echo(f"{rows} rows: {_change_text(change)}"))

    _run(go)


@subscribers.command("diff", epilog="""\b
Examples:
  xdpzoot subscribers diff subscribers.csv
  xdpzoot subscribers diff subscribers.csv --json | jq '.changes[:10]'""")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Overlapping entries are errors.")
@json_opt
@click.pass_obj
def subscribers_diff(o: Ctx, file, strict, as_json) -> None:
    """What `subscribers load FILE` would change, as counts (--json: each change)."""

    def go():
        rows, hosts, prefixes = tables.read_subscribers(file, strict)
        with o.subscriber_maps() as maps:
            plan = sync.plan_subscribers(maps, hosts, prefixes)
            total = plan.change
            data = {"rows": rows, **asdict(total)}
            if as_json:
                data["changes"] = _changes(maps, plan)
        _emit(as_json, data, lambda: click.echo(f"{rows} rows: {_change_text(total)} "
                                                "(nothing written)"))

    _run(go)


def _changes(maps: kernel.SubscriberMaps, plan: sync.Plan) -> list[dict]:
    """Each change of a plan, before and after, for `subscribers diff --json`."""
    cur_p = dict(maps.read(maps.prefix_map).items())
    old = {a: maps.get_host(a) for a in plan.hosts.write.keys}
    old.update((k, cur_p.get(k)) for k in plan.prefixes.write.keys)
    return [{"entry": _key_text(k), "change": "change" if old[k] else "add",
             "before": _entry_json(old[k]) if old[k] else None, "after": _entry_json(e)}
            for k, e in (*plan.hosts.write.items(), *plan.prefixes.write.items())] + [
        {"entry": _key_text(k), "change": "remove"}
        for k in plan.hosts.remove + plan.prefixes.remove]


def _key_text(key: bytes) -> str:
    """A subscriber map key (16-byte address or packed LPM key) as text."""
    if len(key) == 16:
        return str(tables.ip_of(key))
    return str(tables.net_of(kernel.LPM_KEY.unpack(key)))


def _entry_json(e: kernel.Entry) -> dict:
    t = {v: k for k, v in schema.TYPES.items()}.get(e.type, str(e.type))
    return {"subscriber": e.sub_id, "type": t, "flags": schema.flag_names(e.flags),
            "up_kbps": e.up_kbps, "down_kbps": e.down_kbps}


def _address(value: str) -> bytes:
    try:
        return tables.addr16(ipaddress.ip_address(value))
    except ValueError as e:
        raise click.BadParameter(f"not an IP address: {value}") from e


@subscribers.command("show", epilog="""\b
Examples:
  xdpzoot subscribers show 198.51.100.9
  xdpzoot subscribers show 2001:db8:1::10 --json""")
@click.argument("address")
@json_opt
@click.pass_obj
def subscribers_show(o: Ctx, address, as_json) -> None:
    """Which entry classifies ADDRESS (host entry, else longest prefix)."""
    a = _address(address)

    def go():
        with o.subscriber_maps() as maps:
            host = maps.get_host(a)
            match = None if host else maps.match_prefix(a)
        if host:
            data = {"address": address, "match": "host", **_entry_json(host)}
        elif match:
            data = {"address": address, "match": str(tables.net_of(match[0])),
                    **_entry_json(match[1])}
        else:
            data = {"address": address, "match": None}
        _emit(as_json, data, lambda: click.echo(
            f"{address}: not a subscriber address" if data["match"] is None else
            f"{address}: subscriber {data['subscriber']} {data['type']} "
            f"(entry {data['match']}) flags={','.join(data['flags']) or '-'} "
            f"up={data['up_kbps'] or 'unlimited'} down={data['down_kbps'] or 'unlimited'}"))

    _run(go)


def _suspend(o: Ctx, target: str, on: bool, as_json: bool) -> None:
    try:
        key: int | bytes = int(target)
    except ValueError:
        key = _address(target)

    def go():
        with kernel.lock(o.pin_dir), o.subscriber_maps() as maps:
            done = sync.set_suspended(maps, key, on)
        if not done:
            _fail(f"no subscriber {target}")
        word = "suspended" if on else "resumed"
        _audit(o, key if isinstance(key, int) else target, "suspend" if on else "unsuspend",
               entries=len(done))
        _emit(as_json, {word: done}, lambda: click.echo(f"{word}: {', '.join(done)}"))

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot suspend 1042          # subscriber id: all its addresses
  xdpzoot suspend 100.64.1.77   # an address (alone if in a dynamic pool)""")
@click.argument("subscriber")
@json_opt
@click.pass_obj
def suspend(o: Ctx, subscriber, as_json) -> None:
    """Cut SUBSCRIBER (id or address) off, except the support allow-list.

    Suspensions are sticky: reloading the subscriber file keeps them."""
    _suspend(o, subscriber, True, as_json)


@main.command(epilog="""\b
Examples:
  xdpzoot resume 1042
  xdpzoot resume 100.64.1.77""")
@click.argument("subscriber")
@json_opt
@click.pass_obj
def resume(o: Ctx, subscriber, as_json) -> None:
    """Lift the suspension of SUBSCRIBER (id or address)."""
    _suspend(o, subscriber, False, as_json)


# ---- bandwidth -------------------------------------------------------------------------------


def _slots(maps: kernel.Maps, target: str) -> tuple[int, int]:
    """(subscriber id, state slot) of SUBSCRIBER given as id or address."""
    try:
        sid = int(target)
    except ValueError:
        a = _address(target)
        e = maps.get_host(a) or (maps.match_prefix(a) or (None, None))[1]
        if e is None:
            raise kernel.KernelError(f"no subscriber {target}") from None
        sid = e.sub_id
    for _, e in (*maps.host_items(), *maps.prefix_items()):
        if e.sub_id == sid and e.slot and not e.pool_bits:
            return sid, e.slot
    raise kernel.KernelError(f"no subscriber {target} with a state slot "
                             "(addresses of a pool have per-address state only)")


@main.command(epilog="""\b
Examples:
  xdpzoot throttle 1042 --rate 1000
  xdpzoot throttle 198.51.100.9 --rate 512 --for 12h --json""")
@click.argument("subscriber")
@click.option("--rate", type=click.IntRange(1), required=True, metavar="KBPS",
              help="Rate in kbit/s, both directions.")
@click.option("--for", "duration", metavar="DURATION", help="e.g. 30m, 12h, 7d.")
@json_opt
@click.pass_obj
def throttle(o: Ctx, subscriber, rate, duration, as_json) -> None:
    """Hold SUBSCRIBER (id or address) to RATE, now, until `unthrottle` or --for ends."""
    from .accounting import parse_seconds

    try:
        until = int(time.time()) + parse_seconds(duration) if duration else 0
    except ValueError as e:
        raise click.BadParameter(f"not a duration (like 30m, 12h, 7d): {duration}") from e

    def go():
        with kernel.lock(o.pin_dir):
            maps = o.maps()
            sid, slot = _slots(maps, subscriber)
            maps.set_manual(slot, rate, until)
            up, down = maps.get_throttle(slot)
            maps.set_throttle(slot, min(x for x in (up, rate) if x), min(x for x in (down, rate)
                                                                       if x))
        data = {"subscriber": sid, "rate_kbps": rate, "until": until or None}
        _audit(o, sid, "throttle", rate, until=until or None)
        _emit(as_json, data, lambda: click.echo(
            f"subscriber {sid} throttled to {rate} kbit/s"
            + (f" until {time.strftime('%Y-%m-%d %H:%M', time.localtime(until))}" if until
               else "")))

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot unthrottle 1042""")
@click.argument("subscriber")
@json_opt
@click.pass_obj
def unthrottle(o: Ctx, subscriber, as_json) -> None:
    """Lift the throttle set by hand on SUBSCRIBER; a volume rule's throttle in force
    comes back at the daemon's next tick."""

    def go():
        with kernel.lock(o.pin_dir):
            maps = o.maps()
            sid, slot = _slots(maps, subscriber)
            maps.del_manual(slot)
            maps.set_throttle(slot, 0, 0)
        _audit(o, sid, "release")
        _emit(as_json, {"subscriber": sid, "unthrottled": True},
              lambda: click.echo(f"subscriber {sid}: throttle lifted"))

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot congestion           # show
  xdpzoot congestion on
  xdpzoot congestion auto      # `xdpzoot run` decides from utilisation""")
@click.argument("mode", type=click.Choice(["on", "off", "auto"]), required=False)
@json_opt
@click.pass_obj
def congestion(o: Ctx, mode, as_json) -> None:
    """Congestion mode: bulk flows of a subscriber share a part of its rate."""
    bit = schema.C["XZ_C_CONGESTION"]

    def go():
        with kernel.lock(o.pin_dir):
            maps = o.maps()
            if mode:
                maps.set_control_params(congestion=tables.CONGESTION[mode])
                if mode != "auto":
                    flags = maps.control_flags()
                    maps.set_control_flags(flags | bit if mode == "on" else flags & ~bit)
            code = maps.control_params()["congestion"]
            active = bool(maps.control_flags() & bit)
        name = {v: k for k, v in tables.CONGESTION.items()}[code]
        _emit(as_json, {"mode": name, "active": active},
              lambda: click.echo(f"congestion mode {name}: {'on' if active else 'off'} now"))

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot top
  xdpzoot top --by op25b -n 20
  xdpzoot top --by up --json""")
@click.option("--by", "key", type=click.Choice(["down", "up", "op25b"]), default="down",
              show_default=True)
@click.option("-n", "count", type=click.IntRange(1), default=10, show_default=True)
@json_opt
@click.pass_obj
def top(o: Ctx, key, count, as_json) -> None:
    """Subscribers by volume since the counters started, or by blocked SMTP attempts."""

    def go():
        maps = o.maps()
        owner = maps.owners()
        rows = [{"subscriber": owner[s], **asdict(v)} for s, v in maps.volumes(owner).items()]
        rows += [{"subscriber": str(tables.ip_of(a)), **asdict(v)}
                 for a, v in maps.pool_volumes().items()]
        field = {"down": "down_bytes", "up": "up_bytes", "op25b": "op25b"}[key]
        rows = sorted((r for r in rows if r[field]), key=lambda r: -r[field])[:count]

        def text():
            if not rows:
                click.echo("No entries found.")
                return
            click.echo(f"{'SUBSCRIBER':<26} {'DOWN BYTES':>14} {'UP BYTES':>14} {'OP25B':>8}")
            for r in rows:
                click.echo(f"{str(r['subscriber']):<26} {r['down_bytes']:>14} "
                           f"{r['up_bytes']:>14} {r['op25b']:>8}")

        _emit(as_json, rows, text)

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot run                  # under systemd: systemd/xdpzoot.service
  xdpzoot --config /etc/xdpzoot/xdpzoot.toml run""")
@click.pass_obj
def run(o: Ctx) -> None:
    """The controller: accounting, volume rules, congestion mode, source sync.

    SIGTERM stops it (the data plane keeps enforcing); SIGHUP reloads."""
    from .daemon import Daemon

    def go():
        d = Daemon(o.config_path, o.pin_dir)
        d.start()
        d.run()

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot usage 1042
  xdpzoot usage 1042 --json""")
@click.argument("subscriber", type=int)
@json_opt
@click.pass_obj
def usage(o: Ctx, subscriber, as_json) -> None:
    """SUBSCRIBER's volume per volume rule and window, from the daemon's state."""
    from . import accounting

    def go():
        b = o.cfg.bandwidth
        rules = accounting.load_rules(b.rules) if b.rules else []
        data = accounting.load_snapshot(b.state)
        acct = accounting.Accounting.restore(data, rules) if data else \
            accounting.Accounting(rules)
        rows = acct.usage(subscriber, time.time())

        def text():
            if not rows:
                click.echo("No entries found.")
            for r in rows:
                click.echo("  ".join(f"{k}={v}" for k, v in r.items()))

        _emit(as_json, {"subscriber": subscriber, "rules": rows}, text)

    try:
        go()
    except (OSError, SourceError, kernel.KernelError, accounting.SnapshotError) as e:
        _fail(str(e))


# ---- CSAM list ---------------------------------------------------------------------------


@main.group(epilog="""\b
Examples:
  xdpzoot blocklist load /etc/xdpzoot/csam.txt
  xdpzoot blocklist check 192.0.2.66
  xdpzoot blocklist status --json""")
def blocklist() -> None:
    """The CSAM address list: loaded whole, switched atomically, never printed."""


def _progress(total: int, label: str):
    """A progress bar on stderr for loads that take more than a moment."""
    if total < 20000 or not sys.stderr.isatty():
        return None, None
    bar = click.progressbar(length=total, label=label, file=sys.stderr)
    return bar, bar.update


def load_csam(o: Ctx, path: str, strict: bool = False) -> dict:
    """Validate the list file, then swap it in (under the instance's lock; not attached
    yet: the maps are created, and attach finds them)."""
    data, warnings = csam.read_list(path, strict=strict)
    for w in warnings:
        click.echo(f"xdpzoot: warning: {w}", err=True)
    with kernel.lock(o.pin_dir):
        if not kernel.pinned(o.pin_dir):
            o.maps(create=True)
        return _load_csam_locked(o.pin_dir, path, data)


def _load_csam_locked(pin_dir: str, path: str, data: bytes) -> dict:
    bars = []

    def progress(total: int):
        bar, step = _progress(total, "writing CSAM list")
        bars.extend([bar] if bar else [])
        return step

    with csam.Maps(pin_dir) as maps:
        try:
            res = csam.load(maps, data, path, progress=progress)
        finally:
            for bar in bars:
                bar.render_finish()
        meta = maps.read_meta(res.generation)
    return {**asdict(res), **{k: meta[k] for k in csam.COUNTS}, "sha256": meta["sha256"]}


@blocklist.command("load", epilog="""\b
Examples:
  xdpzoot blocklist load /etc/xdpzoot/csam.txt
  xdpzoot blocklist load --strict csam.txt --json""")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Refuse a world-readable file.")
@json_opt
@click.pass_obj
def blocklist_load(o: Ctx, file, strict, as_json) -> None:
    """Validate FILE and make it the list in force, all at once.

    One address or prefix per line; '#' comments. A file with any error
    changes nothing. Loading the list in force again writes nothing."""

    def go():
        r = load_csam(o, file, strict)
        _emit(as_json, r, lambda: click.echo(
            f"CSAM list: {r['hosts4'] + r['hosts6']} addresses, "
            f"{r['prefixes4'] + r['prefixes6']} prefixes; "
            + (f"generation {r['generation']} in force ({r['added']} added, "
               f"{r['removed']} removed)" if r["switched"] else "unchanged")))

    _run(go)


@blocklist.command("check", epilog="""\b
Examples:
  xdpzoot blocklist check 192.0.2.66
  xdpzoot blocklist check 2001:db8::66 --json""")
@click.argument("address")
@json_opt
@click.pass_obj
def blocklist_check(o: Ctx, address, as_json) -> None:
    """Whether ADDRESS is on the list in force, and by which kind of entry."""
    a = _address(address)

    def go():
        with csam.Maps(o.pin_dir) as maps:
            kind = csam.check(maps, a)
        _emit(as_json, {"address": address, "listed": kind is not None, "entry": kind},
              lambda: click.echo(f"{address}: " + (f"listed ({kind} entry)" if kind
                                                   else "not listed")))

    _run(go)


@blocklist.command("status", epilog="""\b
Examples:
  xdpzoot blocklist status
  xdpzoot blocklist status --json""")
@json_opt
@click.pass_obj
def blocklist_status(o: Ctx, as_json) -> None:
    """The list in force: entries per family and kind, digest, load time, hits."""

    def go():
        with csam.Maps(o.pin_dir) as maps:
            st = csam.status(maps)

        def text():
            click.echo(f"CSAM list, generation {st['generation']}:")
            if not st["loaded"]:
                click.echo("  No list loaded.")
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(st["loaded"]))
                click.echo(f"  loaded     {when}")
                click.echo(f"  sha256     {st['sha256']}")
            click.echo(f"  {'':<10} {'IPv4':>10} {'IPv6':>10}")
            click.echo(f"  {'addresses':<10} {st['hosts4']:>10} {st['hosts6']:>10}")
            click.echo(f"  {'prefixes':<10} {st['prefixes4']:>10} {st['prefixes6']:>10}")
            h = st["hits"]
            click.echo(f"  {'hits':<10} {h['gen0_ipv4'] + h['gen1_ipv4']:>10} "
                       f"{h['gen0_ipv6'] + h['gen1_ipv6']:>10}")

        _emit(as_json, st, text)

    _run(go)


# ---- explain ------------------------------------------------------------------------------


class _LiveLookup:
    """The reference model's lookups, answered by the live maps."""

    def __init__(self, maps: kernel.Maps, pin_dir: str):
        self.maps = maps
        self.pin_dir = pin_dir

    def classify(self, a: bytes):
        host = self.maps.get_host(a)
        if host:
            return host
        m = self.maps.match_prefix(a)
        return m[1] if m else None

    def allowed(self, a: bytes) -> int:
        return self.maps.allow_bits(a)

    def csam(self, a: bytes) -> bool:
        with csam.Maps(self.pin_dir) as cm:
            return csam.check(cm, a) is not None


@main.command(epilog="""\b
Examples:
  xdpzoot explain --in access --src 100.64.1.10 --dst 203.0.113.10 \\
      --proto tcp --dport 25
  xdpzoot explain --in core --src 203.0.113.10 --dst 100.64.1.10 \\
      --proto udp --sport 4444 --dport 53 --json""")
@click.option("--in", "role", type=click.Choice(["access", "core"]), required=True,
              help="Interface role the packet enters on.")
@click.option("--src", required=True)
@click.option("--dst", required=True)
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp"]), required=True)
@click.option("--sport", type=click.IntRange(0, 65535), default=40000, show_default=True)
@click.option("--dport", type=click.IntRange(0, 65535), default=0)
@json_opt
@click.pass_obj
def explain(o: Ctx, role, src, dst, proto, sport, dport, as_json) -> None:
    """What the data plane would do with a packet, and why (reference model, live maps)."""
    a, b = _address(src), _address(dst)
    if (a[:12] == tables.addr16("0.0.0.0")[:12]) != (b[:12] == tables.addr16("0.0.0.0")[:12]):
        raise click.BadParameter("--src and --dst must be of the same address family")
    p_proto = model.PROTOS[proto]
    if proto == "icmp" and ":" in src:
        p_proto = model.ICMPV6

    def go():
        maps = o.maps()
        pkt = model.Packet(role, src, dst, p_proto, sport, dport)
        d = model.decide(pkt, maps.control_flags(), _LiveLookup(maps, o.pin_dir))
        data = {"verdict": d.verdict, "reason": d.reason,
                "subscriber": _entry_json(d.subscriber) if d.subscriber else None}
        _emit(as_json, data, lambda: click.echo(
            f"{d.verdict} ({d.reason})" + (
                f"; subscriber {d.subscriber.sub_id} "
                f"{data['subscriber']['type']}" if d.subscriber else "")))

    _run(go)


# ---- lab ----------------------------------------------------------------------------------


@main.group(epilog="""\b
Examples:
  xdpzoot lab up
  ip netns exec xz1a2b-rtr xdpzoot \\
      --pin-dir /run/xdpzoot-lab/xz1a2b/bpf/router attach \\
      --access acc-dyn --access acc-sta --core core0
  xdpzoot lab down xz1a2b""")
def lab() -> None:
    """A lab of network namespaces to try xdpzoot by hand."""


@lab.command("up")
@click.option("--prefix", default=None, help="Name prefix of the namespaces.")
@click.option("--no-servers", is_flag=True, help="Do not start SMTP/DNS servers.")
@json_opt
def lab_up_cmd(prefix, no_servers, as_json) -> None:
    """Build the lab: a dynamic and a static subscriber, a router, an Internet host."""
    from . import lab as labmod

    def go():
        lb = labmod.lab_up(prefix, servers=not no_servers)
        data = asdict(lb)

        def text():
            click.echo(f"lab {lb.prefix} is up: namespaces {', '.join(lb.namespaces)}")
            for k, v in sorted(lb.addr.items()):
                click.echo(f"  {k:<12} {v}")
            click.echo(f"try:\n  ip netns exec {lb.router} xdpzoot --config "
                       f"{lb.rundir}/xdpzoot.toml --pin-dir {lb.bpffs}/router attach")
            click.echo(f"  ip netns exec {lb.dyn} ping -c1 {lb.addr['inet4']}")
            click.echo(f"remove it with: xdpzoot lab down {lb.prefix}")

        _emit(as_json, data, text)

    _run(go)


@lab.command("down")
@click.argument("prefix")
@json_opt
def lab_down_cmd(prefix, as_json) -> None:
    """Remove the lab PREFIX: its servers and namespaces."""
    from . import lab as labmod

    def go():
        existed = labmod.lab_exists(prefix)
        labmod.lab_down(prefix)
        _emit(as_json, {"removed": existed}, lambda: click.echo(
            f"lab {prefix} removed" if existed else f"no lab {prefix}"))

    _run(go)


if __name__ == "__main__":
    main()
