"""explain: the verdict the data plane gives a packet, and why, from the maps in force."""

from __future__ import annotations

import click

from xdpzoot import model, tables
from xdpzoot.dataplane.instance import Instance

from . import Ctx, _address, _emit, _entry_json, _run, json_opt, main

# ---- explain ------------------------------------------------------------------------------


class _LiveLookup:
    """The reference model's lookups, answered by the live maps."""

    def __init__(self, inst: Instance):
        self.inst = inst

    def classify(self, a: bytes):
        c = self.inst.classify(a)
        return c[1] if c else None

    def allowed(self, a: bytes) -> int:
        return self.inst.allow_bits(a)

    def csam(self, a: bytes) -> bool:
        return self.inst.csam_check(a) is not None


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
        inst = o.instance(config=True)
        pkt = model.Packet(role, src, dst, p_proto, sport, dport)
        d = model.decide(pkt, inst.control_flags(), _LiveLookup(inst))
        data = {"verdict": d.verdict, "reason": d.reason,
                "subscriber": _entry_json(d.subscriber) if d.subscriber else None}
        _emit(as_json, data, lambda: click.echo(
            f"{d.verdict} ({d.reason})" + (
                f"; subscriber {d.subscriber.sub_id} "
                f"{data['subscriber']['type']}" if d.subscriber else "")))

    _run(go)
