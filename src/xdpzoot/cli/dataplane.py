"""Attach, detach, status and stats: the programs on the interfaces and what they count."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict

import click

from xdpzoot import tables
from xdpzoot.dataplane import loader, schema
from xdpzoot.dataplane.instance import TRACE_MAX_RATE
from xdpzoot.sources import csam

from . import Ctx, _change_text, _emit, _run, json_opt, main

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
        loader.check_kernel()   # before the instance (its pin directory) is made
        cfg = o.cfg
        acc = list(access) or list(cfg.interfaces.access)
        cor = list(core) or list(cfg.interfaces.core)
        if not acc and not cor:
            raise click.UsageError("no interfaces: give --access/--core or [interfaces]")
        subs = lst = None
        if cfg.sources.subscribers:   # validate before any change
            subs = tables.read_subscribers(cfg.sources.subscribers, False,
                                           cfg.limits.source_bytes)
        if cfg.sources.csam:
            text, warnings = csam.read_list(cfg.sources.csam, False, cfg.limits.source_bytes)
            lst = csam.parse_csam_bytes(text, cfg.sources.csam)
            for w in warnings:
                click.echo(f"xdpzoot: warning: {w}", err=True)
        inst = o.instance()
        with inst.locked():
            done = inst.attach(cfg, acc, cor, hook or cfg.interfaces.hook,
                               mode or cfg.interfaces.mode)
            fast = inst.fast_path()
            vmacs_out = loader.vmacs_left_out(fast, cfg.interfaces.vmacs)
            change = (inst.load_subscribers(subs.hosts, subs.prefixes,
                                            max_shrink=cfg.sources.max_shrink,
                                            path=cfg.sources.subscribers,
                                            contracts=subs.contracts)
                      if subs is not None else None)
            if lst is not None:
                inst.load_csam(text, cfg.sources.csam, lst, max_shrink=cfg.csam.max_shrink)
        if fast["enabled"]:
            for name in sorted(set(acc + cor) - set(fast["egress"])):
                click.echo(f"xdpzoot: warning: fast path: {name}: left out (an ifindex not "
                           f"below limits.ifindexes, {cfg.limits.ifindexes}, or no Ethernet "
                           "address), its traffic goes through the kernel", err=True)
            for name in vmacs_out:
                click.echo(f"xdpzoot: warning: fast path: {name} (interfaces.vmacs): its MAC "
                           "address not taken (absent, down, not a macvlan on an access or "
                           "core interface, a fourth on one, or an ifindex above 65535), "
                           "frames to it go through the kernel", err=True)
        data = {"pin_dir": o.pin_dir, "attached": [asdict(a) for a in done],
                "subscribers": asdict(change) if change else None,
                "csam": lst.counts() if lst else None,
                "fast_path": {k: fast[k] for k in ("enabled", "egress", "virtual_macs",
                                                   "rp_filter")}}
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
        gone = o.instance().detach()
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
        inst = o.instance(config=True)
        flags = inst.control_flags()
        att = inst.attachments()
        data = {
            "pin_dir": o.pin_dir,
            "interfaces": [asdict(a) for a in att],
            "switches": tables.control_names(flags),
            "tables": inst.table_sizes(),
            "contracts": inst.contract_sizes(),
            "counters": _totals(inst.counters_sum()),
            "fast_path": inst.fast_path(),
            "kernel": inst.kernel(),
        }

        def text():
            click.echo(f"Data plane: {o.pin_dir}")
            on = [k for k, v in data["switches"].items() if v]
            click.echo(f"  switches: {', '.join(on) or 'none'}")
            k = data["kernel"]
            click.echo(f"  kernel: {k['release']} (minimum {k['minimum']})")
            for note in k["notes"]:
                click.echo(f"  note: {note}")
            click.echo("\nInterfaces:")
            for a in att:
                click.echo(f"  {a.ifname:<15} {a.role:<7} {a.hook:<4} {a.mode}")
            if not att:
                click.echo("  No programs attached.")
            click.echo("\nTables:")
            for k, v in data["tables"].items():
                click.echo(f"  {k:<10} {v:>10}")
            c = data["contracts"]
            if c["contracts"] or c["session_entries"]:
                click.echo(f"\nRADIUS contracts: {c['contracts']} ({c['suspended']} suspended),"
                           f" {c['session_entries']} session entries")
            click.echo("\nTotals:")
            _counter_table(data["counters"])
            fp = data["fast_path"]
            at_tc = {a.hook for a in att} == {"tc"}   # from TC: any interface
            click.echo(f"\nFast path: {'on' if fp['enabled'] else 'off'}" + (
                "" if not fp["enabled"] else " (TC hook; egress any interface)" if at_tc else
                f" (XDP hook; egress {', '.join(fp['egress']) or 'none'})"))
            for name, macs in fp["virtual_macs"].items():
                click.echo(f"  VRRP virtual MACs on {name}: {', '.join(macs)}")
            if fp["rp_filter"]:
                click.echo("  rp_filter: " + ", ".join(f"{n} {m}" for n, m in
                                                        fp["rp_filter"].items()))
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
    if interval is not None and not 0 < interval <= 86400:   # NaN too
        raise click.BadParameter("a number of seconds, more than 0, at most 86400",
                                 param_hint="INTERVAL")

    def go():
        inst = o.instance(config=True)
        inst.control_flags()   # not loaded: says so before anything is printed
        prev = None
        n = 0
        while True:
            rows = _totals(inst.counters_sum())
            fast = {r: {"packets": p, "bytes": b} for r, (p, b) in inst.fast_counters().items()}
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


# ---- trace: sampled drop events -----------------------------------------------------------

PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


def _trace_reasons(ctx, param, value: tuple[str, ...]) -> tuple[str, ...]:
    if "csam" in value:
        raise click.BadParameter("CSAM drops are never traced (no record of who tried to "
                                 "reach the list)")
    bad = [r for r in value if r not in schema.TRACE_REASONS]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: not a drop reason (one of "
                                 f"{', '.join(schema.TRACE_REASONS)})")
    return value or schema.TRACE_REASONS


def _event_json(e, addresses: bool) -> dict:
    """An event as `trace --json` prints it: wall time, names, the addresses if asked."""
    out = {"time": round(time.time() - (time.monotonic_ns() - e.ts) / 1e9, 6),
           "role": e.role, "hook": e.hook, "verdict": e.verdict, "reason": e.reason,
           "subscriber": e.sub_id or None, "family": e.family,
           "proto": PROTOS.get(e.proto, str(e.proto)), "sport": e.sport, "dport": e.dport}
    if addresses:
        out |= {"src": str(tables.ip_of(e.src)), "dst": str(tables.ip_of(e.dst))}
    return out


EVENT_HEAD = (f"{'TIME':<12} {'ROLE':<6} {'HOOK':<4} {'VERDICT':<7} {'REASON':<10} "
              f"{'SUBSCRIBER':>10} {'PROTO':<6} {'SPORT':>5} {'DPORT':>5}")


def _event_line(d: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(d["time"])) + f"{d['time'] % 1:.3f}"[1:]
    line = (f"{stamp:<12} {d['role']:<6} {d['hook']:<4} {d['verdict']:<7} {d['reason']:<10} "
            f"{d['subscriber'] or '-':>10} {d['proto']:<6} {d['sport']:>5} {d['dport']:>5}")
    return line + (f" {d['src']} > {d['dst']}" if "src" in d else "")


def _stop_on_signals() -> list[int]:
    """Ctrl-C and SIGTERM end a trace between two polls (a poll returns at once on a
    signal), never half way through switching it on or off: the list they append to."""
    import signal

    got: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: got.append(signum))
    return got


def _not_nan(v: float | None) -> float | None:
    """click's FloatRange lets NaN through (no comparison with it is false)."""
    if v is not None and v != v:
        raise click.BadParameter("not a number")
    return v


