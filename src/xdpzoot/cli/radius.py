"""The RADIUS listener on its own (``radius``), and the sessions it holds (``sessions``)."""

from __future__ import annotations

import ipaddress
import os
import time

import click

from xdpzoot.sources.sessions import SessionTable

from . import Ctx, _emit, _fail, _run, json_opt, main


@main.command(epilog="""\b
Examples:
  xdpzoot radius               # [radius] listen / coa_listen of the config
  xdpzoot --config /etc/xdpzoot/xdpzoot.toml --pin-dir /run/xdpzoot/r1 radius""")
@click.pass_obj
def radius(o: Ctx) -> None:
    """The RADIUS accounting and CoA listener alone, for a router without `xdpzoot run`
    (which serves it itself when [radius] listen or coa_listen is set).

    Sessions become entries of their contracts in the maps. SIGTERM or SIGINT stops it
    after writing the session snapshot ([radius] state). SIGHUP rereads the config: a
    changed [radius] section or secret file is taken while serving, sessions kept; one
    that fails (a bad secret file, an address in use) is logged and the old one stays."""
    from xdpzoot.config import load_config
    from xdpzoot.radius_service import RadiusService

    def go():
        from xdpzoot.daemon import log_to_stderr

        log_to_stderr()
        r = o.cfg.radius
        if not r.listen and not r.coa_listen:
            _fail("[radius] listen and coa_listen are both off: nothing to serve")
        RadiusService(o.cfg, o.pin_dir).run(lambda: load_config(o.config_path))

    _run(go)


def _table(o: Ctx) -> tuple[SessionTable, float | None]:
    """The session snapshot of [radius] state, and its age in seconds (None: no file)."""
    path = o.cfg.radius.state
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return SessionTable(o.cfg.radius.session_timeout), None
    try:
        return SessionTable.restore(path, o.cfg.radius.session_timeout), age
    except ValueError as e:
        _fail(f"{path}: {e}")
        raise   # not reached


def _age(age: float | None) -> str:
    return "no snapshot yet" if age is None else f"snapshot {age:.0f} s old"


@main.group(invoke_without_command=True, epilog="""\b
Examples:
  xdpzoot sessions
  xdpzoot sessions --json
  xdpzoot sessions show abc12345@zoot.example
  xdpzoot sessions show 100.64.0.5 --json""")
@json_opt
@click.pass_context
def sessions(ctx: click.Context, as_json) -> None:
    """RADIUS sessions, counted by NAS and by kind of address, from the snapshot the
    listener writes ([radius] state, within a second or two of a change)."""
    if ctx.invoked_subcommand is not None:
        return
    o: Ctx = ctx.obj

    def go():
        table, age = _table(o)
        counts = table.counts()
        data = {"sessions": len(table), "age_s": None if age is None else round(age, 1),
                **counts}

        def text():
            click.echo(f"{len(table)} sessions ({_age(age)})")
            if not len(table):
                return
            click.echo(f"\n  {'NAS':<40} {'SESSIONS':>9}")
            for nas, n in sorted(counts["by_nas"].items()):
                click.echo(f"  {nas:<40} {n:>9}")
            click.echo(f"\n  {'ADDRESSES':<40} {'HELD':>9}")
            for kind, n in sorted(counts["addresses"].items()):
                click.echo(f"  {kind:<40} {n:>9}")

        _emit(as_json, data, text)

    _run(go)


@sessions.command("show", epilog="""\b
Examples:
  xdpzoot sessions show abc12345@zoot.example
  xdpzoot sessions show 2001:db8:200::1 --json""")
@click.argument("who", metavar="USER|ADDRESS")
@json_opt
@click.pass_obj
def sessions_show(o: Ctx, who, as_json) -> None:
    """The sessions of USER, or the session holding ADDRESS."""

    def go():
        table, age = _table(o)
        try:
            ip = ipaddress.ip_address(who)
        except ValueError:
            ip = None
        rows = []
        for key, s in table.sessions.items():
            held = [n for n in s.networks if table.owner.get(n) == key]
            if (s.user == who) if ip is None else any(ip in n for n in held):
                rows.append({"nas": s.nas, "session": s.session_id, "user": s.user,
                             "addresses": [str(n) for n in held],
                             "started": s.started, "seen": s.seen})
        data = {"query": who, "age_s": None if age is None else round(age, 1),
                "sessions": rows}

        def text():
            if not rows:
                click.echo(f"No entries found ({_age(age)}).")
                return
            for r in rows:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
                click.echo(f"{r['user']}  {r['nas']}  session {r['session']}  since {since}")
                click.echo(f"  {', '.join(r['addresses']) or '(no address yet)'}")
            click.echo(f"({_age(age)})")

        _emit(as_json, data, text)

    _run(go)
