"""The CSAM list: load, check one address, status. Never an entry in any output."""

from __future__ import annotations

import time

import click

from xdpzoot.sources import csam

from . import Ctx, _address, _emit, _run, _writing, json_opt, main

# ---- CSAM list ---------------------------------------------------------------------------


@main.group(epilog="""\b
Examples:
  xdpzoot blocklist load /etc/xdpzoot/csam.txt
  xdpzoot blocklist check 192.0.2.66
  xdpzoot blocklist status --json""")
def blocklist() -> None:
    """The CSAM address list: loaded whole, switched atomically, never printed."""


def load_csam(o: Ctx, path: str, strict: bool = False, force: bool = False) -> dict:
    """Validate the list file, then swap it in (under the instance's lock; not attached
    yet: the maps are created, and attach finds them)."""
    data, warnings = csam.read_list(path, strict, o.cfg.limits.source_bytes)
    for w in warnings:
        click.echo(f"xdpzoot: warning: {w}", err=True)
    with _writing(o, "writing CSAM list") as (inst, progress):
        return inst.load_csam(data, path, progress=progress,
                              max_shrink=None if force else o.cfg.csam.max_shrink)


@blocklist.command("load", epilog="""\b
Examples:
  xdpzoot blocklist load /etc/xdpzoot/csam.txt
  xdpzoot blocklist load --strict csam.txt --json
  xdpzoot blocklist load --force csam-small.txt   # shrinks the list""")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Refuse a world-readable file.")
@click.option("--force", is_flag=True,
              help="Load an empty list, or one shorter than csam.max_shrink allows.")
@json_opt
@click.pass_obj
def blocklist_load(o: Ctx, file, strict, force, as_json) -> None:
    """Validate FILE and make it the list in force, all at once.

    One address or prefix per line; '#' comments. A file with any error
    changes nothing. Loading the list in force again writes nothing. An
    empty list, or one with fewer than (1 - csam.max_shrink) of the
    entries in force, is refused unless --force."""

    def go():
        r = load_csam(o, file, strict, force)
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
        kind = o.instance().csam_check(a)
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
    """The list in force: entries per family and kind, digest, load time, hits, and its
    filters: how many bits (2^20 hashed; 2^24 exact, an IPv4 list that touches more than
    2^20 /24s) and the share of them set (the unlisted addresses still looked up)."""

    def go():
        st = o.instance().csam_status()

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
            fill = [st["filter_fill"][f] for f in ("ipv4", "ipv6")]
            click.echo(f"  {'filter':<10} " + " ".join(
                f"{'off' if x is None else f'{x:.1%} set':>10}" for x in fill))
            kinds = ["-" if n is None else f"2^{n.bit_length() - 1} "
                     + ("exact" if n > 1 << 20 else "hash")
                     for n in (st["filter_bits"][f] for f in ("ipv4", "ipv6"))]
            click.echo(f"  {'of bits':<10} " + " ".join(f"{k:>10}" for k in kinds))

        _emit(as_json, st, text)

    _run(go)