@main.command(epilog="""\b
Examples:
  xdpzoot trace                         # until Ctrl-C
  xdpzoot trace --reason op25b --count 10
  xdpzoot trace --seconds 30 --rate 100 --json
  xdpzoot trace --addresses --count 1""")
@click.option("--reason", "reasons", multiple=True, metavar="R", callback=_trace_reasons,
              help=f"Only drops for this reason (again for more): "
                   f"{', '.join(schema.TRACE_REASONS)}.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N events.")
@click.option("--seconds", type=click.FloatRange(0, 86400 * 365, min_open=True),
              callback=lambda _c, _p, v: _not_nan(v), help="Stop after S seconds.")
@click.option("--rate", type=click.IntRange(1, TRACE_MAX_RATE), default=1000,
              show_default=True, help="Events a second at most (held in the data plane).")
@click.option("--addresses", is_flag=True, help="Show the packets' addresses too.")
@json_opt
@click.pass_obj
def trace(o: Ctx, reasons, count, seconds, rate, addresses, as_json) -> None:
    """Sampled drop events as they happen: reason, role, hook, protocol, ports and
    subscriber. Off unless a trace runs; never for the CSAM list."""

    def go():
        inst = o.instance()   # the config is not needed: the maps say what they are
        stopped = _stop_on_signals()
        n, started = 0, time.monotonic()
        end = started + seconds if seconds else None
        with inst.trace(rate, reasons, addresses) as t:
            which = ("all reasons" if set(reasons) == set(schema.TRACE_REASONS)
                     else ", ".join(reasons))
            click.echo(f"xdpzoot: tracing drops ({which}), at most {rate} a second; "
                       "Ctrl-C stops", err=True)
            if not as_json:
                click.echo(EVENT_HEAD + (" SRC > DST" if addresses else ""))
            try:
                while not stopped and (count is None or n < count) and \
                        (end is None or time.monotonic() < end):
                    left = 1.0 if end is None else end - time.monotonic()
                    for e in t.poll(min(left, 1.0))[: None if count is None else count - n]:
                        d = _event_json(e, addresses)
                        click.echo(json.dumps(d) if as_json else _event_line(d))
                        n += 1
            except BrokenPipeError:   # the reader went away (`| head`): that ends it
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return
            lost = t.lost
        summary = {"events": n, "lost": lost, "seconds": round(time.monotonic() - started, 3)}
        _emit(as_json, {"summary": summary}, lambda: click.echo(
            f"{n} events in {summary['seconds']:.1f} s; {lost} lost (ring buffer full)"))

    _run(go)
