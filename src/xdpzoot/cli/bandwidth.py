"""Rates by hand (throttle), congestion mode, volumes (top, usage) and the daemon (run)."""

from __future__ import annotations

import time
from dataclasses import asdict

import click

from xdpzoot import tables
from xdpzoot.dataplane import kernel
from xdpzoot.sources.files import SourceError

from . import Ctx, _audit, _emit, _fail, _run, _target, json_opt, main

# ---- bandwidth -------------------------------------------------------------------------------


def _slots(o: Ctx, target: str) -> tuple[int, int]:
    """(subscriber id, state slot) of SUBSCRIBER given as id or address."""
    key = _target(target)
    return o.instance().subscriber_slot(key, target)


@main.command(epilog="""\b
Examples:
  xdpzoot throttle 1042 --rate 1000
  xdpzoot throttle 198.51.100.9 --rate 512 --for 12h --json""")
@click.argument("subscriber")
@click.option("--rate", type=click.IntRange(1, 0xFFFFFFFF), required=True, metavar="KBPS",
              help="kbit/s, both directions.")
@click.option("--for", "duration", metavar="DURATION", help="e.g. 30m, 12h, 7d.")
@json_opt
@click.pass_obj
def throttle(o: Ctx, subscriber, rate, duration, as_json) -> None:
    """Hold SUBSCRIBER (id or address) to RATE, now, until `unthrottle` or --for ends."""
    from xdpzoot.bandwidth.rules import parse_seconds

    try:
        until = int(time.time()) + parse_seconds(duration) if duration is not None else 0
    except ValueError as e:
        raise click.BadParameter(f"not a duration (like 30m, 12h, 7d): {duration}") from e

    def go():
        with o.instance(config=True).locked():   # the slot stays that subscriber's meanwhile
            sid, slot = _slots(o, subscriber)
            o.instance().throttle(slot, rate, until)
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
    """Lift the throttle set by hand on SUBSCRIBER; a volume rule's throttle
    in force comes back at the daemon's next tick."""

    def go():
        with o.instance(config=True).locked():
            sid, slot = _slots(o, subscriber)
            o.instance().unthrottle(slot)
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

    def go():
        name, active = o.instance(config=True).congestion(mode)
        _emit(as_json, {"mode": name, "active": active},
              lambda: click.echo(f"congestion mode {name}: {'on' if active else 'off'} now"))

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot top
  xdpzoot top --by op25b -n 20
  xdpzoot top --by scans --json
  xdpzoot top --by up --json""")
@click.option("--by", "key", type=click.Choice(["down", "up", "op25b", "scans"]),
              default="down", show_default=True)
@click.option("-n", "count", type=click.IntRange(1), default=10, show_default=True)
@json_opt
@click.pass_obj
def top(o: Ctx, key, count, as_json) -> None:
    """Subscribers by volume since the counters started, by blocked SMTP attempts, or by
    scans: distinct destinations (address, port) of the conversations they opened in the
    current window of the abuse signals (an estimate, ~7% error)."""

    def go():
        inst = o.instance(config=True)
        owner = inst.owners()
        rows = [{"subscriber": owner[s], **asdict(v)} for s, v in inst.volumes(owner).items()]
        rows += [{"subscriber": tables.pool_unit(a), **asdict(v)}
                 for a, v in inst.pool_volumes().items()]
        field = {"down": "down_bytes", "up": "up_bytes", "op25b": "op25b", "scans": "scans"}[key]
        rows = sorted((r for r in rows if r[field]), key=lambda r: -r[field])[:count]

        def text():
            if key == "scans":
                since = inst.control_params()["scan_epoch"]
                click.echo("scans: distinct destinations in the window since " + (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since
                    else "the sketch started (no daemon has moved the window)"))
            if not rows:
                click.echo("No entries found.")
                return
            click.echo(f"{'SUBSCRIBER':<26} {'DOWN BYTES':>14} {'UP BYTES':>14} {'OP25B':>8}"
                       f" {'SCANS':>8}")
            for r in rows:
                click.echo(f"{str(r['subscriber']):<26} {r['down_bytes']:>14} "
                           f"{r['up_bytes']:>14} {r['op25b']:>8} {r['scans']:>8}")

        _emit(as_json, rows, text)

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot run                  # under systemd: systemd/xdpzoot.service
  xdpzoot --config /etc/xdpzoot/xdpzoot.toml run
  curl -s http://127.0.0.1:9386/metrics | grep xdpzoot_packets_total""")
@click.pass_obj
def run(o: Ctx) -> None:
    """The controller: accounting, volume rules, congestion mode, source sync.

    Serves Prometheus metrics on [metrics] listen (default http://127.0.0.1:9386/metrics;
    "" = off), and RADIUS when [radius] listen or coa_listen is set. SIGTERM stops it
    (the data plane keeps enforcing); SIGHUP rereads the config and the rules, and the
    RADIUS listener takes a changed [radius] section or secret file while serving
    (sessions kept; one that fails is logged and the old one stays)."""
    from xdpzoot.daemon import Daemon, log_to_stderr

    def go():
        log_to_stderr()
        d = Daemon(o.config_path, o.pin_dir)
        d.start()
        d.run()

    _run(go)


@main.command(epilog="""\b
Examples:
  xdpzoot usage 1042
  xdpzoot usage 1042 --json""")
@click.argument("subscriber", type=click.IntRange(1, 0xFFFFFFFF))
@json_opt
@click.pass_obj
def usage(o: Ctx, subscriber, as_json) -> None:
    """SUBSCRIBER's volume per volume rule and window, from the daemon's state, and what
    the maps hold for it now: counters, rates, throttle in force (a rule's, set by hand or
    by CoA), suspension."""
    from xdpzoot.bandwidth import accounting, store
    from xdpzoot.bandwidth import rules as volume_rules

    def go():
        b = o.cfg.bandwidth
        rules = volume_rules.load_rules(b.rules, o.cfg.limits.source_bytes) if b.rules else []
        data = store.load_snapshot(b.state, o.cfg.limits.source_bytes)
        acct = accounting.Accounting.restore(data, rules) if data else \
            accounting.Accounting(rules)
        rows = acct.usage(subscriber, time.time())
        inst = o.instance(config=True)
        live = inst.subscriber_state(subscriber) if inst.loaded() else None

        def text():
            if live:
                click.echo("in the maps: " + "  ".join(f"{k}={v}" for k, v in live.items()))
            if not rows:
                click.echo("No volume rule has counted this subscriber." if live else
                           "No entries found.")
            for r in rows:
                click.echo("  ".join(f"{k}={v}" for k, v in r.items()))

        _emit(as_json, {"subscriber": subscriber, "maps": live, "rules": rows}, text)

    try:
        go()
    except (OSError, SourceError, kernel.KernelError, accounting.SnapshotError) as e:
        _fail(str(e))
