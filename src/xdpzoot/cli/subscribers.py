"""The subscriber database into the maps, and suspending a subscriber by hand."""

from __future__ import annotations

from dataclasses import asdict

import click

from xdpzoot import sync, tables
from xdpzoot.dataplane import layout
from xdpzoot.dataplane.instance import Instance
from xdpzoot.sources.files import paused_gc

from . import (
    Ctx,
    _address,
    _audit,
    _change_text,
    _emit,
    _entry_json,
    _fail,
    _run,
    _target,
    _writing,
    json_opt,
    main,
)

# ---- subscribers --------------------------------------------------------------------------


@main.group(epilog="""\b
Examples:
  xdpzoot subscribers load /etc/xdpzoot/subscribers.csv
  xdpzoot subscribers show 100.64.1.10 --json""")
def subscribers() -> None:
    """The subscriber IP-type database (dynamic/static, flags, rates)."""


@subscribers.command("load", epilog="""\b
Examples:
  xdpzoot subscribers load subscribers.csv
  xdpzoot subscribers load --strict subscribers.csv --json
  xdpzoot subscribers load --force few.csv   # removes most subscribers""")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Overlapping entries are errors.")
@click.option("--force", is_flag=True,
              help="Load an empty file, or one shorter than max_shrink allows.")
@json_opt
@click.pass_obj
def subscribers_load(o: Ctx, file, strict, force, as_json) -> None:
    """Validate FILE, then write only what differs from the kernel's maps.

    A file with no entries, or with fewer than (1 - sources.max_shrink) of
    the entries (hosts and prefixes) in the maps, is refused unless --force."""

    def go():
        with paused_gc():   # a million rows: see sources.paused_gc
            rows, hosts, prefixes, contracts = tables.read_subscribers(
                file, strict, o.cfg.limits.source_bytes)
            with _writing(o, "writing subscribers") as (inst, progress):
                change = inst.load_subscribers(
                    hosts, prefixes, progress,
                    None if force else o.cfg.sources.max_shrink, file, contracts)
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
        rows, hosts, prefixes, contracts = tables.read_subscribers(
            file, strict, o.cfg.limits.source_bytes)
        inst = o.instance()
        plan = inst.plan_subscribers(hosts, prefixes, file, contracts)
        total = plan.change
        data = {"rows": rows, **asdict(total)}
        if as_json:
            data["changes"] = _changes(inst, plan)
        _emit(as_json, data, lambda: click.echo(f"{rows} rows: {_change_text(total)} "
                                                "(nothing written)"))

    _run(go)


def _changes(inst: Instance, plan: sync.Plan) -> list[dict]:
    """Each change of a plan, before and after, for `subscribers diff --json`."""
    return [{"entry": _key_text(k), "change": "change" if old else "add",
             "before": _entry_json(old) if old else None, "after": _entry_json(new)}
            if new else {"entry": _key_text(k), "change": "remove"}
            for k, old, new in inst.subscriber_changes(plan)]


def _key_text(key: bytes) -> str:
    """A subscriber map key (16-byte address or packed LPM key) as text."""
    if len(key) == 16:
        return str(tables.ip_of(key))
    return str(tables.net_of(layout.LPM_KEY.unpack(key)))


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
        match = o.instance().classify(a)
        if match:
            data = {"address": address, "match": match[0], **_entry_json(match[1])}
        else:
            data = {"address": address, "match": None}
        _emit(as_json, data, lambda: click.echo(
            f"{address}: not a subscriber address" if data["match"] is None else
            f"{address}: subscriber {data['subscriber']} {data['type']} "
            f"(entry {data['match']}) flags={','.join(data['flags']) or '-'} "
            f"up={data['up_kbps'] or 'unlimited'} down={data['down_kbps'] or 'unlimited'}"))

    _run(go)


def _suspend(o: Ctx, target: str, on: bool, as_json: bool) -> None:
    key = _target(target)

    def go():
        done = o.instance().suspend(key, on)
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
  xdpzoot suspend 100.64.1.77   # an address (alone if in a dynamic pool)
  xdpzoot suspend 2001:db8:4:1::a   # in an IPv6 dynamic pool: its /64""")
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
