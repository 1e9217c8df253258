"""The lab: network namespaces to try xdpzoot without a router."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from . import _emit, _fail, _run, json_opt, main

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


@lab.command("up", epilog="""\b
Examples:
  xdpzoot lab up
  xdpzoot lab up --prefix xzdemo --no-servers --json""")
@click.option("--prefix", default=None, help="Name prefix of the namespaces.")
@click.option("--no-servers", is_flag=True, help="Do not start SMTP/DNS servers.")
@json_opt
def lab_up_cmd(prefix, no_servers, as_json) -> None:
    """Build the lab: a dynamic and a static subscriber, a router, an Internet host."""
    from xdpzoot import lab as labmod

    def go():
        try:
            lb = labmod.lab_up(prefix, servers=not no_servers)
        except ValueError as e:   # a bad prefix
            _fail(str(e))
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


@lab.command("down", epilog="""\b
Examples:
  xdpzoot lab down xz1a2b""")
@click.argument("prefix")
@json_opt
def lab_down_cmd(prefix, as_json) -> None:
    """Remove the lab PREFIX: its servers and namespaces."""
    from xdpzoot import lab as labmod

    def go():
        existed = labmod.lab_exists(prefix)
        try:
            labmod.lab_down(prefix)
        except ValueError as e:   # a bad prefix
            _fail(str(e))
        _emit(as_json, {"removed": existed}, lambda: click.echo(
            f"lab {prefix} removed" if existed else f"no lab {prefix}"))

    _run(go)


@lab.command("list", epilog="""\b
Examples:
  xdpzoot lab list --json""")
@json_opt
def lab_list_cmd(as_json) -> None:
    """The labs that have a state file (prefixes)."""
    from xdpzoot import lab as labmod

    def go():
        prefixes = labmod.lab_list()
        _emit(as_json, prefixes, lambda: [click.echo(p) for p in prefixes])

    _run(go)


@lab.command("smtp", hidden=True)
@click.option("--port", type=int, multiple=True, required=True)
@click.option("--maildir", type=click.Path(path_type=Path), required=True)
def lab_smtp_cmd(port, maildir) -> None:
    """Run the lab's SMTP sink (started by `lab up` inside a namespace)."""
    from xdpzoot import lab as labmod

    labmod.serve_smtp(list(port), maildir)


@lab.command("wait", hidden=True)
@click.option("--tcp", multiple=True, metavar="HOST:PORT")
@click.option("--dns", multiple=True, metavar="HOST")
@click.option("--timeout", type=float, default=None)
def lab_wait_cmd(tcp, dns, timeout) -> None:
    """Wait for servers to answer (inside a namespace); exit 1 if they do not."""
    from xdpzoot import lab as labmod

    t = labmod.SERVER_TIMEOUT if timeout is None else timeout
    failed = labmod.wait_ready(list(tcp), list(dns), t)
    if failed:
        _fail(f"not ready after {t:.0f}s: {', '.join(failed)}")
